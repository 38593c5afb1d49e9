"""Passkey retrieval of the quality comparison: a short fine-tune of each language model on the
task, then accuracy on fresh samples per length and depth.

Training starts from the language model just trained (the question is whether a model trained
with this attention can learn to retrieve, not whether a random one can: a tiny model with
little pretraining did not learn the task in 300 steps, the same one pretrained on 2M bytes
did). Steps cycle through the lengths, each with `retrieval_tokens_per_step // length` samples
at uniform random depths. The loss is the cross entropy of the answer's digits and, with
`retrieval_supervise_repeat`, of the key's repetition inside the needle: a local copy any of
the models can learn, which doubles the signal for the digit-copying half of the task (one
small CPU run, 300 steps: answer accuracy 0.60 with it, 0.45 without).

Evaluation uses samples from another seed, stratified over depth buckets. A sample counts as
retrieved when every digit of the key is the argmax given the question and the digits before
it (teacher forcing), which is exactly when greedy decoding would write the key. Digit
accuracy is reported too (chance: 0.1).
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
from benchmarks.quality_training import autocast, learning_rate, make_optimizer, optimizer_step, synchronize, to_device

EVALUATION_SEED_OFFSET = 7919  # evaluation samples come from seed + this: never the training ones


def all_logits(model: nn.Module, inputs: Tensor, device: torch.device, precision: str) -> Tensor:
    with autocast(device, precision):
        return model(to_device(inputs, device))


def samples_per_step(length: int, tokens_per_step: int) -> int:
    return max(1, tokens_per_step // length)


def passkey_loss(model: nn.Module, length: int, s: QualitySettings, rng: random.Random, device: torch.device,
                 precision: str) -> Tensor:
    """Cross entropy (nats) of the key digits of one batch of fresh samples at `length`."""
    depths = [rng.random() for _ in range(samples_per_step(length, s.retrieval_tokens_per_step))]
    inputs, labels, key_mask = passkey_batch(length, depths, s.key_digits, rng)
    if not s.retrieval_supervise_repeat:
        key_mask[:, :-s.key_digits] = False
    key_mask = to_device(key_mask, device)
    logits = all_logits(model, inputs, device, precision)[key_mask].float()
    return F.cross_entropy(logits, to_device(labels, device)[key_mask])


def train_passkey(model: nn.Module, s: QualitySettings, device: torch.device, precision: str,
                  log: Callable[[str], None]) -> dict:
    """Fine-tune on passkey samples, cycling through the lengths; returns steps done, seconds and
    the loss of every step (nats)."""
    rng = random.Random(s.seed)
    optimizer = make_optimizer(model, s.retrieval_lr, s.weight_decay, device)
    losses, start, step = [], time.perf_counter(), 0
    while step < s.retrieval_steps:
        if s.retrieval_time_budget_s is not None and time.perf_counter() - start >= s.retrieval_time_budget_s:
            break
        length = s.retrieval_lengths[step % len(s.retrieval_lengths)]
        loss = passkey_loss(model, length, s, rng, device, precision)
        lr = learning_rate(step, s.retrieval_lr, s.retrieval_warmup_steps, s.retrieval_steps, s.min_lr_ratio)
        optimizer_step(model, optimizer, loss, lr, s.grad_clip)
        losses.append(float(loss.detach()))  # one sync per step: these steps are not timed for throughput
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
        inputs, labels, _ = passkey_batch(length, [depth for _, depth in chunk], s.key_digits, rng)
        predicted = all_logits(model, inputs, device, precision)[:, -s.key_digits:].argmax(-1).cpu()
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
