"""`nsa check`: build a module and run the health checks of nsa_cli.support.checks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from nsa_cli.support.checks import run_checks
from nsa_cli.support.common import (
    check_input_size, check_int, check_seed, cli_errors, console, print_json, resolve_config,
)
from nsa_cli.support.progress import progress

@cli_errors
def check(
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset to start from (default: seeds)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config JSON file."),
    seq_len: int = typer.Option(120, "--seq-len", help="Sequence length of the random input."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="Override kv_heads."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Override heads."),
    batch: int = typer.Option(1, "--batch", help="Batch size."),
    causal: Optional[bool] = typer.Option(None, "--causal/--no-causal", help="Override causal."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp64, bf16 or fp16."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights and input."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Run shape, finiteness, gradient, causality, decoding, kernel and gradcheck checks."""
    check_int("--seq-len", seq_len)
    check_int("--batch", batch)
    check_seed(seed)
    cfg = resolve_config(preset, config, dict(kv_heads=kv_heads, heads=heads, causal=causal))
    check_input_size(cfg, batch, seq_len)
    with progress("nsa check", total=1.0, enabled=not as_json, lines=True) as bar:
        results = run_checks(cfg, seq_len, batch=batch, device=device, dtype=dtype, seed=seed,
                             on_progress=lambda done, what: bar.update(done, f"check: {what}"))
    passed = all(r.passed for r in results)
    if as_json:
        print_json({"passed": passed, "checks": [r.to_dict() for r in results], "config": cfg.to_dict(),
                    "seq_len": seq_len, "batch": batch, "device": device, "dtype": dtype})
    else:
        table = Table(title=f"nsa check: seq_len={seq_len}, batch={batch}, heads={cfg.heads}/{cfg.num_kv_heads}, "
                            f"causal={cfg.causal}, {device} {dtype}")
        table.add_column("check")
        table.add_column("result")
        table.add_column("figure")
        table.add_column("note")
        for r in results:
            status = "[yellow]SKIP[/]" if r.skipped else ("[green]PASS[/]" if r.passed else "[red]FAIL[/]")
            table.add_row(r.name, status, r.value, r.detail)
        console.print(table)
        console.print("[green]all checks passed[/]" if passed else "[red]some checks failed[/]")
    if not passed:
        raise typer.Exit(1)
