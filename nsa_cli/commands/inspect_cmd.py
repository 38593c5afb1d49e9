"""`nsa inspect`: a safetensors file (or a Hugging Face model folder) checked completely: every finding
(shown first, on stderr), its tensors (a table, or streamed plain lines for large headers), its config."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import typer
from rich.table import Table

from nsa_cli.support.common import UsageError, cli_errors, console, err_console, human_bytes, print_json
from nsa_core.checkpoint.safetensors import inspect_file


TABLE_ROWS = 2000  # more tensors than this are listed as plain lines, written as they go
CHUNK_LINES = 10_000


def _shape(info: dict) -> str:
    return "x".join(map(str, info["shape"])) or "scalar"


def _stream_listing(title: str, tensors: dict) -> None:
    """One aligned line per tensor, written in chunks (a table of 600k rows takes minutes to lay out)."""
    names = sorted(tensors)
    width = max(map(len, names))
    shape_width = max(len(_shape(tensors[n])) for n in names)
    sys.stdout.write(f"{title}: {len(names):,} tensors\n{'tensor':<{width}}  {'shape':<{shape_width}}  dtype  bytes\n")
    for start in range(0, len(names), CHUNK_LINES):
        sys.stdout.write("".join(f"{n:<{width}}  {_shape(tensors[n]):<{shape_width}}  {tensors[n]['dtype']:<5}  "
                                 f"{human_bytes(tensors[n]['bytes'])}\n" for n in names[start : start + CHUNK_LINES]))
        sys.stdout.flush()


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
        for note in report.notes:  # findings first: they show at once, before a long listing
            err_console.print(f"note: {note}", markup=False, soft_wrap=True)
        for finding in report.findings:
            err_console.print(f"finding: {finding}", markup=False, soft_wrap=True)
        if len(report.tensors) <= TABLE_ROWS:
            table = Table(title=str(path))
            for col in ("tensor", "shape", "dtype", "bytes"):
                table.add_column(col, justify="right" if col == "bytes" else "left")
            for name, info in sorted(report.tensors.items()):
                table.add_row(name, _shape(info), info["dtype"], human_bytes(info["bytes"]))
            console.print(table)
        else:
            _stream_listing(str(path), report.tensors)
        if report.config:
            cfg_table = Table(title="embedded config")
            cfg_table.add_column("argument")
            cfg_table.add_column("value")
            for key, value in report.config.items():
                cfg_table.add_row(key, str(value))
            console.print(cfg_table)
        console.print(f"tensor elements: {total:,} (parameters and persistent buffers)")
        console.print("file checked: no findings" if report.passed else f"file check failed: {len(report.findings)} finding(s)")
    if not report.passed:
        raise typer.Exit(1)
