"""`nsa visualize-selection`: the query-block x key-block picture of one head's selection, in the
terminal, as PNG / SVG / HTML, or as JSON (nsa_cli/support/selection_picture.py builds it)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from nsa_cli.support.analysis import random_row
from nsa_cli.support.common import (
    UsageError, check_input_size, check_int, check_seed, cli_errors, console, err_console, print_json,
    resolve_config,
)
from nsa_cli.support.inputs import build_module, load_input_file
from nsa_cli.support.outputs import check_output
from nsa_cli.support.progress import progress
from nsa_cli.support.selection_picture import SelectionPicture, check_head, selection_picture
from nsa_core.checkpoint.files import check_input_file
from nsa_core.checkpoint.safetensors import load_safetensors

UNICODE = dict(cells=[" ", "·", "░", "■", "█", "█", "█"], blank="␣", arrow="→")
ASCII = dict(cells=[" ", ".", ":", "o", "#", "#", "#"], blank="_", arrow="->")  # terminals that cannot show the others
STYLES = ["", "grey50", "blue", "magenta", "green", "green3", "bright_green"]
MEANINGS = ["not attended", "future (causal edge)", "sliding window reach", "own block (causal)",
            "selected (brighter: more queries of the block)"]
PNG_COLORS = ["white", "#e0e0e0", "#9ecae1", "#c51b8a", "#a1d99b", "#41ab5d", "#005a32"]
PNG_CELLS = 128  # cells per side of a PNG (about 5 pixels each): own block and window stay visible
DOCUMENT_CELLS = 400  # of an SVG / HTML page
FORMATS = (".png", ".svg", ".html")


def glyphs_for(encoding: str | None) -> dict:
    """Unicode glyphs where the output encoding can show them, ASCII otherwise (latin-1, ascii)."""
    try:
        "".join(UNICODE["cells"] + [UNICODE["blank"], UNICODE["arrow"]]).encode(encoding or "utf-8")
        return UNICODE
    except (UnicodeEncodeError, LookupError):
        return ASCII


def render_picture(picture: SelectionPicture, title: str, glyphs: dict = UNICODE) -> list[Text]:
    cells = glyphs["cells"]
    lines = [Text(title, style="bold")]
    f = picture.factor
    if f > 1:
        lines.append(Text(f"(scaled down: each cell is {f} x {f} blocks)", style="italic"))
    lines.append(Text(f"query block \\ key block {glyphs['arrow']}"))
    for i, row in enumerate(picture.categories().tolist()):
        line = Text(f"{i * f:>6} ")
        for cat in row:
            line.append(cells[cat], style=STYLES[cat] or None)
        lines.append(line)
    legend = Text("legend: ")
    for cat in (6, 3, 2, 1, 0):  # selected first; the three selected shades share one entry
        legend.append(cells[cat] if cells[cat] != " " else glyphs["blank"], style=STYLES[cat] or None)
        legend.append(f" {MEANINGS[min(cat, 4)]}  ")
    lines.append(legend)
    lines.append(Text("sparsity (fraction of query-key pairs): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in picture.sparsity.items())))
    return lines


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or the UsageError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("PNG output needs matplotlib: pip install 'nsa[plot]' (or use .svg / .html)") from None
    return plt


def _png_bytes(picture: SelectionPicture, title: str) -> bytes:
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    cmap, norm = ListedColormap(PNG_COLORS), BoundaryNorm([x - 0.5 for x in range(len(PNG_COLORS) + 1)], len(PNG_COLORS))
    fig, ax = plt.subplots(figsize=(7, 6.5))
    try:
        ax.imshow(picture.categories().numpy(), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        unit = f"{picture.block_size} tokens" + (f", {picture.factor} blocks per cell" if picture.factor > 1 else "")
        ax.set_xlabel(f"key block ({unit})")
        ax.set_ylabel(f"query block ({unit})")
        ax.legend(handles=[Patch(color="#41ab5d", label="selected (darker: by more queries)"),
                           Patch(color="#c51b8a", label="own block"), Patch(color="#9ecae1", label="sliding window"),
                           Patch(color="#e0e0e0", label="future")], loc="upper right", fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _document_bytes(picture: SelectionPicture, title: str, suffix: str) -> bytes:
    width = max(40, picture.counts.shape[0] + 20)
    recorder = Console(record=True, width=width, file=io.StringIO(), force_terminal=True)
    for line in render_picture(picture, title):
        recorder.print(line)
    text = recorder.export_svg(title="nsa visualize-selection") if suffix == ".svg" else recorder.export_html()
    return text.encode()


@cli_errors
def visualize_selection(
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset (default: tiny)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config JSON file."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="An nsa .safetensors file (config included)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Length of the random input."),
    head: int = typer.Option(0, "--head", help="Head of the selection (a kv head when query heads share it)."),
    batch_index: int = typer.Option(0, "--batch", help="Which row to show: of --input, or of the random input (only that row is made)."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="An input tensor (batch, seq, dim): .pt or .safetensors (key 'input')."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights and input."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write .png, .svg or .html instead of the terminal."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    as_json: bool = typer.Option(False, "--json", help="Selected key blocks per query block, as JSON (with -o: the file too)."),
) -> None:
    """Show which key blocks each query block selected, the own block, the window band and the causal edge."""
    check_int("--seq-len", seq_len)
    check_int("--head", head, minimum=0)
    check_int("--batch", batch_index, minimum=0)
    check_seed(seed)
    for option, path in (("weights file", weights), ("input file", input_file)):
        if path is not None:
            check_input_file(path, option)
    suffix = None
    if output is not None:
        suffix = output.suffix.lower()
        if str(output) == "-" or suffix not in FORMATS:
            raise UsageError(f"-o must be a file ending in .png, .svg or .html, got {output.name or str(output)!r}")
        destination = check_output(output, force)
        if suffix == ".png":
            _pyplot()  # matplotlib missing: say so now, not after the work
    if weights is not None and (preset or config):
        raise UsageError("give --weights or --preset/--config, not both (the weights file holds its config)")
    module = load_safetensors(weights) if weights is not None else None  # checks the file completely
    cfg = module.config if module is not None else resolve_config(preset, config, default_preset="tiny")
    check_head(cfg, head)
    with progress("nsa visualize-selection", total=None, enabled=not as_json) as bar:
        if module is None:
            bar.update(what="visualize: building the module")
            module = build_module(cfg, seed=seed)
            _randomize_for_display(module, seed)
        if input_file is not None:
            inp = load_input_file(input_file, cfg.dim)
            if batch_index >= inp.shape[0]:
                raise UsageError(f"--batch must be in [0, {inp.shape[0] - 1}] (rows of {str(input_file)!r}), got {batch_index}")
            row = inp[batch_index : batch_index + 1]
        else:
            check_input_size(cfg, 1, seq_len)
            row = random_row(cfg.dim, seq_len, seed=seed, index=batch_index)
        bar.update(what=f"visualize: selecting blocks of {row.shape[1]} tokens")
        cells = {".png": PNG_CELLS, ".svg": DOCUMENT_CELLS, ".html": DOCUMENT_CELLS}.get(suffix, max(8, console.width - 12))
        picture = selection_picture(module, row, head, cells)
        title = (f"selection of head {head}, batch {batch_index}: seq {row.shape[1]}, blocks of {cfg.selection_block_size}, "
                 f"{cfg.num_selected_blocks} selected, window {cfg.sliding_window_size}")
        if output is not None:
            bar.update(what=f"visualize: writing {output.name}")
            data = _png_bytes(picture, title) if suffix == ".png" else _document_bytes(picture, title, suffix)
            destination.write_bytes(data)
    if as_json:
        print_json({"title": title, "block_size": cfg.selection_block_size, "head": head, "batch": batch_index,
                    "seq_len": row.shape[1], "output": None if output is None else str(output),
                    "selected_key_blocks_per_query_block": {str(q): [k for k, _ in picture.selected.get(q, [])]
                                                            for q in range(picture.num_blocks)},
                    "queries_per_selected_key_block": {str(q): [c for _, c in picture.selected.get(q, [])]
                                                       for q in range(picture.num_blocks)},
                    "sparsity": picture.sparsity})
    elif output is None:
        for line in render_picture(picture, title, glyphs_for(console.encoding)):
            console.print(line)
    if output is not None and not as_json:
        err_console.print(f"wrote {output}", markup=False, soft_wrap=True)


def _randomize_for_display(module, seed: int) -> None:
    """Fresh modules have zero memory tokens and positions; random ones show a livelier selection."""
    from nsa_cli.support.checks import randomize_parameters

    randomize_parameters(module, seed, std=0.3)
