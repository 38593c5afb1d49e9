"""Outputs of the quality comparison: the environment record, the JSON file, the summary table
and the picture (validation loss curves; retrieval accuracy by length)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import nsa_core

JSON_NAME = "results_quality.json"
PNG_NAME = "results_quality.png"


def _git_commit(directory: Path) -> str | None:
    """The checkout's commit; NSA_GIT_COMMIT names it where the tree was copied without its history (the device)."""
    named = os.environ.get("NSA_GIT_COMMIT", "").strip()
    if named:
        return named
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment(device: torch.device, precision: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "triton": triton_version, "cuda": torch.version.cuda, "nsa": nsa_core.__version__,
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "precision": precision, "cpu_threads": torch.get_num_threads(),
    }


def write_json(results: dict, out: Path) -> Path:
    path = out / JSON_NAME
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def summary_table(results: dict) -> Table:
    """Model, parameters, final validation bits per byte, tokens/s, retrieval accuracy per length."""
    lengths = sorted({int(n) for per_model in results["retrieval"].values() for n in per_model}, key=int)
    table = Table(title="NSA quality comparison")
    for column in ("model", "params", "attn params", "val bpb", "tokens", "tokens/s", *(f"passkey {n}" for n in lengths)):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, run in results["runs"].items():
        retrieval = results["retrieval"].get(name, {})
        table.add_row(
            name, f"{run['params']:,}", f"{run['attention_params']:,}", f"{run['val_loss'][-1]:.4f}",
            f"{run['tokens']:,}", f"{run['tokens_per_s']:,.0f}",
            *(f"{retrieval[str(n)]['accuracy']:.2f}" if str(n) in retrieval else "-" for n in lengths),
        )
    return table


def print_summary(results: dict, console: Console) -> None:
    console.print(summary_table(results))


def plot(results: dict, out: Path) -> Path | None:
    """Write the PNG; None when matplotlib is not installed (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (loss_ax, retrieval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in results["runs"].items():
        loss_ax.plot([t / 1e6 for t in run["val_tokens"]], run["val_loss"], marker=".", label=name)
    loss_ax.set(xlabel="training tokens (millions)", ylabel="validation loss (bits per byte)",
                title="Language modelling: Python stdlib, held-out files")
    loss_ax.set_ylim(top=min(8.5, max(max(r["val_loss"][1:] or r["val_loss"]) for r in results["runs"].values()) * 1.1))
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    for name, per_length in results["retrieval"].items():
        lengths = sorted(per_length, key=int)
        retrieval_ax.plot([int(n) for n in lengths], [per_length[n]["accuracy"] for n in lengths], marker="o", label=name)
    retrieval_ax.set_xscale("log", base=2)
    all_lengths = sorted({int(n) for per_length in results["retrieval"].values() for n in per_length})
    retrieval_ax.set_xticks(all_lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in all_lengths])
    retrieval_ax.set(xlabel="sequence length (bytes)", ylabel="passkey accuracy (exact key)", ylim=(-0.05, 1.05),
                     title="Passkey retrieval, fresh samples")
    retrieval_ax.legend()
    retrieval_ax.grid(alpha=0.3)
    settings, env = results["settings"], results["environment"]
    fig.suptitle(f"{env['device']} · {env['precision']} · dim {settings['dim']} x {settings['depth']} layers · "
                 f"context {settings['context']} · torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    path = out / PNG_NAME
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
