"""Training of one (model, learning rate, seed) run of the language-model comparison.

Every run sees the same packed batches (one generator seeded with the seed), the same AdamW and
warmup + cosine schedule, and stops at `steps` or at the time budget. Time is measured between
device synchronisations and covers the training steps only (validation and a first
forward + backward that compiles the kernels, without an optimizer step, are outside it). The
validation curve records bits per byte, overall and by position bucket, against steps, tokens and
training seconds, so runs can be compared at equal tokens and at equal time, bucket by bucket. Progress goes through `log`; nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.lm.attention_reach import attention_reach, long_documents
from benchmarks.lm.corpus import IGNORE, Corpus, pack
from benchmarks.lm.evaluation import NATS_TO_BITS, evaluate
from benchmarks.lm.settings import LMSettings
from benchmarks.quality_data import evenly_spaced_rows, random_rows
from benchmarks.quality_training import autocast, learning_rate, make_optimizer, optimizer_step, synchronize

WARMUP_DATA_SEED = 1_000_003
SYNC_EVERY = 10


def packed_loss(model: nn.Module, rows: Tensor, device: torch.device, precision: str) -> Tensor:
    """Mean next-byte cross entropy (nats) over the scored labels of rows (B, n + 1), packed."""
    batch = pack(rows)
    with autocast(device, precision):
        logits = model(batch.inputs.to(device, non_blocking=True), batch.cu_seqlens.to(device, non_blocking=True))
    return F.cross_entropy(logits.float().flatten(0, 1), batch.labels.to(device).flatten(), ignore_index=IGNORE)


def train_run(model: nn.Module, corpus: Corpus, s: LMSettings, lr: float, seed: int, device: torch.device,
              precision: str, log: Callable[[str], None], on_eval: Callable[[dict], None] | None = None) -> dict:
    """Train `model`; returns the run's record (curves, tokens, timing, the final evaluation)."""
    val_rows = evenly_spaced_rows(corpus.val, s.val_rows, s.context)
    batches = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, lr, s.weight_decay, device, compression_lr_scale=s.compression_lr_scale)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    warm = random_rows(corpus.train, s.batch, s.context, torch.Generator().manual_seed(WARMUP_DATA_SEED))
    packed_loss(model, warm, device, precision).backward()
    model.zero_grad(set_to_none=True)
    synchronize(device)
    record = {"compile_seconds": round(time.perf_counter() - start, 2), "train_loss": [], "val": []}

    def validate(step: int, seconds: float, final: bool = False) -> None:
        result = evaluate(model, val_rows, s.batch, s.buckets, s.capped_context, device, precision, capped=final)
        point = {"step": step, "tokens": step * s.tokens_per_step, "seconds": round(seconds, 2),
                 "bpb": round(result["full"]["bpb"], 5),
                 "buckets": {name: None if v is None else round(v, 5) for name, v in result["full"]["buckets"].items()},
                 "gates": result["gates"]}
        record["val"].append(point)
        if final:
            record["final"] = result
        log(f"step {step:5d}  {seconds:7.1f} s  val {point['bpb']:.4f} bpb")
        if on_eval is not None:
            on_eval(record)

    validate(0, 0.0)
    seconds, pending, step, stopped_by_time = 0.0, [], 0, False
    segment = time.perf_counter()
    while step < s.steps and not stopped_by_time:
        rows = random_rows(corpus.train, s.batch, s.context, batches)
        loss = packed_loss(model, rows, device, precision)
        optimizer_step(model, optimizer, loss, learning_rate(step, lr, s.warmup_steps, s.steps, s.min_lr_ratio),
                       s.grad_clip)
        pending.append(loss.detach())
        step += 1
        if step % SYNC_EVERY and step % s.eval_every and step != s.steps:
            continue
        synchronize(device)
        seconds += time.perf_counter() - segment
        record["train_loss"] += [round(v * NATS_TO_BITS, 5) for v in torch.stack(pending).tolist()]
        pending = []
        stopped_by_time = s.time_budget_s is not None and seconds >= s.time_budget_s
        done = step == s.steps or stopped_by_time
        if step % s.eval_every == 0 or done:
            validate(step, seconds, final=done)
        segment = time.perf_counter()
    if "final" in record:
        documents = long_documents(corpus.val, s.buckets[-2], s.reach_documents, s.context)
        record["final"]["reach"] = attention_reach(model, documents, s.buckets[-2], s.shape.window, device, precision)
        if on_eval is not None:
            on_eval(record)
    record.update({
        "steps": step, "tokens": step * s.tokens_per_step, "stopped_by_time": stopped_by_time,
        "train_seconds": round(seconds, 2), "tokens_per_s": round(step * s.tokens_per_step / max(seconds, 1e-9), 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    })
    return record
