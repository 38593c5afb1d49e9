"""`nsa visualize-selection`: the query-block x key-block grid of one kv head's selection."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from nsa_cli.support.analysis import SelectionGrid, downscale_grid, grid_categories, random_input, selection_grid
from nsa_cli.support.common import (
    UsageError, check_input_size, check_int, check_output_path, check_seed, cli_errors, console, err_console, print_json,
    resolve_config,
)
from nsa_cli.support.inputs import build_module, load_input_file
from nsa_core.checkpoint.files import check_input_file, write_atomically
from nsa_core.checkpoint.safetensors import load_safetensors

CELLS = [" ", "·", "░", "■", "█", "█", "█"]  # by category (nsa_cli.support.analysis.grid_categories)
STYLES = ["", "grey50", "blue", "magenta", "green", "green3", "bright_green"]
MEANINGS = ["not attended", "future (causal edge)", "sliding window reach", "own block (causal)",
            "selected (brighter: more queries of the block)"]
PNG_COLORS = ["white", "#e0e0e0", "#9ecae1", "#c51b8a", "#a1d99b", "#41ab5d", "#005a32"]


def render_grid(grid: SelectionGrid, title: str, max_width: int) -> list[Text]:
    nb = grid.counts.shape[0]
    factor = max(1, math.ceil(nb / max(8, max_width - 12)))
    categories = grid_categories(downscale_grid(grid, factor)).tolist()
    lines = [Text(title, style="bold")]
    if factor > 1:
        lines.append(Text(f"(scaled down: each cell is {factor} x {factor} blocks)", style="italic"))
    lines.append(Text("query block \\ key block →"))
    for i, row in enumerate(categories):
        line = Text(f"{i * factor:>6} ")
        for cat in row:
            line.append(CELLS[cat], style=STYLES[cat] or None)
        lines.append(line)
    legend = Text("legend: ")
    for cat in (6, 3, 2, 1, 0):  # selected first; the three selected shades share one entry
        legend.append(CELLS[cat] if CELLS[cat] != " " else "␣", style=STYLES[cat] or None)
        legend.append(f" {MEANINGS[min(cat, 4)]}  ")
    lines.append(legend)
    lines.append(Text("sparsity (fraction of query-key pairs): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in grid.sparsity.items())))
    return lines


def _save_png(grid: SelectionGrid, title: str, path: Path, overwrite: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import BoundaryNorm, ListedColormap
    except ImportError:
        raise UsageError("PNG output needs matplotlib: pip install 'nsa[plot]' (or use .svg / .html)") from None
    cmap, norm = ListedColormap(PNG_COLORS), BoundaryNorm([x - 0.5 for x in range(len(PNG_COLORS) + 1)], len(PNG_COLORS))
    fig, ax = plt.subplots(figsize=(7, 6.5))
    ax.imshow(grid_categories(grid).numpy(), cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(f"key block ({grid.block_size} tokens)")
    ax.set_ylabel(f"query block ({grid.block_size} tokens)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#41ab5d", label="selected (darker: by more queries)"), Patch(color="#c51b8a", label="own block"),
                       Patch(color="#9ecae1", label="sliding window"), Patch(color="#e0e0e0", label="future")],
              loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120), overwrite=overwrite)
    finally:
        plt.close(fig)


@cli_errors
def visualize_selection(
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset (default: tiny)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config JSON file."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="An nsa .safetensors file (config included)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Length of the random input."),
    head: int = typer.Option(0, "--head", help="Head of the selection (a kv head when query heads share it)."),
    batch_index: int = typer.Option(0, "--batch", help="Which batch element to show."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="An input tensor (batch, seq, dim): .pt or .safetensors (key 'input')."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights and input."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write .png, .svg or .html instead of the terminal."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    as_json: bool = typer.Option(False, "--json", help="Selected key blocks per query block, as JSON."),
) -> None:
    """Show which key blocks each query block selected, the own block, the window band and the causal edge."""
    check_int("--seq-len", seq_len)
    check_int("--head", head, minimum=0)
    check_int("--batch", batch_index, minimum=0)
    check_seed(seed)
    for option, path in (("weights file", weights), ("input file", input_file)):
        if path is not None:
            check_input_file(path, option)
    if output is not None:
        if output.suffix.lower() not in (".png", ".svg", ".html"):
            raise UsageError(f"-o must end in .png, .svg or .html, got {output.name!r}")
        check_output_path(output, force)
    if weights is not None:
        if preset or config:
            raise UsageError("give --weights or --preset/--config, not both (the weights file holds its config)")
        module = load_safetensors(weights)
        cfg = module.config
    else:
        cfg = resolve_config(preset, config, default_preset="tiny")
        module = build_module(cfg, seed=seed)
        _randomize_for_display(module, seed)
    if input_file is not None:
        inp = load_input_file(input_file, cfg.dim)
    else:
        check_input_size(cfg, batch_index + 1, seq_len)
        inp = random_input(cfg.dim, seq_len, batch=max(1, batch_index + 1), seed=seed)
    grid = selection_grid(module, inp, head=head, batch_index=batch_index)
    title = (f"selection of head {head}, batch {batch_index}: seq {inp.shape[1]}, blocks of {cfg.selection_block_size}, "
             f"{cfg.num_selected_blocks} selected, window {cfg.sliding_window_size}")
    if as_json:
        print_json({"title": title, "block_size": cfg.selection_block_size, "head": head, "batch": batch_index,
                    "selected_key_blocks_per_query_block": {str(i): s for i, s in enumerate(grid.selected_per_query_block)},
                    "query_counts": grid.counts.tolist(), "sparsity": grid.sparsity})
        return
    if output is None:
        for line in render_grid(grid, title, console.width):
            console.print(line)
        return
    if output.suffix.lower() == ".png":
        _save_png(grid, title, output, force)
    else:
        recorder = Console(record=True, width=max(40, grid.counts.shape[0] + 20), file=io.StringIO(), force_terminal=True)
        for line in render_grid(grid, title, 10_000):
            recorder.print(line)
        text = recorder.export_svg(title="nsa visualize-selection") if output.suffix.lower() == ".svg" else recorder.export_html()
        write_atomically(output, lambda f: f.write(text.encode()), overwrite=force)
    err_console.print(f"wrote {output}")


def _randomize_for_display(module, seed: int) -> None:
    """Fresh modules have zero memory tokens and positions; random ones show a livelier selection."""
    from nsa_cli.support.checks import randomize_parameters

    randomize_parameters(module, seed, std=0.3)
