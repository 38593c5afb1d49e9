"""Input files the CLI reads: a module built from a config (and optional torch.save weights), and
an input tensor from a .pt or .safetensors file. The oracle comparison of a converted checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from nsa_cli.support.checks import max_relative_error
from nsa_core.checkpoint.files import check_input_file
from nsa_core.checkpoint.lucidrains import load_state_dict_file
from nsa_core.checkpoint.safetensors import read_tensors
from nsa_core.checkpoint.state import load_strictly
from nsa_core.config import NSAConfig
from nsa_core.model.attention import SparseAttention


def build_module(cfg: NSAConfig, weights: str | Path | None = None, seed: int = 0) -> SparseAttention:
    """A module of this config: its initial weights (seeded), or the given state dict loaded strictly."""
    torch.manual_seed(seed)
    module = SparseAttention.from_config(cfg)
    if weights is not None:
        load_strictly(module, load_state_dict_file(weights), repr(str(weights)))
    return module


def load_input_file(path: str | Path, dim: int) -> torch.Tensor:
    """An input tensor (batch, seq, dim) from a .pt file or a .safetensors file (key 'input')."""
    path = check_input_file(path, "input file")
    if path.suffix == ".safetensors":
        tensors = read_tensors(path)
        if "input" not in tensors:
            raise ValueError(f"{str(path)!r} has no tensor named 'input' (has {sorted(tensors)[:5]})")
        x = tensors["input"]
    else:
        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{str(path)!r} is not a loadable tensor file ({type(err).__name__})") from None
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != dim or not x.dtype.is_floating_point:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input must be a floating tensor of shape (batch, seq, dim={dim}), got {shape}")
    return x.float()


def compare_with_oracle(module: SparseAttention, state: dict) -> float | None:
    try:
        import native_sparse_attention_pytorch as oracle
    except ImportError:
        return None
    cfg = module.config
    kwargs = {k: v for k, v in cfg.to_dict().items() if k not in ("backend", "interpolated_importance_score")}
    kwargs["compress_block_sliding_stride"] = cfg.stride
    theirs = oracle.SparseAttention(**kwargs)
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(1, max(3 * cfg.selection_block_size, 2 * cfg.compress_block_size) + 5, cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return max_relative_error(module(x), theirs(x))
