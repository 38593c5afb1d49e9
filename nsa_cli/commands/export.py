"""`nsa export`: write a module's weights and config to safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nsa_cli.support.common import check_output_path, cli_errors, console, resolve_config
from nsa_cli.support.inputs import build_module
from nsa_core.checkpoint.safetensors import save_safetensors


@cli_errors
def export(
    output: Path = typer.Option(..., "-o", "--output", help="The .safetensors file to write."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset (default: seeds)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config JSON file."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A state dict saved with torch.save (.pt)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights when --weights is not given."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write the module's weights with its config in the safetensors metadata."""
    check_output_path(output, force)
    cfg = resolve_config(preset, config)
    module = build_module(cfg, weights=weights, seed=seed)
    save_safetensors(module, output, overwrite=force)
    n = sum(p.numel() for p in module.parameters())
    console.print(f"wrote {output}: {n:,} parameters")
