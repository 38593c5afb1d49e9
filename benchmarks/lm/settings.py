"""Settings of the language-model comparison: one dataclass, the GPU and smoke presets, checks.

FULL is sized for one H200 command of ~10 minutes per (model, seed): ~393M bytes (ten times the
earlier 39M-token comparison) at context 8192 when the time budget allows; the budget stops a
slower model earlier, and the report compares models at equal tokens and at equal time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from benchmarks.attention_layers import ModelShape
from benchmarks.lm.corpus import SOURCES
from benchmarks.lm.models import VARIANTS

PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "torch", "triton")
# the recommended options for training from scratch (NSAConfig preset paper_scratch)
PAPER_SCRATCH_OPTIONS = {"independent_kv": True, "gate_biases": [0.0, 0.0, 0.0], "num_forced_initial_blocks": 1,
                         "num_forced_local_blocks": 2}


@dataclass(frozen=True)
class LMSettings:
    shape: ModelShape
    context: int  # bytes per row
    batch: int  # rows per step (packed into one sequence of batch x context)
    steps: int
    warmup_steps: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    models: tuple[str, ...]
    eval_every: int
    val_rows: int
    buckets: tuple[int, ...]  # position bucket edges, e.g. (0, 512, 2048, 8192)
    capped_context: int  # the capped evaluation cuts documents every this many tokens
    corpus: str = "python"
    corpus_max_bytes: int | None = None
    val_fraction: float = 0.02
    time_budget_s: float | None = None  # per run
    nsa_options: dict[str, Any] = field(default_factory=lambda: dict(PAPER_SCRATCH_OPTIONS))
    compression_lr_scale: float = 1.0  # NSA's compression networks, memory tokens and positions train at this x lr
    reach_documents: int = 8  # validation documents of the final attention-reach probe (attention_reach.py); 0: none
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    cpu_threads: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.context


FULL = LMSettings(
    shape=ModelShape(dim=512, depth=6, heads=8, kv_heads=2, dim_head=64, ff_mult=4, window=512, compress_block=32,
                     compress_stride=16, selection_block=64, num_selected=16, compress_hidden=32 * 64),
    context=8192, batch=8, steps=6000, warmup_steps=200, lrs=(1e-3,), seeds=(0, 1), models=VARIANTS,
    eval_every=500, val_rows=32, buckets=(0, 512, 2048, 8192), capped_context=512, time_budget_s=480.0,
)
# the 1500-step schedule of the learning-rate sweep and the design runs since (RESULTS.md "The learning-rate
# sweep"): 98M tokens, every run to the end of its cosine, so runs compare at their final point
SWEEP = replace(FULL, steps=1500, warmup_steps=100, eval_every=250, time_budget_s=None)
SCHEDULES = {"full": FULL, "sweep": SWEEP}
SMOKE = replace(
    FULL, shape=ModelShape(dim=32, depth=2, heads=2, kv_heads=1, dim_head=16, ff_mult=2, window=16, compress_block=8,
                           compress_stride=4, selection_block=8, num_selected=4, compress_hidden=32),
    context=128, batch=2, steps=4, warmup_steps=1, lrs=(3e-3,), seeds=(0,), eval_every=2, val_rows=2,
    buckets=(0, 32, 64, 128), capped_context=32, reach_documents=2, corpus="stdlib", corpus_max_bytes=400_000,
    val_fraction=0.2, time_budget_s=None, device="cpu", cpu_threads=1,
)


def _require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def validate(s: LMSettings) -> None:
    for name in ("context", "batch", "steps", "eval_every", "val_rows", "capped_context"):
        value = getattr(s, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an int >= 1", value)
    _require(isinstance(s.warmup_steps, int) and s.warmup_steps >= 0, "warmup_steps", "an int >= 0", s.warmup_steps)
    _require(isinstance(s.reach_documents, int) and s.reach_documents >= 0, "reach_documents", "an int >= 0",
             s.reach_documents)
    for shape_name, value in asdict(s.shape).items():
        _require(isinstance(value, int) and value >= 1, shape_name, "an int >= 1", value)
    _require(s.shape.heads % s.shape.kv_heads == 0, "kv_heads", f"a divisor of heads={s.shape.heads}", s.shape.kv_heads)
    _require(len(s.lrs) > 0 and all(lr > 0 for lr in s.lrs), "lrs", "one or more rates > 0", s.lrs)
    _require(len(s.seeds) > 0, "seeds", "one or more seeds", s.seeds)
    _require(len(s.models) > 0 and set(s.models) <= set(VARIANTS) and len(set(s.models)) == len(s.models),
             "models", f"distinct names among {VARIANTS}", s.models)
    edges = s.buckets
    _require(len(edges) >= 2 and edges[0] == 0 and all(a < b for a, b in zip(edges, edges[1:])), "buckets",
             "increasing edges from 0, e.g. 0,512,2048,8192", edges)
    _require(s.corpus in SOURCES, "corpus", f"one of {SOURCES}", s.corpus)
    _require(0 < s.val_fraction < 1, "val_fraction", "in (0, 1)", s.val_fraction)
    _require(s.time_budget_s is None or s.time_budget_s > 0, "time_budget_s", "> 0 seconds (or 0 for none)",
             s.time_budget_s)
    _require(isinstance(s.nsa_options, dict), "nsa_options", "a JSON object of SparseAttention options", s.nsa_options)
    _require(s.compression_lr_scale > 0, "compression_lr_scale", "> 0", s.compression_lr_scale)
    _require(s.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", s.precision)
    _require(s.backend in BACKENDS, "backend", f"one of {BACKENDS}", s.backend)


def with_overrides(base: LMSettings, **overrides: Any) -> LMSettings:
    shape_fields = set(asdict(base.shape))
    shape = replace(base.shape, **{k: v for k, v in overrides.items() if k in shape_fields})
    settings = replace(base, shape=shape, **{k: v for k, v in overrides.items() if k not in shape_fields})
    validate(settings)
    return settings
