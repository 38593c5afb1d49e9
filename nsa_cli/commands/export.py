"""`nsa export`: write a module's weights and config to safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nsa_cli.support.common import check_seed, cli_errors, err_console, human_bytes, print_json, resolve_config
from nsa_cli.support.inputs import build_module
from nsa_cli.support.outputs import check_output
from nsa_cli.support.progress import progress
from nsa_core.checkpoint.files import check_input_file
from nsa_core.checkpoint.safetensors import save_safetensors


@cli_errors
def export(
    output: Path = typer.Option(..., "-o", "--output", help="The .safetensors file to write."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset (default: seeds)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config JSON file."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A state dict saved with torch.save (.pt)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights when --weights is not given."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Write the module's weights with its config in the safetensors metadata (atomically)."""
    check_seed(seed)
    destination = check_output(output, force)
    if weights is not None:
        check_input_file(weights, "weights file")
    cfg = resolve_config(preset, config)
    with progress("nsa export", total=None, enabled=not as_json) as bar:
        bar.update(what="export: building the module")
        module = build_module(cfg, weights=weights, seed=seed)
        size = save_safetensors(module, destination.path, overwrite=True,
                                on_progress=lambda done, total: bar.update(done, f"export: writing {output.name}", total))
    n = sum(p.numel() for p in module.parameters())
    if as_json:
        print_json({"output": str(output), "parameters": n, "bytes": size, "config": cfg.to_dict()})
    else:
        err_console.print(f"wrote {output}: {n:,} parameters, {human_bytes(size)}", markup=False, soft_wrap=True)
