"""The `nsa` Typer app: registers the commands, `--version`, flags shown as flags in help (no
`<bool>` type column), and makes command-line parsing errors one line on stderr with exit code 2,
like every other user error (nsa_cli.support.common.cli_errors)."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup, TyperOption

from nsa_cli.commands import bench, check, config_cmd, convert, env, export, inspect_cmd, visualize
from nsa_cli.support.common import console, err_console
from nsa_core import __version__

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException


class OneLineErrors(TyperGroup):
    """Parsing errors (no such option, a value of the wrong type, a missing argument) as
    `error: ... (see 'nsa check --help')` instead of a usage block and a panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as err:
            if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                ctx = getattr(err, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                err_console.print(f"error: {err.format_message()}{hint}", markup=False, soft_wrap=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            err_console.print("aborted", markup=False)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="nsa",
    cls=OneLineErrors,
    help="Native Sparse Attention: configurations, checks, selection pictures, safetensors export/inspect, conversion, benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
def _hide_flag_types() -> None:
    """A flag takes no value: help shows `--json`, not `--json <bool>`. Typer versions that show
    option types through `display_type_rich` get it patched; older ones show no type for flags
    and have no such method, so there is nothing to patch."""
    display_type = getattr(TyperOption, "display_type_rich", None)
    if display_type is None:
        return

    def flag_without_type(self, ctx):
        return None if self.is_flag else display_type(self, ctx)

    TyperOption.display_type_rich = flag_without_type


_hide_flag_types()


def _print_version(value: bool) -> None:
    if value:
        console.print(f"nsa {__version__}", markup=False)
        raise typer.Exit(0)


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Show the version and exit.")) -> None:
    """Native Sparse Attention: configurations, checks, selection pictures, safetensors export/inspect, conversion, benchmarks."""


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
