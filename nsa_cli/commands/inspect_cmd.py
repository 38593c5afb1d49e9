"""`nsa inspect`: a safetensors file (or a Hugging Face model folder) checked completely: its tensors, its
config, and every finding."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from nsa_cli.support.common import UsageError, cli_errors, console, err_console, human_bytes, print_json
from nsa_core.checkpoint.safetensors import inspect_file


def inspect_folder(path: Path):
    try:
        from nsa_core.hf.inspect_dir import inspect_model_dir
    except ImportError as err:
        raise UsageError(f"inspecting a model folder needs transformers: pip install 'nsa[hf]' ({err})") from None
    return inspect_model_dir(path)


@cli_errors
def inspect(
    path: Path = typer.Argument(..., help="A .safetensors file, or a Hugging Face model folder (NSA or dense Llama-family)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show tensors (shape, dtype, bytes), the embedded config and the parameter total; check the
    header against the file size, every tensor's bytes, and names and shapes against the config.
    Exit 1 on any finding (what would keep the file from loading). A folder: its config.json and every
    shard, an NSA model's tensors against its config (nsa_core.hf.inspect_dir)."""
    report = inspect_folder(path) if path.is_dir() else inspect_file(path)
    total = sum(math.prod(info["shape"]) for info in report.tensors.values())
    if as_json:
        print_json({"passed": report.passed, "findings": report.findings, "notes": report.notes, "config": report.config,
                    "metadata": report.metadata, "tensors": report.tensors, "parameters": total})
    else:
        table = Table(title=str(path))
        for col in ("tensor", "shape", "dtype", "bytes"):
            table.add_column(col, justify="right" if col == "bytes" else "left")
        for name, info in sorted(report.tensors.items()):
            table.add_row(name, "x".join(map(str, info["shape"])) or "scalar", info["dtype"], human_bytes(info["bytes"]))
        console.print(table)
        if report.config:
            cfg_table = Table(title="embedded config")
            cfg_table.add_column("argument")
            cfg_table.add_column("value")
            for key, value in report.config.items():
                cfg_table.add_row(key, str(value))
            console.print(cfg_table)
        console.print(f"tensor elements: {total:,} (parameters and persistent buffers)")
        for note in report.notes:
            err_console.print(f"note: {note}", markup=False, soft_wrap=True)
        for finding in report.findings:
            err_console.print(f"finding: {finding}", markup=False, soft_wrap=True)
        console.print("file checked: no findings" if report.passed else f"file check failed: {len(report.findings)} finding(s)")
    if not report.passed:
        raise typer.Exit(1)
