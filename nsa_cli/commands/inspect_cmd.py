"""`nsa inspect`: a safetensors file (or a Hugging Face model folder) checked completely: every finding
(shown first, on stderr), its tensors (a table, or streamed plain lines for large headers), its config.
Large outputs are plain text written in chunks (findings, the listing, the JSON's tensors one per line);
Rich lays out only the small table, the config and the summary lines."""

from __future__ import annotations

import json
import math
import sys
from itertools import islice
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import typer
from rich.control import strip_control_codes
from rich.table import Table

from nsa_cli.support.common import UsageError, cli_errors, console, human_bytes
from nsa_core.checkpoint.safetensors import inspect_file


TABLE_ROWS = 2000  # more tensors than this are listed as plain lines, written as they go
CHUNK_LINES = 10_000
HEADER_FIELDS = {"dtype", "shape", "bytes", "data_offsets"}  # a tensor as the safetensors reader describes it


def _shape(info: dict) -> str:
    return "x".join(map(str, info["shape"])) or "scalar"


def _write_lines(stream: TextIO, lines: Iterable[str]) -> None:
    """Lines as plain text, formatted and written a chunk at a time (the first show while the rest are
    made), each chunk flushed; control codes removed as Rich removes them."""
    lines = iter(lines)
    while chunk := list(islice(lines, CHUNK_LINES)):
        stream.write(strip_control_codes("".join(chunk)))
        stream.flush()


def _listing_lines(title: str, tensors: dict) -> Iterator[str]:
    """One aligned line per tensor, by name (a Rich table of 600k rows takes minutes to lay out);
    shapes and sizes, which repeat, formatted once each."""
    names = sorted(tensors)
    infos = [tensors[n] for n in names]
    shapes, known = [], {}
    for info in infos:
        key = tuple(info["shape"])
        if key not in known:
            known[key] = _shape(info)
        shapes.append(known[key])
    sizes = {n: human_bytes(n) for n in {info["bytes"] for info in infos}}
    width, shape_width = max(map(len, names)), max(map(len, shapes))
    yield f"{title}: {len(names):,} tensors\n"
    yield f"{'tensor'.ljust(width)}  {'shape'.ljust(shape_width)}  dtype  bytes\n"
    for name, shape, info in zip(names, shapes, infos):
        yield f"{name.ljust(width)}  {shape.ljust(shape_width)}  {info['dtype'].ljust(5)}  {sizes[info['bytes']]}\n"


def _tensor_json(info: dict) -> str:
    """json.dumps(info), the header's fields in a fixed order; a header entry (ints and a string, as
    the reader checked them) written directly: 2.5 times faster than json.dumps of each."""
    if info.keys() != HEADER_FIELDS:
        return json.dumps(info, default=str)
    start, end = info["data_offsets"]
    shape = ", ".join(map(str, info["shape"]))
    return (f'{{"dtype": {encode_basestring_ascii(info["dtype"])}, "shape": [{shape}], "bytes": {info["bytes"]}, '
            f'"data_offsets": [{start}, {end}]}}')


def _report_json_lines(report: dict) -> Iterator[str]:
    """The text of json.dumps(report, indent=2), except that `tensors` holds one tensor per line."""
    yield "{\n"
    last = len(report) - 1
    for i, (key, value) in enumerate(report.items()):
        comma = "," if i < last else ""
        if key == "tensors" and value:
            yield '  "tensors": {\n'
            final = len(value) - 1
            for j, (name, info) in enumerate(value.items()):
                yield f"    {encode_basestring_ascii(name)}: {_tensor_json(info)}{',' if j < final else ''}\n"
            yield f"  }}{comma}\n"
        else:
            nested = json.dumps(value, indent=2, default=str).replace("\n", "\n  ")  # strings hold no raw newline
            yield f"  {json.dumps(key)}: {nested}{comma}\n"
    yield "}\n"


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
        _write_lines(sys.stdout, _report_json_lines({
            "passed": report.passed, "findings": report.findings, "notes": report.notes, "config": report.config,
            "metadata": report.metadata, "tensors": report.tensors, "parameters": total}))
    else:
        # findings first: they show at once, before a long listing
        _write_lines(sys.stderr, [f"note: {note}\n" for note in report.notes]
                     + [f"finding: {finding}\n" for finding in report.findings])
        if len(report.tensors) <= TABLE_ROWS:
            table = Table(title=str(path))
            for col in ("tensor", "shape", "dtype", "bytes"):
                table.add_column(col, justify="right" if col == "bytes" else "left")
            for name, info in sorted(report.tensors.items()):
                table.add_row(name, _shape(info), info["dtype"], human_bytes(info["bytes"]))
            console.print(table)
        else:
            _write_lines(sys.stdout, _listing_lines(str(path), report.tensors))
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
