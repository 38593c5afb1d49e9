"""Settings of the quality comparison: one dataclass, the full-run and smoke presets, and checks.

The full preset is sized for one H100 (bf16 autocast): about a minute of training per model
at 8k context, then a short passkey fine-tune at 4k-32k. The smoke preset is the same pipeline
at a tiny size for a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from benchmarks.quality_data import passkey_overhead
from benchmarks.quality_models import VARIANTS, ModelShape

PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class QualitySettings:
    # model (shared by all variants) and NSA's geometry
    dim: int
    depth: int
    heads: int
    kv_heads: int
    dim_head: int
    ff_mult: int
    window: int
    compress_block: int
    compress_stride: int
    selection_block: int
    num_selected: int
    compress_hidden: int
    # language modelling
    context: int
    batch_size: int
    steps: int
    warmup_steps: int
    lr: float
    eval_every: int
    val_rows: int
    time_budget_s: float | None  # per model; None = no limit (stop at `steps`)
    # passkey retrieval (fine-tuned from the language model)
    retrieval_lengths: tuple[int, ...]
    retrieval_steps: int
    retrieval_tokens_per_step: int
    retrieval_lr: float
    retrieval_warmup_steps: int
    retrieval_samples_per_bucket: int
    retrieval_time_budget_s: float | None
    retrieval_supervise_repeat: bool = True  # also train on the needle's own repetition of the key
    # shared
    models: tuple[str, ...] = VARIANTS
    depth_buckets: int = 5
    key_digits: int = 5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.05
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    precision: str = "auto"  # "auto" = bf16 autocast on cuda, fp32 on cpu
    backend: str = "auto"  # NSA ops' backend (SparseAttention, the window op)
    cpu_threads: int | None = None  # torch CPU threads; None = torch's default

    @property
    def shape(self) -> ModelShape:
        return ModelShape(**{f.name: getattr(self, f.name) for f in fields(ModelShape)})

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    def to_dict(self) -> dict:
        return asdict(self)


FULL = QualitySettings(
    dim=512, depth=6, heads=8, kv_heads=2, dim_head=64, ff_mult=4,
    window=512, compress_block=32, compress_stride=16, selection_block=64, num_selected=16, compress_hidden=32,
    context=8192, batch_size=8, steps=400, warmup_steps=40, lr=1e-3, eval_every=50, val_rows=16, time_budget_s=150.0,
    retrieval_lengths=(4096, 8192, 16384, 32768), retrieval_steps=200, retrieval_tokens_per_step=65536,
    retrieval_lr=1e-3, retrieval_warmup_steps=10, retrieval_samples_per_bucket=20, retrieval_time_budget_s=90.0,
)

# one CPU thread: ops this small gain nothing from more, and a busy machine loses much to
# oversubscribed OpenMP threads (measured on a loaded 2-core machine: dense steps 5x faster)
SMOKE = QualitySettings(
    dim=64, depth=2, heads=2, kv_heads=1, dim_head=32, ff_mult=4,
    window=32, compress_block=16, compress_stride=8, selection_block=16, num_selected=2, compress_hidden=32,
    context=256, batch_size=4, steps=30, warmup_steps=3, lr=3e-3, eval_every=10, val_rows=4, time_budget_s=None,
    retrieval_lengths=(256, 512), retrieval_steps=6, retrieval_tokens_per_step=1024,
    retrieval_lr=1e-3, retrieval_warmup_steps=2, retrieval_samples_per_bucket=4, retrieval_time_budget_s=None,
    device="cpu", cpu_threads=1,
)


def _require(condition: bool, name: str, rule: str, value) -> None:
    if not condition:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def validate_settings(s: QualitySettings) -> None:
    """Raise ValueError naming the first setting that breaks a rule (NSA's own geometry rules are
    checked again by SparseAttention when the models are built)."""
    for name in ("dim", "depth", "heads", "kv_heads", "dim_head", "ff_mult", "window", "compress_block",
                 "compress_stride", "selection_block", "num_selected", "compress_hidden", "context", "batch_size",
                 "steps", "eval_every", "val_rows", "retrieval_tokens_per_step", "retrieval_samples_per_bucket",
                 "depth_buckets", "key_digits"):
        value = getattr(s, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an int >= 1", value)
    for name in ("warmup_steps", "retrieval_steps", "retrieval_warmup_steps"):
        _require(isinstance(getattr(s, name), int) and getattr(s, name) >= 0, name, "an int >= 0", getattr(s, name))
    _require(s.heads % s.kv_heads == 0, "kv_heads", f"a divisor of heads={s.heads}", s.kv_heads)
    for name in ("lr", "retrieval_lr", "grad_clip"):
        _require(getattr(s, name) > 0, name, "> 0", getattr(s, name))
    _require(0 <= s.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]", s.min_lr_ratio)
    _require(s.weight_decay >= 0, "weight_decay", ">= 0", s.weight_decay)
    _require(0 < s.val_fraction < 1, "val_fraction", "in (0, 1)", s.val_fraction)
    for name in ("time_budget_s", "retrieval_time_budget_s"):
        value = getattr(s, name)
        _require(value is None or value > 0, name, "> 0 seconds (or None for no limit)", value)
    _require(len(s.models) > 0 and set(s.models) <= set(VARIANTS) and len(set(s.models)) == len(s.models),
             "models", f"distinct names from {VARIANTS}", s.models)
    shortest = passkey_overhead(s.key_digits) + 1
    _require(len(s.retrieval_lengths) > 0 and all(isinstance(n, int) and n >= shortest for n in s.retrieval_lengths),
             "retrieval_lengths", f"ints >= {shortest} (the needle and the question take {shortest - 1} bytes)",
             s.retrieval_lengths)
    _require(s.device in ("auto", "cpu", "cuda") or s.device.startswith("cuda:"), "device",
             "'auto', 'cpu', 'cuda' or 'cuda:N'", s.device)
    _require(s.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", s.precision)
    _require(s.backend in BACKENDS, "backend", f"one of {BACKENDS}", s.backend)
    _require(isinstance(s.retrieval_supervise_repeat, bool), "retrieval_supervise_repeat", "a bool",
             s.retrieval_supervise_repeat)
    _require(s.cpu_threads is None or (isinstance(s.cpu_threads, int) and s.cpu_threads >= 1), "cpu_threads",
             "an int >= 1 (or None for torch's default)", s.cpu_threads)


def with_overrides(base: QualitySettings, **overrides) -> QualitySettings:
    """`base` with the given fields replaced, validated."""
    settings = replace(base, **overrides)
    validate_settings(settings)
    return settings
