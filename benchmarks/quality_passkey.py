"""Passkey retrieval of the quality comparison: a short fine-tune of each language model on the
task, then accuracy on fresh samples per length and depth.

Training starts from the language model just trained (the question is whether a model trained
with this attention can learn to retrieve, not whether a random one can); steps cycle through
the lengths, each with `retrieval_tokens_per_step // length` samples at uniform random depths;
the loss is the cross entropy of the key's digits only. Evaluation uses samples from another
seed, stratified over depth buckets; a sample counts as retrieved when every digit of the key
is the argmax given the question and the digits before it (teacher forcing), which is exactly
when greedy decoding would write the key. Digit accuracy is reported too (chance: 0.1).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.quality_data import depth_bucket_names, passkey_batch, stratified_depths
from benchmarks.quality_settings import QualitySettings
from benchmarks.quality_training import autocast, learning_rate, make_optimizer, synchronize, to_device

EVALUATION_SEED_OFFSET = 7919  # evaluation samples come from seed + this: never the training ones


def key_logits(model: nn.Module, inputs: Tensor, digits: int, device: torch.device, precision: str) -> Tensor:
    """Logits (b, digits, 256) at the positions that predict the key."""
    with autocast(device, precision):
        return model(to_device(inputs, device))[:, -digits:].float()


def samples_per_step(length: int, tokens_per_step: int) -> int:
    return max(1, tokens_per_step // length)


def train_passkey(model: nn.Module, s: QualitySettings, device: torch.device, precision: str,
                  log: Callable[[str], None]) -> dict:
    """Fine-tune on passkey samples; returns steps done, seconds and the last losses (nats)."""
    rng = random.Random(s.seed)
    optimizer = make_optimizer(model, s.retrieval_lr, s.weight_decay, device)
    losses, start, step = [], time.perf_counter(), 0
    while step < s.retrieval_steps:
        if s.retrieval_time_budget_s is not None and time.perf_counter() - start >= s.retrieval_time_budget_s:
            break
        length = s.retrieval_lengths[step % len(s.retrieval_lengths)]
        depths = [rng.random() for _ in range(samples_per_step(length, s.retrieval_tokens_per_step))]
        inputs, labels = passkey_batch(length, depths, s.key_digits, rng)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s.retrieval_lr, s.retrieval_warmup_steps, s.retrieval_steps, s.min_lr_ratio)
        logits = key_logits(model, inputs, s.key_digits, device, precision)
        loss = F.cross_entropy(logits.flatten(0, 1), to_device(labels[:, -s.key_digits:], device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        losses.append(float(loss))  # one sync per step: these steps are not timed for throughput
        step += 1
        if step % max(1, s.retrieval_steps // 4) == 0:
            log(f"passkey step {step:4d}  length {length:6d}  key loss {losses[-1]:.3f} nats")
    synchronize(device)
    return {"steps": step, "seconds": round(time.perf_counter() - start, 2),
            "key_loss": [round(v, 4) for v in losses], "stopped_by_time": step < s.retrieval_steps}


@torch.no_grad()
def evaluate_length(model: nn.Module, length: int, s: QualitySettings, rng: random.Random, device: torch.device,
                    precision: str) -> dict:
    """Accuracy at one length: overall, per digit, and per depth bucket."""
    model.eval()
    pairs = stratified_depths(s.retrieval_samples_per_bucket, s.depth_buckets, rng)
    batch = samples_per_step(length, s.retrieval_tokens_per_step)
    exact, digit_hits, buckets = [], [], []
    for first in range(0, len(pairs), batch):
        chunk = pairs[first:first + batch]
        inputs, labels = passkey_batch(length, [depth for _, depth in chunk], s.key_digits, rng)
        predicted = key_logits(model, inputs, s.key_digits, device, precision).argmax(-1).cpu()
        correct = predicted == labels[:, -s.key_digits:]
        exact += correct.all(-1).tolist()
        digit_hits += correct.float().mean(-1).tolist()
        buckets += [bucket for bucket, _ in chunk]
    model.train()
    names = depth_bucket_names(s.depth_buckets)
    by_depth = {}
    for index, name in enumerate(names):
        hits = [e for e, b in zip(exact, buckets) if b == index]
        by_depth[name] = round(sum(hits) / len(hits), 4)
    return {"accuracy": round(sum(exact) / len(exact), 4), "digit_accuracy": round(sum(digit_hits) / len(digit_hits), 4),
            "samples": len(exact), "by_depth": by_depth}


def evaluate_passkey(model: nn.Module, s: QualitySettings, device: torch.device, precision: str) -> dict[str, dict]:
    """{str(length): evaluate_length(...)} over `retrieval_lengths`, on fresh samples."""
    rng = random.Random(s.seed + EVALUATION_SEED_OFFSET)
    return {str(length): evaluate_length(model, length, s, rng, device, precision) for length in s.retrieval_lengths}
