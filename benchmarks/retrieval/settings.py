"""Settings of the retrieval benchmark: the presets (FULL for a GPU, SMOKE for the CI's CPU), the
command-line overrides, and from them the tasks, the variants and the per-run settings.

Every run of one invocation has the same model shape, steps, batch and schedule; runs differ in
task and length, model, learning rate and seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from benchmarks.attention_layers import ModelShape
from benchmarks.retrieval.models import VARIANTS, Variant
from benchmarks.retrieval.tasks import MQARTask, NeedleTask, Task
from benchmarks.retrieval.training import TrainSettings

TASKS = ("needle", "mqar")
PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class BenchmarkSettings:
    tasks: tuple[str, ...]
    needle_lengths: tuple[int, ...]  # target lengths of the needle task
    mqar_lengths: tuple[int, ...]  # row lengths of MQAR
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    steps: int
    batch: int
    eval_every: int
    eval_rows: int
    warmup_steps: int
    sync_every: int
    shape: ModelShape
    needle_values: int = 16
    needle_filler: int = 32
    min_distance: int | None = None  # needle: smallest query - value distance; None: window + 1
    curriculum_start: int | None = 256  # needle's first row length (None: no curriculum); MQAR has none
    curriculum_threshold: float = 0.9
    mqar_pairs: int = 64
    mqar_vocab: int = 1024
    time_budget_s: float | None = None  # per run
    stop_at_accuracy: float | None = None
    nsa_options: dict[str, Any] | None = None  # extra SparseAttention options for every nsa variant
    defined: dict[str, dict] | None = None  # variants declared on the command line: name -> Variant fields
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    compile: bool = False
    cpu_threads: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


FULL_SHAPE = ModelShape(dim=128, depth=2, heads=4, kv_heads=1, dim_head=32, ff_mult=4, window=64, compress_block=32,
                        compress_stride=16, selection_block=64, num_selected=8, compress_hidden=32 * 32)
FULL = BenchmarkSettings(
    tasks=TASKS, needle_lengths=(4096,), mqar_lengths=(512,), models=tuple(VARIANTS), seeds=(0, 1),
    lrs=(3e-4, 1e-3, 3e-3), steps=2000, batch=32, eval_every=50, eval_rows=256, warmup_steps=50, sync_every=25,
    shape=FULL_SHAPE,
)
SMOKE_SHAPE = ModelShape(dim=32, depth=2, heads=2, kv_heads=1, dim_head=16, ff_mult=2, window=8, compress_block=8,
                         compress_stride=4, selection_block=8, num_selected=2, compress_hidden=16)
SMOKE = replace(
    FULL, needle_lengths=(64,), mqar_lengths=(48,), mqar_pairs=8, mqar_vocab=64, seeds=(0,), lrs=(1e-3, 3e-3),
    steps=6, batch=4, eval_every=3, eval_rows=8, warmup_steps=2, sync_every=3, curriculum_start=32,
    shape=SMOKE_SHAPE, device="cpu", cpu_threads=1,
)


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def validate(s: BenchmarkSettings) -> None:
    for name in ("steps", "batch", "eval_every", "eval_rows", "sync_every"):
        _positive(name, getattr(s, name))
    if s.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {s.warmup_steps}")
    for name in ("tasks", "models", "seeds", "lrs"):
        if not getattr(s, name):
            raise ValueError(f"{name} must name at least one value")
    bad = sorted(set(s.tasks) - set(TASKS))
    if bad:
        raise ValueError(f"tasks must be among {TASKS}, got {bad}")
    known = set(VARIANTS) | set(s.defined or {})
    bad = sorted(set(s.models) - known)
    if bad:
        raise ValueError(f"models must be among {sorted(known)} (or declared with --define), got {bad}")
    for lr in s.lrs:
        _positive("lrs", lr)
    for name in ("needle_lengths", "mqar_lengths"):
        for length in getattr(s, name):
            _positive(name, length)
    for name, allowed in (("precision", PRECISIONS), ("backend", BACKENDS)):
        if getattr(s, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(s, name)!r}")
    for name in ("time_budget_s", "stop_at_accuracy"):
        if getattr(s, name) is not None:
            _positive(name, getattr(s, name))
    for shape_field in fields(s.shape):
        _positive(shape_field.name, getattr(s.shape, shape_field.name))
    variants(s)  # a bad declaration or option fails now, not after hours of other runs
    for task, lengths in task_lengths(s):
        for length in lengths:
            task.check_length(length)
            task.check_length(curriculum_start(s, task, length))


def variants(s: BenchmarkSettings) -> dict[str, Variant]:
    """The models to run: the built-in variants and the declared ones, with `nsa_options` merged
    under each nsa variant's own options."""
    declared = {name: Variant.from_dict(data) for name, data in (s.defined or {}).items()}
    table = {**VARIANTS, **declared}
    chosen = {}
    for name in s.models:
        variant = table[name]
        if variant.attention == "nsa" and s.nsa_options:
            variant = replace(variant, options={**s.nsa_options, **variant.options})
        chosen[name] = variant
    return chosen


def make_task(s: BenchmarkSettings, name: str) -> Task:
    if name == "needle":
        min_distance = s.shape.window + 1 if s.min_distance is None else s.min_distance
        return NeedleTask(min_distance=min_distance, num_values=s.needle_values, num_filler=s.needle_filler)
    return MQARTask(num_pairs=s.mqar_pairs, vocab=s.mqar_vocab)


def task_lengths(s: BenchmarkSettings) -> list[tuple[Task, tuple[int, ...]]]:
    return [(make_task(s, name), s.needle_lengths if name == "needle" else s.mqar_lengths) for name in s.tasks]


def curriculum_start(s: BenchmarkSettings, task: Task, target: int) -> int:
    if task.name != "needle" or s.curriculum_start is None:
        return target
    return min(s.curriculum_start, target)


def train_settings(s: BenchmarkSettings, task: Task, target: int, lr: float, seed: int) -> TrainSettings:
    return TrainSettings(
        steps=s.steps, batch=s.batch, eval_every=s.eval_every, eval_rows=s.eval_rows, lr=lr, seed=seed,
        target_length=target, curriculum_start=curriculum_start(s, task, target), warmup_steps=s.warmup_steps,
        curriculum_threshold=s.curriculum_threshold, sync_every=s.sync_every, time_budget_s=s.time_budget_s,
        stop_at_accuracy=s.stop_at_accuracy,
    )


def with_overrides(base: BenchmarkSettings, **overrides: Any) -> BenchmarkSettings:
    """base with the given fields replaced (shape fields such as dim, depth, window go into the
    shape), validated."""
    shape_names = {f.name for f in fields(ModelShape)}
    shape = replace(base.shape, **{k: v for k, v in overrides.items() if k in shape_names})
    if "compress_hidden" not in overrides and ({"compress_block", "dim_head"} & set(overrides)):
        shape = replace(shape, compress_hidden=shape.compress_block * shape.dim_head)  # the library's default width
    settings = replace(base, shape=shape, **{k: v for k, v in overrides.items() if k not in shape_names})
    validate(settings)
    return settings
