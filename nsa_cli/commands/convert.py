"""`nsa convert`: native-sparse-attention-pytorch checkpoints to nsa safetensors and back; Hugging Face dense
Llama-family folders to NSA model folders (--from hf, commands/convert_hf.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nsa_cli.support.common import (
    UsageError, cli_errors, config_options_help, console, err_console, load_config_file, parse_field_options, print_json,
)
from nsa_cli.commands.convert_hf import HELP as HF_HELP
from nsa_cli.commands.convert_hf import convert_from_hf
from nsa_cli.support.inputs import compare_with_oracle
from nsa_cli.support.outputs import check_output, same_file
from nsa_cli.support.progress import progress
from nsa_core.checkpoint.files import check_input_file
from nsa_core.checkpoint.lucidrains import convert_from_lucidrains, convert_to_lucidrains


@cli_errors
def convert(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help="Source checkpoint."),
    dst: Path = typer.Argument(..., help="Destination file."),
    from_format: Optional[str] = typer.Option(None, "--from", help="lucidrains: SRC is a native-sparse-attention-pytorch state dict (.pt); hf: SRC is a Hugging Face Llama / Mistral / Qwen2 folder, DST the NSA model folder."),
    to_format: Optional[str] = typer.Option(None, "--to", help="lucidrains: SRC is an nsa .safetensors, DST a state dict (.pt)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config JSON giving the arguments the shapes cannot tell."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing DST."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Convert a checkpoint; constructor arguments the shapes cannot tell come from --config or options
    named after them (--causal/--no-causal --sliding-window-size 64 --compress-block-sliding-stride 16 ...)."""
    if (from_format is None) == (to_format is None):
        raise UsageError("give exactly one of --from lucidrains / --from hf or --to lucidrains")
    if from_format == "hf":
        if config is not None:
            raise UsageError("--from hf reads the source's config.json; give NSA options instead of --config")
        return convert_from_hf(src, dst, list(ctx.args), force, as_json)
    if (from_format or to_format) != "lucidrains":
        raise UsageError(f"checkpoint formats known: --from lucidrains, --from hf, --to lucidrains; got {from_format or to_format!r}")
    check_input_file(src, "checkpoint")
    if same_file(src, dst):
        raise UsageError(f"SRC and DST are the same file ({str(src)!r}); give another DST")
    destination = check_output(dst, force, option="DST")
    if to_format:
        if ctx.args or config is not None:
            raise UsageError("config options apply to --from lucidrains only (an nsa file holds its config)")
        with progress("nsa convert", total=None, enabled=not as_json) as bar:
            bar.update(what=f"convert: {src.name} -> {dst.name}")
            n = convert_to_lucidrains(src, destination.path, overwrite=True)
        if as_json:
            print_json({"output": str(dst), "to": "lucidrains", "tensors": n})
        else:
            err_console.print(f"wrote {dst}: {n} tensors (load with native_sparse_attention_pytorch.SparseAttention(...)"
                              ".load_state_dict)", markup=False, soft_wrap=True)
        return
    given = parse_field_options(list(ctx.args))
    if config is not None:
        given = {**load_config_file(config).to_dict(), **given}
    with progress("nsa convert", total=None, enabled=not as_json) as bar:
        bar.update(what=f"convert: reading {src.name}")
        report = convert_from_lucidrains(src, destination.path, given, overwrite=True,
                                         on_progress=lambda done, total: bar.update(done, f"convert: writing {dst.name}", total))
        bar.update(what="convert: comparing with native-sparse-attention-pytorch")
        oracle = compare_with_oracle(report["module"], report["state"])
    if as_json:
        print_json({"output": str(dst), "from": "lucidrains", "config": report["config"], "inferred": report["inferred"],
                    "oracle_relative_error": oracle.relative_error, "oracle_probe_tokens": oracle.probe_tokens,
                    "oracle_not_compared": oracle.reason or None})
        return
    inferred = ", ".join(f"{k}={v}" for k, v in report["inferred"].items())
    err_console.print(f"wrote {dst}: loads into nsa SparseAttention (strict)", markup=False, soft_wrap=True)
    console.print(f"inferred from the shapes: {inferred}", markup=False, soft_wrap=True)
    console.print(oracle.line(), markup=False, soft_wrap=True)


convert.__doc__ += f"\n\nConfig options: {config_options_help()}.\n\n{HF_HELP}."
