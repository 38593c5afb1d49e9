"""Input files the CLI reads: a module built from a config (and optional torch.save weights), and
an input tensor from a .pt or .safetensors file. The oracle comparison of a converted checkpoint."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from nsa_cli.support.checks import max_relative_error
from nsa_core.checkpoint.files import check_input_file
from nsa_core.checkpoint.lucidrains import load_state_dict_file, oracle_arguments
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


PROBE_TOKENS = 261  # the longest probe the oracle comparison runs (odd; seconds on a CPU)


@dataclass
class OracleComparison:
    """The converted module against native-sparse-attention-pytorch on a short random probe:
    relative_error, or None with the reason it was not compared."""

    relative_error: float | None
    probe_tokens: int
    reason: str = ""

    def line(self) -> str:
        if self.relative_error is None:
            return f"not compared with native-sparse-attention-pytorch: {self.reason}"
        return (f"output vs native-sparse-attention-pytorch on a random {self.probe_tokens}-token probe: "
                f"relative error {self.relative_error:.2e}")


def _not_comparable(cfg: NSAConfig) -> str:
    if cfg.selection_block_size > PROBE_TOKENS:
        return (f"selection blocks of {cfg.selection_block_size} tokens are longer than the "
                f"{PROBE_TOKENS}-token probe the comparison can afford")
    if cfg.selection_block_size < cfg.stride:
        return "its 0.2.3 has no selection blocks smaller than the compression stride"
    if cfg.interpolated_importance_score:
        return "its 0.2.3 has no interpolated_importance_score"
    return ""


def compare_with_oracle(module: SparseAttention, state: dict) -> OracleComparison:
    """Bounded (a probe of at most PROBE_TOKENS tokens), silent (the oracle's prints are captured),
    and never raising: a configuration the oracle cannot run is reported as not compared."""
    cfg = module.config
    n = min(max(3 * cfg.selection_block_size, 2 * cfg.compress_block_size) + 5, PROBE_TOKENS)
    reason = _not_comparable(cfg)
    if reason:
        return OracleComparison(None, n, reason)
    try:
        import native_sparse_attention_pytorch as oracle
    except ImportError:
        return OracleComparison(None, n, "it is not installed")
    kwargs = oracle_arguments(cfg)
    x = torch.randn(1, n, cfg.dim, generator=torch.Generator().manual_seed(0))
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), torch.no_grad():
            theirs = oracle.SparseAttention(**kwargs)
            theirs.load_state_dict(state, strict=True)
            return OracleComparison(max_relative_error(module(x), theirs(x)), n)
    except Exception as err:  # the third-party oracle's own failure: reported, never a traceback
        first = (str(err).splitlines() or [""])[0][:200]
        return OracleComparison(None, n, f"it cannot run this config ({type(err).__name__}{': ' + first if first else ''})")
