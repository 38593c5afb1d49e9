"""`nsa convert`: native-sparse-attention-pytorch checkpoints to nsa safetensors and back."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nsa_cli.support.common import UsageError, check_output_path, cli_errors, console, parse_field_options
from nsa_core.config import NSAConfig
from nsa_cli.support.inputs import compare_with_oracle
from nsa_core.checkpoint.lucidrains import convert_from_lucidrains, convert_to_lucidrains


@cli_errors
def convert(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help="Source checkpoint."),
    dst: Path = typer.Argument(..., help="Destination file."),
    from_format: Optional[str] = typer.Option(None, "--from", help="lucidrains: SRC is a native-sparse-attention-pytorch state dict (.pt)."),
    to_format: Optional[str] = typer.Option(None, "--to", help="lucidrains: SRC is an nsa .safetensors, DST a state dict (.pt)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config JSON giving the arguments the shapes cannot tell."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing DST."),
) -> None:
    """Convert a checkpoint; constructor arguments the shapes cannot tell come from --config or flags
    named after them (--causal true --sliding-window-size 64 --compress-block-sliding-stride 16 ...)."""
    if (from_format is None) == (to_format is None):
        raise UsageError("give exactly one of --from lucidrains or --to lucidrains")
    if (from_format or to_format) != "lucidrains":
        raise UsageError(f"the only checkpoint format known is 'lucidrains', got {from_format or to_format!r}")
    check_output_path(dst, force)
    if to_format:
        n = convert_to_lucidrains(src, dst, overwrite=force)
        console.print(f"wrote {dst}: {n} tensors (load with native_sparse_attention_pytorch.SparseAttention(...).load_state_dict)")
        return
    given = parse_field_options(list(ctx.args))
    if config is not None:
        given = {**NSAConfig.load(config).to_dict(), **given}
    report = convert_from_lucidrains(src, dst, given, overwrite=force)
    console.print(f"wrote {dst}: config inferred {report['inferred']}, loads into nsa SparseAttention (strict)")
    error = compare_with_oracle(report["module"], report["state"])
    if error is None:
        console.print("native-sparse-attention-pytorch is not installed: outputs not compared")
    else:
        console.print(f"output vs native-sparse-attention-pytorch on a random input: relative error {error:.2e}")
