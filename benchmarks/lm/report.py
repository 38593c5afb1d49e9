"""Outputs of the language-model comparison: one JSON per run (rewritten after every validation),
and from all runs in a directory the summary, its table and the picture.

Per model, the best learning rate is the one with the lowest mean final bits per byte over seeds.
"At equal tokens" reads every model's validation curve at the fewest tokens any model's run
reached; "at equal time" at the shortest training time any model's run took (linear
interpolation between validations), overall and by position bucket.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.lm.attention_reach import TILE_QUERIES

SUMMARY_NAME = "summary_lm.json"
PNG_NAME = "results_lm.png"


def run_id(model: str, lr: float, seed: int) -> str:
    return f"{model}-lr{lr:g}-seed{seed}"


def curve_at(points: list[dict], key: str, x: float, bucket: str | None = None) -> float | None:
    """bits per byte of a validation curve at `key` (tokens or seconds) = x, interpolated, overall or
    in one position `bucket`; None past the curve's end or where a point lacks that bucket."""

    def value(point: dict) -> float | None:
        return point["bpb"] if bucket is None else point.get("buckets", {}).get(bucket)

    for a, b in zip(points, points[1:]):
        if a[key] <= x <= b[key]:
            va, vb = value(a), value(b)
            if va is None or vb is None:
                return None
            t = 0.0 if b[key] == a[key] else (x - a[key]) / (b[key] - a[key])
            return va + t * (vb - va)
    return value(points[-1]) if points and points[-1][key] == x else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(runs: list[dict]) -> dict:
    finished = [r for r in runs if r.get("status") == "finished"]
    by_model: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in finished:
        by_model[r["model"]][r["lr"]].append(r)
    best = {m: min(rates.values(), key=lambda rs: _mean([r["final"]["full"]["bpb"] for r in rs]))
            for m, rates in by_model.items()}
    chosen = [r for rs in best.values() for r in rs]
    equal_tokens = min((r["val"][-1]["tokens"] for r in chosen), default=None)
    equal_seconds = min((r["val"][-1]["seconds"] for r in chosen), default=None)
    rows = []
    for model, rs in best.items():
        final = [r["final"] for r in rs]
        names = list(final[0]["full"]["buckets"])
        rows.append({
            "model": model, "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs], "params": rs[0]["params"],
            "tokens": [r["tokens"] for r in rs], "tokens_per_s": _mean([r["tokens_per_s"] for r in rs]),
            "bpb": [round(f["full"]["bpb"], 4) for f in final],
            "buckets": {n: _mean([f["full"]["buckets"][n] for f in final]) for n in names},
            "capped_minus_full": {n: _mean([f["capped_minus_full"][n] for f in final]) for n in names},
            "bpb_at_equal_tokens": _mean([curve_at(r["val"], "tokens", equal_tokens) for r in rs]),
            "bpb_at_equal_time": _mean([curve_at(r["val"], "seconds", equal_seconds) for r in rs]),
            "buckets_at_equal_tokens": {n: _mean([curve_at(r["val"], "tokens", equal_tokens, n) for r in rs])
                                        for n in names},
            "branch_off_minus_full": _branch_off(final, names),
            "reach": _reach(final),
        })
    return {"equal_tokens": equal_tokens, "equal_seconds": equal_seconds, "rows": rows}


def _branch_off(finals: list[dict], names: list[str]) -> dict | None:
    """Per branch and bucket, the mean over seeds of the loss added by holding that branch's gate at 0."""
    if not all("branch_off_minus_full" in f for f in finals):
        return None
    branches = list(finals[0]["branch_off_minus_full"])
    return {b: {n: _mean([f["branch_off_minus_full"][b][n] for f in finals]) for n in names} for b in branches}


def _reach(finals: list[dict]) -> dict | None:
    """The attention-reach probe (attention_reach.py) averaged over layers and seeds; None without one."""
    layers = [layer for f in finals if f.get("reach") for layer in f["reach"]["per_layer"] if layer]
    if not layers:
        return None
    keys = [k for k in ("far_mass", "captured", "ideal", "random", *(f"load_fraction_{m}q" for m in TILE_QUERIES))
            if all(k in layer for layer in layers)]
    return {k: round(_mean([layer[k] for layer in layers]), 4) for k in keys}


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(summary: dict, console: Console) -> None:
    rows = summary["rows"]
    if not rows:
        console.print("no finished runs")
        return
    names = list(rows[0]["buckets"])
    table = Table(title="Language models on packed documents (best learning rate per model; bits per byte)")
    for column in ("model", "lr", "params", "tokens/s", "bpb (per seed)", *[f"pos {n}" for n in names],
                   f"capped - full, {names[-1]}", "at equal tokens", f"pos {names[-1]} at equal tokens", "at equal time"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['lr']:g}", f"{r['params'] / 1e6:.2f}M", f"{r['tokens_per_s'] / 1e3:,.0f}k",
                      ", ".join(f"{b:.3f}" for b in r["bpb"]), *[_fmt(r["buckets"][n]) for n in names],
                      _fmt(r["capped_minus_full"][names[-1]], 4), _fmt(r["bpb_at_equal_tokens"]),
                      _fmt(r["buckets_at_equal_tokens"][names[-1]]), _fmt(r["bpb_at_equal_time"]))
    console.print(table)
    for r in rows:
        if r.get("branch_off_minus_full"):
            parts = [f"{b} " + "/".join(f"{_fmt(v, 3)}" for v in per_bucket.values())
                     for b, per_bucket in r["branch_off_minus_full"].items()]
            console.print(f"{r['model']}: loss added with one branch's gate at 0, by bucket ({', '.join(names)}): "
                          + "; ".join(parts), highlight=False)
    for r in rows:
        if r.get("reach"):
            console.print(f"{r['model']}: attention mass beyond the window (mean over layers), and the share of it "
                          "in the selected blocks / the best as many / random; distinct blocks over selections "
                          f"in tiles of {' / '.join(map(str, TILE_QUERIES))} queries (load_fraction): "
                          + ", ".join(f"{k} {v:.3f}" for k, v in r["reach"].items()), highlight=False)
    console.print(f"equal tokens: {summary['equal_tokens']:,}; equal time: {summary['equal_seconds']} s of training; "
                  "positions: bytes of the token's own document before it", highlight=False)


def write_summary(summary: dict, out: Path) -> Path:
    path = out / SUMMARY_NAME
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path


def plot(runs: list[dict], out: Path) -> Path | None:
    """Validation bits per byte against tokens and against training seconds, and the last position
    bucket's against tokens (runs that recorded it), one line per run: a colour per model, solid at
    the model's best learning rate (summarize's choice), dotted at the others."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not any(r.get("val") for r in runs):
        return None  # no curve yet (e.g. a command whose budget was spent before its first run)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    best_lr = {row["model"]: row["lr"] for row in summarize(runs)["rows"]}
    colors = {m: f"C{i}" for i, m in enumerate(sorted({r["model"] for r in runs}))}
    last_bucket, values = None, []
    for r in (r for r in runs if r.get("val")):
        best = best_lr.get(r["model"]) == r["lr"]
        style = dict(label=f"{r['model']} lr {r['lr']:g} seed {r['seed']}", color=colors[r["model"]],
                     linestyle="-" if best else ":", linewidth=1.8 if best else 1.0, alpha=1.0 if best else 0.6)
        points = r["val"][1:] or r["val"]
        values += [p["bpb"] for p in points]
        axes[0].plot([p["tokens"] / 1e6 for p in points], [p["bpb"] for p in points], **style)
        axes[1].plot([p["seconds"] for p in points], [p["bpb"] for p in points], **style)
        with_buckets = [p for p in points if p.get("buckets")]
        if with_buckets:
            last_bucket = list(with_buckets[0]["buckets"])[-1]
            axes[2].plot([p["tokens"] / 1e6 for p in with_buckets], [p["buckets"][last_bucket] for p in with_buckets],
                         **style)
    if values:  # the early steps' losses would flatten the range where the models differ
        low = min(values)
        for ax in axes:
            ax.set_ylim(top=min(max(values), 1.6 * low) + 0.02)
    titles = ("all positions", "all positions", f"positions {last_bucket}" if last_bucket else "no bucket curves")
    for ax, xlabel, title in zip(axes, ("training tokens (millions)", "training seconds", "training tokens (millions)"),
                                 titles):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits per byte")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / PNG_NAME
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
