"""`nsa config list | show | create`: presets, one configuration's costs, writing a config file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from nsa_cli.support.analysis import branch_costs, parameter_counts_for_config
from nsa_cli.support.common import (
    UsageError, check_int, cli_errors, config_options_help, console, human_bytes, human_count,
    err_console, load_config_file, parse_field_options, print_json,
)
from nsa_cli.support.outputs import check_output
from nsa_core import PRESETS, NSAConfig

app = typer.Typer(help="List presets, show a configuration's costs, write a config file.", no_args_is_help=True)


@app.command("list")
@cli_errors
def list_presets(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the built-in presets."""
    if as_json:
        print_json({name: cfg.to_dict() for name, cfg in PRESETS.items()})
        return
    table = Table(title="presets")
    for col in ("name", "dim", "heads / kv", "dim_head", "compress / stride", "selection x n", "window", "causal"):
        table.add_column(col)
    for name, c in PRESETS.items():
        table.add_row(name, str(c.dim), f"{c.heads} / {c.num_kv_heads}", str(c.dim_head), f"{c.compress_block_size} / {c.stride}",
                      f"{c.selection_block_size} x {c.num_selected_blocks}", str(c.sliding_window_size), str(c.causal))
    console.print(table)


def _load(name_or_file: str) -> NSAConfig:
    if name_or_file in PRESETS:
        return PRESETS[name_or_file]
    path = Path(name_or_file)
    if not path.exists():
        raise UsageError(f"{name_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    return load_config_file(path)


@app.command("show")
@cli_errors
def show(
    name_or_file: str = typer.Argument(..., help="A preset name or a config JSON file."),
    seq_len: int = typer.Option(8192, "--seq-len", help="Sequence length for the cost table."),
    batch: int = typer.Option(1, "--batch", help="Batch size for the cost table."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a configuration, its parameters by part and each branch's cost next to dense attention."""
    check_int("--seq-len", seq_len)
    check_int("--batch", batch)
    cfg = _load(name_or_file)
    counts = parameter_counts_for_config(cfg)
    costs = branch_costs(cfg, seq_len, batch)
    if as_json:
        print_json({"config": cfg.to_dict(), "parameters": counts, "seq_len": seq_len,
                    "costs": [c.__dict__ for c in costs]})
        return
    table = Table(title=f"config: {name_or_file}")
    table.add_column("argument")
    table.add_column("value")
    for key, value in cfg.to_dict().items():
        table.add_row(key, str(value))
    console.print(table)
    params = Table(title="parameters")
    params.add_column("part")
    params.add_column("count", justify="right")
    for part, n in counts.items():
        params.add_row(part, f"{n:,}")
    console.print(params)
    dense = costs[-1]
    cost_table = Table(title=f"forward cost at seq_len={seq_len}, batch={batch} (bf16 activations)")
    for col in ("branch", "keys / query", "FLOPs", "vs dense", "activations"):
        cost_table.add_column(col, justify="right" if col != "branch" else "left")
    for c in costs:
        cost_table.add_row(c.name, f"{c.keys_per_query:,.1f}", human_count(c.flops), f"{c.flops / dense.flops:.3f}", human_bytes(c.activation_bytes))
    total = sum(c.flops for c in costs[:-1])
    cost_table.add_row("NSA total", "", human_count(total), f"{total / dense.flops:.3f}", "")
    console.print(cost_table)


@app.command("create", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@cli_errors
def create(
    ctx: typer.Context,
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the config JSON (- for stdout)."),
    preset: str = typer.Option("seeds", "--preset", help="The preset to start from."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Write a config file: a preset with any constructor argument changed (--kv-heads 4, --no-causal, ...)."""
    changes = parse_field_options(list(ctx.args))
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    destination = check_output(output, force, stream=True)
    if destination.path is None and as_json:
        raise UsageError("-o - writes the config to stdout; --json would print into it (drop one of them)")
    cfg = PRESETS[preset].replace(**changes)
    destination.write_bytes((cfg.to_json() + "\n").encode())
    if as_json:
        print_json({"output": destination.name, "config": cfg.to_dict()})
    elif destination.path is not None:
        err_console.print(f"wrote {output}", markup=False, soft_wrap=True)


create.__doc__ += f"\n\nConfig options: {config_options_help()}."
