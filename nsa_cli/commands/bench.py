"""`nsa bench`: NSA against dense SDPA in one run, with speedups and peak memory."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import Progress
from rich.table import Table

from nsa_cli.support.common import UsageError, cli_errors, console, print_json, resolve_config
from nsa_cli.support.speed import BenchRow, benchmark


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part.strip().lower().replace("k", "000")) if not part.strip().lower().endswith("k")
                   else int(part.strip()[:-1]) * 1024 for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--seq-len must be comma-separated integers (8192,16384 or 8k,16k), got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise UsageError(f"--seq-len must list positive lengths, got {text!r}")
    return lengths


@cli_errors
def bench(
    seq_len: str = typer.Option("8192,16384", "--seq-len", help="Comma-separated lengths (8k = 8192)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset (default: paper)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config JSON file."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Override heads."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="Override kv_heads."),
    dim_head: Optional[int] = typer.Option(None, "--dim-head", help="Override dim_head."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
    backward: bool = typer.Option(True, "--backward/--no-backward", help="Time forward+backward (default) or forward only."),
    module: bool = typer.Option(False, "--module", help="Time whole modules (projections included)."),
    batch: int = typer.Option(1, "--batch", help="Batch size."),
    device: str = typer.Option("cuda", "--device", help="cuda, or cpu for a small comparison."),
    backend: Optional[str] = typer.Option(None, "--backend", help="auto, torch or triton."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the rows to this CSV file."),
) -> None:
    """Time NSA against dense SDPA: medians after warm-up, peak memory, speedup."""
    if device not in ("cuda", "cpu"):
        raise UsageError(f"--device must be cuda or cpu, got {device!r}")
    lengths = _parse_lengths(seq_len)
    cfg = resolve_config(preset, config, dict(heads=heads, kv_heads=kv_heads, dim_head=dim_head, backend=backend),
                         default_preset="paper")
    show_progress = sys.stderr.isatty() and not as_json
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(lengths))
        rows = benchmark(cfg, lengths, batch=batch, dtype=dtype, backward=backward, module_mode=module, device=device,
                         on_row=lambda _: progress.advance(task))
    if csv_path is not None:
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(BenchRow.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(r.to_dict() for r in rows)
    if as_json:
        print_json({"config": cfg.to_dict(), "dtype": dtype, "backward": backward, "module": module, "device": device,
                    "rows": [r.to_dict() for r in rows]})
        return
    what = "fwd+bwd" if backward else "fwd"
    table = Table(title=f"nsa bench ({'module' if module else 'attention'}, {what}, {dtype}, {device}, "
                        f"heads {cfg.heads}/{cfg.num_kv_heads}, d {cfg.dim_head})")
    for col in ("seq_len", "nsa ms", "dense ms", "speedup", "nsa peak", "dense peak"):
        table.add_column(col, justify="right")
    for r in rows:
        peak = lambda g: "-" if g is None else f"{g:.2f} GiB"
        table.add_row(str(r.seq_len), f"{r.nsa_ms:.3f}", f"{r.dense_ms:.3f}", f"{r.speedup:.2f}x", peak(r.nsa_peak_gib), peak(r.dense_peak_gib))
    console.print(table)
