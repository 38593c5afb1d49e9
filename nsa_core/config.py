"""NSAConfig: every plain-data argument of SparseAttention, its validation and JSON round trip.

The module and the CLI both validate through `validate_config`, so a bad argument raises
the same ValueError/TypeError (naming the argument and what is allowed) wherever it comes from.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from nsa_core.limits import MAX_CONFIG_BYTES, MAX_SIZE, SIZE_RULE, check_elements, parse_json

BACKENDS = ("auto", "torch", "triton")
# the oracle's initial gate biases (compressed, selected, sliding): sigmoid 0.12 / 0.12 / 0.88
DEFAULT_GATE_BIASES = (-2.0, -2.0, 2.0)
IMPORTANCE_SCORES = ("mean_logits", "summed_probs", "selected_keys")


@dataclass(frozen=True)
class NSAConfig:
    """Constructor arguments of `SparseAttention` that are plain data.

    `compress_block_sliding_stride=None` means `compress_block_size` (no overlap between
    compression windows). `kv_heads=None` means `heads` (no grouped-query sharing).

    The paper's options (defaults: native-sparse-attention-pytorch 0.2.3's behaviour):
    - `independent_kv`: each branch (compressed, selected, sliding window) reads its own key and
      value projection (paper section 3.3.3), instead of one shared by the three. Without it the
      window's gradients shape the keys the long-range branches must learn from
      (benchmarks/NOTES.md, "Does NSA learn retrieval?").
    - `gate_biases`: the initial biases of the branch gates (compressed, selected, sliding) of the
      default gate network (a Linear with zero weights, then a sigmoid).
    - `num_forced_initial_blocks` / `num_forced_local_blocks` (causal only): blocks every query
      selects whatever their scores: the first blocks of the sequence, and the blocks just before
      the query's own block (which is always attended in addition). They count toward
      `num_selected_blocks`; the top-scored blocks fill the other slots.
    - `importance_score`: how a selection block is scored from the compressed attention.
      "mean_logits" (the oracle's): the compressed logits averaged over the heads of a group and over
      the compressed blocks of a selection block. "summed_probs" (paper eq. 8-10): the compressed
      attention's probabilities (softmax over the visible compressed blocks) summed over every
      compressed block that overlaps the selection block and over the heads of a group.
      "selected_keys" (not the paper's): the selected branch's own mean logit over each block, i.e.
      its rotated queries against the mean of the block's rotated keys, averaged over a group's
      heads; the blocks are then scored by the keys the selected branch attends with, not by the
      compressed branch's. Measured: the better language model (with independent_kv off), the slower
      needle retrieval (benchmarks/NOTES.md, "Scores from the selected branch's own keys").
    - `selected_key_slots` (causal only; not the paper's): of `num_selected_blocks`, the slots filled
      by the blocks that the selected branch's own keys score highest (as "selected_keys" scores them),
      after the forced blocks and the slots that `importance_score` fills (then one of "mean_logits",
      "summed_probs"); a block both scores pick is attended once. 0 (the default): none.
    """

    dim: int
    dim_head: int
    heads: int
    sliding_window_size: int
    compress_block_size: int
    selection_block_size: int
    num_selected_blocks: int
    kv_heads: int | None = None
    num_compressed_mem_kv: int = 1
    causal: bool = False
    norm: bool = True
    use_diff_topk: bool = False
    query_heads_share_selected_kv: bool = True
    interpolated_importance_score: bool = False
    compress_mlp_expand_factor: float = 1.0
    compress_block_sliding_stride: int | None = None
    backend: str = "auto"
    # the paper's design choices (arXiv 2502.11089); the defaults are the oracle's
    independent_kv: bool = False
    gate_biases: tuple[float, float, float] = DEFAULT_GATE_BIASES
    num_forced_initial_blocks: int = 0
    num_forced_local_blocks: int = 0
    importance_score: str = "mean_logits"
    selected_key_slots: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.gate_biases, list):  # JSON has no tuples
            object.__setattr__(self, "gate_biases", tuple(self.gate_biases))
        validate_config(self)

    # derived values -------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def stride(self) -> int:
        if self.compress_block_sliding_stride is None:
            return self.compress_block_size
        return self.compress_block_sliding_stride

    @property
    def group_size(self) -> int:
        return self.heads // self.num_kv_heads

    @property
    def scores_block_keys(self) -> bool:
        """Whether some selection slots are scored by the selected branch's block keys (importance
        "selected_keys", or selected_key_slots): the model builds them, a cache keeps one per page."""
        return self.importance_score == "selected_keys" or self.selected_key_slots > 0

    # serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NSAConfig":
        if not isinstance(data, dict):
            raise TypeError(f"config must be a JSON object (dict), got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed keys: {sorted(known)}")
        required = {f.name for f in fields(cls) if _is_required(f)}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"config is missing required keys {missing}")
        return cls(**data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "NSAConfig":
        return cls.from_dict(parse_json(text, "config", MAX_CONFIG_BYTES))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "NSAConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"config file {str(path)!r} is {path.stat().st_size:,} bytes; at most {MAX_CONFIG_BYTES:,} are read")
        return cls.from_json(path.read_text())

    def replace(self, **changes: Any) -> "NSAConfig":
        return replace(self, **changes)


def _is_required(field) -> bool:
    return field.default is MISSING and field.default_factory is MISSING


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if value > MAX_SIZE:
        raise ValueError(f"{name} must be at most {SIZE_RULE}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def validate_config(cfg: NSAConfig) -> None:
    """Raise ValueError/TypeError naming the first argument that breaks a rule."""
    for name in ("dim", "dim_head", "heads", "sliding_window_size", "compress_block_size", "selection_block_size"):
        _check_int(name, getattr(cfg, name), 1)
    _check_int("num_selected_blocks", cfg.num_selected_blocks, 0)
    _check_int("num_compressed_mem_kv", cfg.num_compressed_mem_kv, 1)
    if cfg.kv_heads is not None:
        _check_int("kv_heads", cfg.kv_heads, 1)
        if cfg.heads % cfg.kv_heads != 0:
            raise ValueError(
                f"kv_heads must divide heads: heads={cfg.heads} is not divisible by kv_heads={cfg.kv_heads}"
            )
    if cfg.compress_block_sliding_stride is not None:
        _check_int("compress_block_sliding_stride", cfg.compress_block_sliding_stride, 1)
        if cfg.compress_block_sliding_stride > cfg.compress_block_size:
            raise ValueError(
                "compress_block_sliding_stride must be <= compress_block_size "
                f"(got stride {cfg.compress_block_sliding_stride} > block {cfg.compress_block_size})"
            )
    stride, sel = cfg.stride, cfg.selection_block_size
    if sel % stride != 0 and stride % sel != 0:
        raise ValueError(
            f"selection_block_size ({sel}) must be a multiple or a divisor of the compression stride ({stride}); "
            "e.g. with stride 16 use 16, 32, 64 (multiples) or 8, 4, 2 (divisors)"
        )
    for name in ("causal", "norm", "use_diff_topk", "query_heads_share_selected_kv", "interpolated_importance_score"):
        _check_bool(name, getattr(cfg, name))
    factor = cfg.compress_mlp_expand_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise ValueError(f"compress_mlp_expand_factor must be a finite number > 0, got {factor!r}")
    if int(factor * cfg.compress_block_size * cfg.dim_head) < 1:
        raise ValueError("compress_mlp_expand_factor is too small: the compression MLP would have no hidden units")
    _check_bool("independent_kv", cfg.independent_kv)
    biases = cfg.gate_biases
    if (not isinstance(biases, tuple) or len(biases) != 3
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) for b in biases)):
        raise ValueError(f"gate_biases must be 3 finite numbers (compressed, selected, sliding), got {biases!r}")
    _check_int("num_forced_initial_blocks", cfg.num_forced_initial_blocks, 0)
    _check_int("num_forced_local_blocks", cfg.num_forced_local_blocks, 0)
    forced = cfg.num_forced_initial_blocks + cfg.num_forced_local_blocks
    if forced and not cfg.causal:
        raise ValueError("num_forced_initial_blocks / num_forced_local_blocks need causal=True (the local blocks "
                         "are the ones before the query's own block)")
    if forced > cfg.num_selected_blocks:
        raise ValueError(f"forced blocks count toward num_selected_blocks: num_forced_initial_blocks + "
                         f"num_forced_local_blocks = {forced} > num_selected_blocks = {cfg.num_selected_blocks}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if cfg.importance_score not in IMPORTANCE_SCORES:
        raise ValueError(f"importance_score must be one of {IMPORTANCE_SCORES}, got {cfg.importance_score!r}")
    _check_selected_key_slots(cfg, forced)
    _check_tensor_sizes(cfg)
    if cfg.num_selected_blocks == 0:
        warnings.warn(
            "num_selected_blocks=0: the selection branch attends only to each query's own block "
            "(useful for ablations only)",
            stacklevel=3,
        )


def _check_selected_key_slots(cfg: NSAConfig, forced: int) -> None:
    _check_int("selected_key_slots", cfg.selected_key_slots, 0)
    if cfg.selected_key_slots == 0:
        return
    if not cfg.causal:
        raise ValueError("selected_key_slots needs causal=True (the selected branch's block keys are scored causally)")
    if cfg.importance_score == "selected_keys":
        raise ValueError("selected_key_slots splits the slots between importance_score and the selected branch's "
                         "block keys: pass importance_score 'mean_logits' or 'summed_probs' with it (importance "
                         "'selected_keys' already gives every slot to the block keys)")
    if cfg.use_diff_topk:
        raise ValueError("selected_key_slots cannot be combined with use_diff_topk (its gates follow one score)")
    free = cfg.num_selected_blocks - forced
    if cfg.selected_key_slots > free:
        raise ValueError(f"selected_key_slots must be at most num_selected_blocks - forced blocks = {free}, "
                         f"got {cfg.selected_key_slots}")


def _check_tensor_sizes(cfg: NSAConfig) -> None:
    """Bounds: the largest tensors a module of this config holds each within MAX_ELEMENTS (sizes that
    the library can allocate and index), so that a config that validates also builds."""
    d, hk = cfg.dim_head, cfg.num_kv_heads
    window = cfg.compress_block_size * d
    pairs = 3 if cfg.independent_kv else 1  # key / value projections: one per branch with independent_kv
    check_elements("to_qkv.weight (dim x (heads + 2 kv_heads per key/value pair) x dim_head)",
                   cfg.dim * (cfg.heads + 2 * pairs * hk) * d)
    check_elements("the compression MLP's first weight ((compress_block_size x dim_head)^2 x compress_mlp_expand_factor)",
                   window * int(cfg.compress_mlp_expand_factor * window))
    check_elements("compress_mem_kv (2 x kv_heads x num_compressed_mem_kv x dim_head)", 2 * hk * cfg.num_compressed_mem_kv * d)


PRESETS: dict[str, NSAConfig] = {}


def _register_presets() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PRESETS["tiny"] = NSAConfig(
            dim=64, dim_head=16, heads=4, kv_heads=2, sliding_window_size=8, compress_block_size=8,
            compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=2, causal=True,
        )
        PRESETS["seeds"] = NSAConfig(
            dim=512, dim_head=64, heads=8, sliding_window_size=2, compress_block_size=4,
            selection_block_size=4, num_selected_blocks=2, causal=True,
        )
        PRESETS["paper"] = NSAConfig(
            dim=2048, dim_head=128, heads=64, kv_heads=4, sliding_window_size=512, compress_block_size=32,
            compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=16, causal=True,
        )
        # the paper's shape with the paper's design: what we recommend for training from scratch
        PRESETS["paper_scratch"] = PRESETS["paper"].replace(
            independent_kv=True, gate_biases=(0.0, 0.0, 0.0), num_forced_initial_blocks=1, num_forced_local_blocks=2,
        )


_register_presets()


def get_preset(name: str) -> NSAConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return PRESETS[name]
