"""Training of one (model, learning rate, seed) run of the language-model comparison.

Every run sees the same packed batches (one generator seeded with the seed), the same AdamW and
warmup + cosine schedule, and stops at `steps` or at the time budget. Time is measured between
device synchronisations and covers the training steps only (validation and a first
forward + backward that compiles the kernels, without an optimizer step, are outside it). The
validation curve records bits per byte, overall and by position bucket, against steps, tokens and
training seconds, so runs can be compared at equal tokens and at equal time, bucket by bucket. Given a
checkpoint file, a run saves its state at every evaluation and resumes from it (checkpoint.py); given a
wall-clock budget for the command, it pauses at the last evaluation the budget can reach. Progress goes
through `log`; nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.lm.attention_reach import attention_reach, long_documents
from benchmarks.lm.checkpoint import TrainingState, load_checkpoint, save_checkpoint
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
              precision: str, log: Callable[[str], None], on_eval: Callable[[dict], None] | None = None,
              checkpoint: Path | None = None, config: dict | None = None,
              command_budget_s: float | None = None) -> dict:
    """Train `model`; returns the run's record (curves, tokens, timing, the final evaluation).

    checkpoint: a file the run saves its state to at every evaluation and resumes from when it exists
    (`config` identifies the run; a checkpoint of another configuration is refused). command_budget_s:
    wall seconds this call may take; the run then stops at the last evaluation it can reach within them
    (judged by the longest segment between evaluations so far) and returns with record["paused"] True.
    """
    if command_budget_s is not None and checkpoint is None:
        raise ValueError("command_budget_s needs a checkpoint file to pause into")
    called = time.perf_counter()
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
    compile_seconds = round(time.perf_counter() - start, 2)
    resumed = checkpoint is not None and checkpoint.exists()
    if resumed:
        state = load_checkpoint(checkpoint, model, optimizer, batches, config)
        record, step, seconds = state.record, state.step, state.seconds
        log(f"resumed at step {step} ({seconds:.1f} training s) from {checkpoint}")
    else:
        record, step, seconds = {"compile_seconds": compile_seconds, "train_loss": [], "val": []}, 0, 0.0
    record.setdefault("segments", []).append({"from_step": step, "compile_seconds": compile_seconds,
                                              "device": torch.cuda.get_device_name(device)
                                              if device.type == "cuda" else device.type})

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

    if not resumed:
        validate(0, 0.0)
    pending, stopped_by_time, paused, longest_segment = [], False, False, 0.0
    segment = last_eval = time.perf_counter()
    while step < s.steps and not stopped_by_time and not paused:
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
            record["segments"][-1]["to_step"] = step
            validate(step, seconds, final=done)
            if checkpoint is not None and not done:
                save_checkpoint(checkpoint, model, optimizer, batches, TrainingState(step, seconds, record), config)
            now = time.perf_counter()
            longest_segment, last_eval = max(longest_segment, now - last_eval), now
            # the final segment also runs the capped evaluation and the reach probe: a segment's margin
            paused = (not done and command_budget_s is not None
                      and now - called + 1.5 * longest_segment > command_budget_s)
        segment = time.perf_counter()
    record["paused"] = paused
    if paused:
        log(f"paused at step {step}: the next evaluation would pass the command's {command_budget_s:.0f} s")
    if "final" in record:
        documents = long_documents(corpus.val, s.buckets[-2], s.reach_documents, s.context)
        record["final"]["reach"] = attention_reach(model, documents, s.buckets[-2], s.shape.window, device, precision)
        if on_eval is not None:
            on_eval(record)
        if checkpoint is not None and checkpoint.exists():
            checkpoint.unlink()
    record.update({
        "steps": step, "tokens": step * s.tokens_per_step, "stopped_by_time": stopped_by_time,
        "train_seconds": round(seconds, 2), "tokens_per_s": round(step * s.tokens_per_step / max(seconds, 1e-9), 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    })
    return record
