"""The retrieval benchmark's outputs: one JSON per run (written as the run goes), and from all runs
in a directory the summary (best learning rate per model and task, steps to 0.9 / 0.95, final
accuracy, hit rate), its table and the picture (accuracy vs step, best rate per model, one thin
line per seed and the seeds' mean).

Best learning rate: the one whose runs have the highest mean evaluation accuracy over the whole
curve (the area under it, averaged over seeds): it rewards learning early and handles runs that
never reach a threshold.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

SUMMARY_NAME = "summary_retrieval.json"
PNG_NAME = "results_retrieval.png"


def group_label(run: dict) -> str:
    return f"{run['task']['name']} {run['task']['length']}"


def curve_mean(run: dict) -> float:
    accuracy = run["eval"]["accuracy"]
    return sum(accuracy) / len(accuracy) if accuracy else 0.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _last(diag: dict, key: str) -> list[float] | None:
    values = [v for v in diag.get(key, []) if v is not None]
    return values[-1] if values else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (task and length, model): its best learning rate and that rate's seeds."""
    by_model: dict[tuple[str, str], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_model[(group_label(run), run["model"])][run["lr"]].append(run)
    rows = []
    for (group, model), by_lr in by_model.items():
        lr, seeds = max(by_lr.items(), key=lambda item: (_mean([curve_mean(r) for r in item[1]]), -item[0]))
        seeds = sorted(seeds, key=lambda r: r["seed"])
        hits = [_last(r["diagnostics"], "hit_rate") for r in seeds]
        randoms = [_last(r["diagnostics"], "hit_rate_random") for r in seeds]
        rows.append({
            "task": group, "model": model, "best_lr": lr, "seeds": [r["seed"] for r in seeds],
            "lrs_tried": sorted(by_lr), "chance": seeds[0]["task"]["chance"],
            "steps_to_0.9": [r.get("steps_to", {}).get("0.9") for r in seeds],
            "steps_to_0.95": [r.get("steps_to", {}).get("0.95") for r in seeds],
            "final_accuracy": _mean([r["eval"]["accuracy"][-1] for r in seeds if r["eval"]["accuracy"]]),
            "steps": [r.get("steps") for r in seeds], "status": [r.get("status") for r in seeds],
            "hit_rate_last_eval": [None if h is None else _mean(h) for h in hits],
            "hit_rate_random_last_eval": [None if h is None else _mean(h) for h in randoms],
        })
    return sorted(rows, key=lambda row: (row["task"], row["model"]))


def _steps(values: list[int | None]) -> str:
    return ", ".join("-" if v is None else str(v) for v in values)


def _fraction(values: list[float | None]) -> str:
    return ", ".join("-" if v is None else f"{v:.2f}" for v in values)


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="Retrieval from scratch (best learning rate per model; one value per seed)")
    for name in ("task", "model", "best lr", "steps to 0.9", "steps to 0.95", "final acc", "hit rate", "random hit"):
        table.add_column(name, justify="left" if name in ("task", "model") else "right")
    for row in rows:
        table.add_row(row["task"], row["model"], f"{row['best_lr']:g}", _steps(row["steps_to_0.9"]),
                      _steps(row["steps_to_0.95"]),
                      "-" if row["final_accuracy"] is None else f"{row['final_accuracy']:.3f}",
                      _fraction(row["hit_rate_last_eval"]), _fraction(row["hit_rate_random_last_eval"]))
    console.print(table)
    console.print("steps to a threshold: the first evaluation at or above it ('-': never); hit rate: share of "
                  "answers whose support block is selected at the last evaluation, mean over layers", highlight=False)


def write_summary(rows: list[dict], out: Path) -> Path:
    path = out / SUMMARY_NAME
    path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return path


def plot(runs: list[dict], rows: list[dict], out: Path) -> Path | None:
    """Accuracy vs step per task and length: best rate per model, seeds thin, their mean thick."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = sorted({row["task"] for row in rows})
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = sorted({row["model"] for row in rows})
    for ax, group in zip(axes[0], groups):
        for row in (r for r in rows if r["task"] == group):
            color = colors[models.index(row["model"]) % len(colors)]
            seeds = [r for r in runs if group_label(r) == group and r["model"] == row["model"]
                     and r["lr"] == row["best_lr"]]
            for run in seeds:
                ax.plot(run["eval"]["step"], run["eval"]["accuracy"], color=color, linewidth=0.7, alpha=0.5)
            steps = min((run["eval"]["step"] for run in seeds), key=len)
            mean = [sum(run["eval"]["accuracy"][i] for run in seeds) / len(seeds) for i in range(len(steps))]
            ax.plot(steps, mean, color=color, linewidth=2, label=f"{row['model']} (lr {row['best_lr']:g})")
        chance = next(r["chance"] for r in rows if r["task"] == group)
        ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label="chance")
        ax.set(title=group, xlabel="training step", ylabel="accuracy at the target length", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / PNG_NAME
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
