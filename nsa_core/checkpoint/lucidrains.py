"""Conversion between native-sparse-attention-pytorch (0.2.3) checkpoints and nsa, both ways
(state dicts in memory, and files: a torch.save state dict <-> an nsa safetensors file).

nsa keeps the oracle's parameter names, so a state dict converts as is (a copy); what needs
work is recovering the constructor arguments from the tensor shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from nsa_core.checkpoint.files import check_destination, check_input_file, write_atomically
from nsa_core.checkpoint.safetensors import load_safetensors, save_safetensors
from nsa_core.checkpoint.state import load_strictly
from nsa_core.config import NSAConfig
from nsa_core.model.attention import SparseAttention

REQUIRED_KEYS = ("to_qkv.weight", "compress_mem_kv", "k_intrablock_positions", "combine_heads.weight")
# the tensors whose shapes tell the constructor arguments: their number of dimensions
INFERENCE_NDIMS = {"to_qkv.weight": 2, "compress_mem_kv": 4, "k_intrablock_positions": 3, "combine_heads.weight": 2,
                   "k_compress.1.weight": 2, "k_compress.3.weight": 2}
# arguments the tensor shapes cannot tell
NOT_INFERABLE = ("causal", "sliding_window_size", "compress_block_sliding_stride", "selection_block_size", "num_selected_blocks")


def oracle_cannot_build(arguments: dict) -> str | None:
    """Why native-sparse-attention-pytorch 0.2.3 cannot build a module of these constructor arguments
    (so no checkpoint of it has them), or None. Arguments not (yet) known are not judged."""
    if arguments.get("interpolated_importance_score") is True:
        return ("native-sparse-attention-pytorch 0.2.3 has no interpolated_importance_score: its checkpoints "
                "convert with interpolated_importance_score off")
    sel = arguments.get("selection_block_size")
    stride = arguments.get("compress_block_sliding_stride") or arguments.get("compress_block_size")
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (sel, stride))
    if ints and sel % stride:
        return (f"native-sparse-attention-pytorch 0.2.3 needs selection_block_size to be a multiple of the compression "
                f"stride, so none of its checkpoints has selection_block_size {sel} with stride {stride}")
    return None


def _check_state_dict(state_dict: dict) -> None:
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError("checkpoint must be a state dict (a dict of tensors), as saved by torch.save(module.state_dict())")
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"checkpoint is not a SparseAttention state dict: missing {missing}")
    for name, ndim in INFERENCE_NDIMS.items():
        t = state_dict.get(name)
        if t is not None and (t.ndim != ndim or 0 in t.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {list(t.shape)}: a SparseAttention's has {ndim} "
                             "non-empty dimensions")
    if state_dict["compress_mem_kv"].shape[0] != 2:
        raise ValueError(f"checkpoint tensor compress_mem_kv has shape {list(state_dict['compress_mem_kv'].shape)}: "
                         "its first dimension holds keys and values (2)")


def from_lucidrains(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A native-sparse-attention-pytorch SparseAttention state dict -> one our module loads strictly."""
    _check_state_dict(state_dict)
    return {k: v.clone() for k, v in state_dict.items()}


def to_lucidrains(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> one native-sparse-attention-pytorch 0.2.3 loads strictly."""
    _check_state_dict(state_dict)
    return {k: v.clone() for k, v in state_dict.items()}


# NSAConfig fields that native-sparse-attention-pytorch 0.2.3's constructor does not take
NOT_ORACLE_ARGUMENTS = ("backend", "interpolated_importance_score", "independent_kv", "gate_biases",
                        "num_forced_initial_blocks", "num_forced_local_blocks", "importance_score",
                        "selected_key_slots")


def oracle_arguments(cfg: NSAConfig) -> dict[str, Any]:
    """The constructor arguments of the oracle's SparseAttention equal to ours of cfg (gate_biases
    only initialise weights, which a checkpoint carries); check_oracle_can_run first."""
    check_oracle_can_run(cfg)
    kwargs = {k: v for k, v in cfg.to_dict().items() if k not in NOT_ORACLE_ARGUMENTS}
    kwargs["compress_block_sliding_stride"] = cfg.stride
    return kwargs


def check_oracle_can_run(cfg: NSAConfig) -> None:
    """A ValueError when cfg uses a paper option native-sparse-attention-pytorch 0.2.3 does not have."""
    beyond = [name for name, value in (("independent_kv", cfg.independent_kv),
                                       ("num_forced_initial_blocks", cfg.num_forced_initial_blocks),
                                       ("num_forced_local_blocks", cfg.num_forced_local_blocks),
                                       (f"importance_score={cfg.importance_score!r}", cfg.importance_score != "mean_logits"),
                                       ("selected_key_slots", cfg.selected_key_slots))
              if value]
    if beyond:
        raise ValueError(f"native-sparse-attention-pytorch has no {', '.join(beyond)}: a module using "
                         f"{'it' if len(beyond) == 1 else 'them'} cannot be converted to or from its format")


def infer_config(state_dict: dict[str, torch.Tensor], **given: Any) -> NSAConfig:
    """Recover the constructor arguments from the shapes; `given` supplies the ones shapes cannot
    tell (causal, sliding_window_size, compress_block_sliding_stride, selection_block_size,
    num_selected_blocks) and may override any other."""
    if given.get("importance_score", "mean_logits") != "mean_logits":
        raise ValueError("native-sparse-attention-pytorch scores blocks by mean logits only: importance_score "
                         f"must be 'mean_logits' for its checkpoints, got {given['importance_score']!r}")
    for name in ("independent_kv", "num_forced_initial_blocks", "num_forced_local_blocks", "selected_key_slots"):
        if given.get(name):
            raise ValueError(f"native-sparse-attention-pytorch has no {name}: a checkpoint of it cannot take one")
    _check_state_dict(state_dict)
    kv_heads, block, dim_head = state_dict["k_intrablock_positions"].shape
    qkv_out, dim = state_dict["to_qkv.weight"].shape
    heads = (qkv_out - 2 * kv_heads * dim_head) // dim_head
    if heads < 1 or (qkv_out - 2 * kv_heads * dim_head) % dim_head:
        raise ValueError(f"to_qkv.weight shape {tuple(state_dict['to_qkv.weight'].shape)} fits no head layout")
    inferred: dict[str, Any] = dict(
        dim=int(dim), dim_head=int(dim_head), heads=int(heads), kv_heads=int(kv_heads),
        compress_block_size=int(block), num_compressed_mem_kv=int(state_dict["compress_mem_kv"].shape[2]),
        norm="norm.weight" in state_dict,
    )
    hidden = state_dict.get("k_compress.1.weight")
    if hidden is None or "k_compress.3.weight" not in state_dict:
        raise ValueError("only checkpoints with the default compression MLP can be converted (k_compress.1/3 missing)")
    inferred["compress_mlp_expand_factor"] = float(hidden.shape[0]) / float(block * dim_head)
    missing = [name for name in NOT_INFERABLE if name not in given]
    if missing:
        raise ValueError(f"the checkpoint cannot tell {missing}: give them (CLI: --{missing[0].replace('_', '-')} ...)")
    inferred.update(given)
    reason = oracle_cannot_build(inferred)
    if reason:
        raise ValueError(reason)
    try:
        return NSAConfig(**inferred)
    except (ValueError, TypeError) as err:
        raise ValueError(f"the checkpoint's shapes give no valid config ({err})") from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, loaded with weights_only=True (no code runs)."""
    path = check_input_file(path, "checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"{str(path)!r} is not a loadable state dict ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a dict of tensors)")
    return state


def convert_from_lucidrains(src: str | Path, dst: str | Path, given: dict, overwrite: bool = False,
                            on_progress: Callable[[int, int], None] | None = None) -> dict:
    """native-sparse-attention-pytorch state dict (.pt) -> nsa safetensors. Returns the config, what
    was inferred, and the module (the CLI compares it with the oracle where that package is installed).
    on_progress(bytes written, total) follows the write."""
    check_destination(dst, overwrite)
    reason = oracle_cannot_build(given)  # before reading the checkpoint, where the arguments tell already
    if reason:
        raise ValueError(reason)
    state = load_state_dict_file(src)
    cfg = infer_config(state, **given)
    module = SparseAttention.from_config(cfg)
    load_strictly(module, from_lucidrains(state), f"checkpoint {str(src)!r}")
    inferred = {k: v for k, v in cfg.to_dict().items() if k not in given}
    save_safetensors(module, dst, overwrite=overwrite, on_progress=on_progress)
    return {"config": cfg.to_dict(), "inferred": inferred, "module": module, "state": state}


def convert_to_lucidrains(src: str | Path, dst: str | Path, overwrite: bool = False) -> int:
    """nsa safetensors -> a state dict (.pt) native-sparse-attention-pytorch loads strictly."""
    check_destination(dst, overwrite)
    module = load_safetensors(src)
    check_oracle_can_run(module.config)
    state = to_lucidrains(module.state_dict())
    write_atomically(dst, lambda f: torch.save(state, f), overwrite=overwrite)
    return len(state)
