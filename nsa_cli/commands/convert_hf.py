"""`nsa convert SRC DST --from hf`: a dense Hugging Face Llama / Mistral / Qwen2 folder into an NSA model
folder (nsa_core.hf.convert_dense); renders the report, computes nothing itself."""

from __future__ import annotations

from pathlib import Path

from nsa_cli.support.common import UsageError, console, parse_field_options, print_json
from nsa_cli.support.progress import progress

NSA_FIELDS = ("sliding_window_size", "compress_block_size", "compress_block_sliding_stride", "selection_block_size",
              "num_selected_blocks", "num_compressed_mem_kv", "use_diff_topk", "query_heads_share_selected_kv",
              "interpolated_importance_score", "compress_mlp_expand_factor", "backend")
HF_OPTIONS = {"--gate": "combine_gate", "--gate-bias": "gate_bias", "--dense-layers": "dense_layers",
              "--max-shard-size": "max_shard_size"}
HELP = ("--from hf options: the NSA fields (--sliding-window-size 512 --compress-block-size 32 "
        "--compress-block-sliding-stride 16 --selection-block-size 64 --num-selected-blocks 16 ...), "
        "--gate linear|sigmoid, --gate-bias 16, --dense-layers 0,5, --max-shard-size 5GB, --verify/--no-verify")


def split_options(args: list[str]) -> tuple[dict, list[str], bool]:
    """(HF-only options, the NSA field options left, verify)."""
    options, rest, verify, i = {}, [], True, 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if key in ("--verify", "--no-verify"):
            if eq:
                raise UsageError(f"{key} is a flag and takes no value")
            verify, i = key == "--verify", i + 1
            continue
        if key in HF_OPTIONS:
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise UsageError(f"option {key} needs a value")
                value, i = args[i + 1], i + 1
            options[HF_OPTIONS[key]] = value
        else:
            rest.append(args[i])
        i += 1
    if "gate_bias" in options:
        try:
            options["gate_bias"] = float(options["gate_bias"])
        except ValueError:
            raise UsageError(f"--gate-bias must be a number, got {options['gate_bias']!r}") from None
    if "dense_layers" in options:
        try:
            options["dense_layers"] = [int(p) for p in options["dense_layers"].split(",") if p.strip()]
        except ValueError:
            raise UsageError(f"--dense-layers must be comma-separated layer indices, got {options['dense_layers']!r}") from None
    return options, rest, verify


def convert_from_hf(src: Path, dst: Path, args: list[str], force: bool, as_json: bool) -> None:
    try:
        from nsa_core.hf.convert_dense import compare_with_dense, convert_dense
    except ImportError as err:
        raise UsageError(f"--from hf needs transformers: pip install 'nsa[hf]' ({err})") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this command shows its own progress
    options, rest, verify = split_options(args)
    fields = parse_field_options(rest)
    foreign = sorted(set(fields) - set(NSA_FIELDS))
    if foreign:
        raise UsageError(f"--from hf takes the source's {', '.join('--' + f.replace('_', '-') for f in foreign)}; "
                         f"{HELP}")
    shard = options.pop("max_shard_size", "5GB")
    with progress("nsa convert", total=None, enabled=not as_json) as bar:
        report = convert_dense(src, dst, overwrite=force, max_shard_size=shard,
                               on_progress=lambda what: bar.update(what=f"convert: {what}"), **options, **fields)
        error = None
        if verify:
            bar.update(what="convert: comparing with the dense model")
            error = compare_with_dense(src, report["model"])
    cfg = report["config"]
    if as_json:
        print_json({"output": str(dst), "from": "hf", "config": cfg, "source_tensors": report["source_tensors"],
                    "parameters": report["parameters"], "new_parameters": report["new_parameters"],
                    "dense_relative_error": error})
        return
    console.print(f"wrote {dst}: NSA model of {cfg['num_hidden_layers']} layers, {report['parameters']:,} parameters "
                  f"({report['new_parameters']:,} new: compression and gates); all {report['source_tensors']} source "
                  "tensors accounted for")
    if error is not None:
        console.print(f"logits vs the dense model on {min(cfg['sliding_window_size'] + 1, 64)} random tokens "
                      f"(within the window): relative error {error:.2e}")
