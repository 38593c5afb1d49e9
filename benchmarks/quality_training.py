"""Language-model training of the quality comparison: schedule, optimizer, steps, validation
in bits per byte, and the timing (tokens/s) of each model.

Every model sees the same batches (one generator seeded with `seed`), the same AdamW, the same
warmup + cosine schedule and, unless the time budget stops it first, the same number of tokens.
Time is measured between `torch.cuda.synchronize()` calls and covers training steps only:
validation and a first forward + backward that compiles the Triton kernels (no optimizer step,
so it changes no weight) are outside it. Progress goes through a `log` callback; nothing here prints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.quality_data import ByteCorpus, evenly_spaced_rows, random_rows
from benchmarks.quality_settings import QualitySettings
from nsa_core import param_groups

NATS_TO_BITS = 1 / math.log(2)
WARMUP_DATA_SEED = 1_000_003  # the compile warm-up batch comes from its own generator
SYNC_EVERY = 10  # read losses back (and check the time budget) every this many steps


def autocast(device: torch.device, precision: str):
    """bf16 autocast for precision "bf16", nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to `peak` over `warmup_steps`, then cosine down to `min_ratio * peak` at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                   compression_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95), over the library's parameter groups (nsa_core.param_groups): weight decay
    on matrices and larger tensors, not on norms and biases; NSA's compression side at compression_lr_scale
    x the rate (optimizer_step applies each group's lr_scale to every step's rate)."""
    groups = param_groups(model, lr, weight_decay, compression_lr_scale=compression_lr_scale)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def next_byte_loss(model: nn.Module, rows: Tensor, device: torch.device, precision: str) -> Tensor:
    """Mean cross entropy (nats) of predicting rows[:, 1:] from rows[:, :-1]."""
    with autocast(device, precision):
        logits = model(rows[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())


def to_device(rows: Tensor, device: torch.device) -> Tensor:
    return rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows


@torch.no_grad()
def validation_bits_per_byte(model: nn.Module, rows: Tensor, batch_size: int, device: torch.device,
                             precision: str) -> float:
    model.eval()
    losses = [next_byte_loss(model, to_device(part, device), device, precision) * part.shape[0]
              for part in rows.split(batch_size)]
    model.train()
    return float(torch.stack(losses).sum()) / rows.shape[0] * NATS_TO_BITS


def compile_kernels(model: nn.Module, rows: Tensor, device: torch.device, precision: str) -> float:
    """One forward + backward at the training shape (Triton compiles here; no weight changes).
    Returns its seconds."""
    start = time.perf_counter()
    next_byte_loss(model, to_device(rows, device), device, precision).backward()
    model.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, lr: float, grad_clip: float) -> None:
    """Backward, gradient clipping and one AdamW step at learning rate `lr` (times a group's lr_scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, rows: Tensor, lr: float, s: QualitySettings,
               device: torch.device, precision: str) -> Tensor:
    loss = next_byte_loss(model, to_device(rows, device), device, precision)
    optimizer_step(model, optimizer, loss, lr, s.grad_clip)
    return loss.detach()


def record_validation(record: dict, step: int, bits_per_byte: float, tokens_per_step: int,
                      log: Callable[[str], None]) -> None:
    record["val_loss"].append(round(bits_per_byte, 5))
    record["val_step"].append(step)
    record["val_tokens"].append(step * tokens_per_step)
    recent = record["train_loss"][-SYNC_EVERY:]
    train = f"  train {sum(recent) / len(recent):.4f} bpb (last {len(recent)} steps)" if recent else ""
    log(f"step {step:5d}  val {bits_per_byte:.4f} bpb{train}")


def train_language_model(model: nn.Module, corpus: ByteCorpus, s: QualitySettings, device: torch.device,
                         precision: str, log: Callable[[str], None]) -> dict:
    """Train `model` on the corpus; returns its record (losses in bits per byte, tokens, timing).
    Losses are read back, and the time budget checked, every SYNC_EVERY steps."""
    val_rows = evenly_spaced_rows(corpus.val, s.val_rows, s.context)
    batches = torch.Generator().manual_seed(s.seed)
    optimizer = make_optimizer(model, s.lr, s.weight_decay, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_rows = random_rows(corpus.train, s.batch_size, s.context, torch.Generator().manual_seed(WARMUP_DATA_SEED))
    record = {"val_loss": [], "val_step": [], "val_tokens": [], "train_loss": [],
              "compile_seconds": round(compile_kernels(model, warmup_rows, device, precision), 2)}

    def validate(step: int) -> None:
        bpb = validation_bits_per_byte(model, val_rows, s.batch_size, device, precision)
        record_validation(record, step, bpb, s.tokens_per_step, log)

    validate(0)
    train_seconds, pending, step, stopped_by_time = 0.0, [], 0, False
    segment_start = time.perf_counter()
    while step < s.steps and not stopped_by_time:
        rows = random_rows(corpus.train, s.batch_size, s.context, batches)
        lr = learning_rate(step, s.lr, s.warmup_steps, s.steps, s.min_lr_ratio)
        pending.append(train_step(model, optimizer, rows, lr, s, device, precision))
        step += 1
        if step % SYNC_EVERY and step % s.eval_every and step != s.steps:
            continue
        synchronize(device)
        train_seconds += time.perf_counter() - segment_start
        record["train_loss"] += [round(v * NATS_TO_BITS, 5) for v in torch.stack(pending).tolist()]
        pending = []
        stopped_by_time = s.time_budget_s is not None and train_seconds >= s.time_budget_s
        if step % s.eval_every == 0 or step == s.steps or stopped_by_time:
            validate(step)
        segment_start = time.perf_counter()
    record.update({
        "steps": step, "tokens": step * s.tokens_per_step, "stopped_by_time": stopped_by_time,
        "train_seconds": round(train_seconds, 2), "tokens_per_s": round(step * s.tokens_per_step / train_seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    })
    return record
