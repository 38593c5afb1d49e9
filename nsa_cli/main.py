"""The `nsa` Typer app: registers the commands, nothing else."""

from __future__ import annotations

import typer

from nsa_cli.commands import bench, check, config_cmd, convert, env, export, inspect_cmd, visualize

app = typer.Typer(
    name="nsa",
    help="Native Sparse Attention: configurations, checks, selection pictures, safetensors export/inspect, conversion, benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(config_cmd.app, name="config")
app.command("check")(check.check)
app.command("visualize-selection")(visualize.visualize_selection)
app.command("export")(export.export)
app.command("inspect")(inspect_cmd.inspect)
app.command("convert", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(convert.convert)
app.command("bench")(bench.bench)
app.command("env")(env.env)

if __name__ == "__main__":
    app()
