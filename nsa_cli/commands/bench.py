"""`nsa bench`: NSA against dense SDPA in one run, with speedups and peak memory."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from nsa_cli.support.common import (
    UsageError, check_input_size, check_int, cli_errors, console, err_console, print_json, resolve_config,
)
from nsa_cli.support.progress import progress
from nsa_cli.support.decode_speed import decode_benchmark, generation_tokens_per_s
from nsa_cli.support.speed import DTYPES, BenchRow, benchmark
from nsa_cli.support.outputs import check_output

# what runs when nothing is said: the paper's shape on a GPU; a quick look on the CPU
DEFAULTS = {"cuda": dict(seq_len="8192,16384", preset="paper", dtype="bf16"),
            "cpu": dict(seq_len="256,512", preset="tiny", dtype="fp32")}


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part.strip()[:-1]) * 1024 if part.strip().lower().endswith("k") else int(part.strip())
                   for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--seq-len must be comma-separated integers (8192,16384 or 8k,16k), got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise UsageError(f"--seq-len must list positive lengths, got {text!r}")
    for n in lengths:
        check_int("--seq-len", n)
    return lengths


@cli_errors
def bench(
    seq_len: Optional[str] = typer.Option(None, "--seq-len", help="Comma-separated lengths, 8k = 8192 (default: 8k,16k on cuda, 256,512 on cpu)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset (default: paper on cuda, tiny on cpu)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config JSON file."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Override heads."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="Override kv_heads."),
    dim_head: Optional[int] = typer.Option(None, "--dim-head", help="Override dim_head."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)."),
    backward: bool = typer.Option(True, "--backward/--no-backward", help="Time forward+backward (default) or forward only."),
    module: bool = typer.Option(False, "--module", help="Time whole modules (projections included)."),
    decode: bool = typer.Option(False, "--decode/--no-decode", help="Time one decoding step of a layer on its static "
                                "cache against dense attention with a static KV cache (both CUDA-graphed on GPU), "
                                "contexts from --seq-len, and generation tokens/s of small Transformers."),
    batch: int = typer.Option(1, "--batch", help="Batch size."),
    device: str = typer.Option("cuda", "--device", help="cuda, or cpu for a small comparison."),
    backend: Optional[str] = typer.Option(None, "--backend", help="auto, torch or triton."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the rows to this CSV file (replaced if it exists; - for stdout)."),
) -> None:
    """Time NSA against dense SDPA: medians after warm-up, peak memory, speedup."""
    if device not in DEFAULTS:
        raise UsageError(f"--device must be cuda or cpu, got {device!r}")
    defaults = DEFAULTS[device]
    dtype = dtype or defaults["dtype"]
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    lengths = _parse_lengths(seq_len or defaults["seq_len"])
    check_int("--batch", batch)
    destination = None if csv_path is None else check_output(csv_path, True, option="--csv", stream=True, needs_force=False)
    if destination is not None and destination.path is None and as_json:
        raise UsageError("--csv - writes the rows to stdout; --json would print into it (drop one of them)")
    if preset is None and config is None:
        preset = defaults["preset"]
    cfg = resolve_config(preset, config, dict(heads=heads, kv_heads=kv_heads, dim_head=dim_head, backend=backend))
    check_input_size(cfg, batch, max(lengths))
    if decode:
        if module or csv_path is not None:
            raise UsageError("--decode times decoding steps: it takes neither --module nor --csv")
        _bench_decode(cfg, lengths, batch, DTYPES[dtype], device, as_json)
        return
    with progress("nsa bench", total=2 * len(lengths), enabled=not as_json) as bar:
        rows = benchmark(cfg, lengths, batch=batch, dtype=dtype, backward=backward, module_mode=module, device=device,
                         on_progress=lambda done, total, what: bar.update(done, f"bench: {what}", total))
    if destination is not None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(BenchRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(r.to_dict() for r in rows)
        destination.write_bytes(text.getvalue().encode())
        if not as_json and not destination.stream:
            err_console.print(f"wrote {destination.name}", markup=False, soft_wrap=True)
    if as_json:
        print_json({"config": cfg.to_dict(), "dtype": dtype, "backward": backward, "module": module, "device": device,
                    "rows": [r.to_dict() for r in rows]})
        return
    what = "fwd+bwd" if backward else "fwd"
    table = Table(title=f"nsa bench ({'module' if module else 'attention'}, {what}, {dtype}, {device}, "
                        f"heads {cfg.heads}/{cfg.num_kv_heads}, d {cfg.dim_head})")
    for col in ("seq_len", "nsa ms", "dense ms (fastest)", "flash ms", "speedup", "nsa peak", "dense peak"):
        table.add_column(col, justify="right")
    for r in rows:
        peak = lambda g: "-" if g is None else f"{g:.2f} GiB"
        flash = "-" if r.dense_flash_ms is None else f"{r.dense_flash_ms:.3f}"
        table.add_row(str(r.seq_len), f"{r.nsa_ms:.3f}", f"{r.dense_ms:.3f} ({r.dense_backend})", flash,
                      f"{r.speedup:.2f}x", peak(r.nsa_peak_gib), peak(r.dense_peak_gib))
    console.print(table)


def _bench_decode(cfg, contexts: list[int], batch: int, dtype, device: str, as_json: bool) -> None:
    if not cfg.causal:
        raise UsageError("--decode needs a causal configuration")
    with progress("nsa bench --decode", total=len(contexts) + 2, enabled=not as_json) as bar:
        rows = decode_benchmark(cfg, contexts, [batch], device=device, dtype=dtype,
                                on_row=lambda r: bar.advance(1, f"decode: context {r.context} done"))
        depth, steps = (4, 64) if device == "cuda" else (2, 4)
        tokens = {}
        for sparse in (True, False):
            bar.advance(1, f"decode: generation ({'nsa' if sparse else 'dense'})")
            tokens["nsa" if sparse else "dense"] = generation_tokens_per_s(
                cfg, depth=depth, context=max(contexts), batch=batch, steps=steps, device=device, dtype=dtype,
                sparse=sparse)
    if as_json:
        print_json({"config": cfg.to_dict(), "device": device, "batch": batch, "rows": [r.to_dict() for r in rows],
                    "generation": {"depth": depth, "context": max(contexts), "tokens_per_s": tokens}})
        return
    table = Table(title=f"nsa bench --decode ({device}, batch {batch}, heads {cfg.heads}/{cfg.num_kv_heads}, "
                        f"d {cfg.dim_head}; one layer with its projections)")
    for col in ("context", "nsa ms", "dense ms", "speedup", "cache MB read nsa / dense", "byte floor ms nsa / dense"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.context), f"{r.nsa_ms:.3f}", f"{r.dense_ms:.3f} ({r.dense_backend})", f"{r.speedup:.2f}x",
                      f"{r.nsa_cache_mb:.1f} / {r.dense_cache_mb:.1f}", f"{r.nsa_floor_ms:.4f} / {r.dense_floor_ms:.4f}")
    console.print(table)
    attention = Table(title="the attention alone (each step minus its projections, timed alone)")
    for col in ("context", "nsa ms", "dense ms", "speedup"):
        attention.add_column(col, justify="right")
    for r in rows:
        attention.add_row(str(r.context), f"{r.nsa_attention_ms:.3f}", f"{r.dense_attention_ms:.3f}",
                          f"{r.attention_speedup:.2f}x")
    console.print(attention)
    console.print(f"generation, {depth}-layer Transformers at context {max(contexts)}: nsa {tokens['nsa']:.0f} tokens/s, "
                  f"dense {tokens['dense']:.0f} tokens/s ({tokens['nsa'] / tokens['dense']:.2f}x)")
