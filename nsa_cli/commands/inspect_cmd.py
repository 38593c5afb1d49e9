"""`nsa inspect`: a safetensors file's tensors and config, from the header alone."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from nsa_cli.support.common import cli_errors, console, err_console, human_bytes, print_json
from nsa_core.checkpoint.safetensors import check_against_config, read_header


@cli_errors
def inspect(
    path: Path = typer.Argument(..., help="A .safetensors file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show tensors (shape, dtype, bytes), the embedded config, the parameter total and mismatches."""
    metadata, tensors = read_header(path)
    config, warnings_ = check_against_config(metadata, tensors)
    total = sum(_numel(info["shape"]) for info in tensors.values())
    if as_json:
        print_json({"config": config, "metadata": metadata, "tensors": tensors, "parameters": total, "warnings": warnings_})
        return
    table = Table(title=str(path))
    for col in ("tensor", "shape", "dtype", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for name, info in sorted(tensors.items()):
        table.add_row(name, "x".join(map(str, info["shape"])) or "scalar", info["dtype"], human_bytes(info["bytes"]))
    console.print(table)
    if config:
        cfg_table = Table(title="embedded config")
        cfg_table.add_column("argument")
        cfg_table.add_column("value")
        for key, value in config.items():
            cfg_table.add_row(key, str(value))
        console.print(cfg_table)
    console.print(f"tensor elements: {total:,} (parameters and persistent buffers)")
    for w in warnings_:
        err_console.print(f"warning: {w}", markup=False)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
