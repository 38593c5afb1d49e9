"""Training and evaluation of one retrieval run (one task, model, learning rate and seed).

AdamW (betas 0.9 / 0.95, weight decay on matrices), linear warmup then cosine decay, gradient
clipping, the loss on the answer positions only; bf16 autocast on CUDA, fp32 on the CPU. The
training rows come from a generator seeded with the run's seed (every model with that seed and
the same curriculum sees the same rows); every evaluation draws fresh rows at the target length
from a second generator (the same ones for every model with that seed).

No host sync inside a step: the loss, the accuracy and the gradient norms stay on the device
and are read back every `sync_every` steps, where the curriculum advances, the time budget is
checked and a diverged loss stops the run. Nothing here prints: progress goes to `log`, the
record to `on_eval` after every evaluation (so a killed run keeps its curve so far).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.quality_training import autocast, learning_rate, make_optimizer, synchronize
from benchmarks.retrieval.diagnostics import GradientNorms, LayerProbe, capture_layers
from benchmarks.retrieval.models import RetrievalModel, sparse_layers
from benchmarks.retrieval.tasks import Batch, Curriculum, Task

EVAL_SEED_OFFSET = 1_000_003  # the evaluation rows' generator: seed + this
THRESHOLDS = (0.9, 0.95)


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int
    eval_every: int
    eval_rows: int
    lr: float
    seed: int
    target_length: int
    curriculum_start: int
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    curriculum_threshold: float = 0.9
    sync_every: int = 25
    time_budget_s: float | None = None
    stop_at_accuracy: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def answer_loss(model: nn.Module, batch: Batch, device: torch.device, precision: str) -> tuple[Tensor, Tensor]:
    """(mean cross entropy over the answers, number of correct answers), both on the device."""
    with autocast(device, precision):
        logits = model(batch.ids, batch.answer_pos)
    logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
    return loss, (logits.argmax(dim=-1) == batch.targets).sum()


def steps_to(steps: list[int], accuracy: list[float], threshold: float) -> int | None:
    """The first evaluated step whose accuracy reaches `threshold` (None if none does)."""
    return next((step for step, acc in zip(steps, accuracy) if acc >= threshold), None)


@torch.no_grad()
def evaluate(model: RetrievalModel, task: Task, s: TrainSettings, generator: torch.Generator, device: torch.device,
             precision: str) -> dict:
    """Accuracy and loss on `eval_rows` fresh rows at the target length, with the NSA layers' probe."""
    layers = sparse_layers(model)
    probe = LayerProbe(layers, device)
    model.eval()
    correct, loss_sum, answers = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for start in range(0, s.eval_rows, s.batch):
        batch = task.batch(min(s.batch, s.eval_rows - start), s.target_length, generator, device)
        with capture_layers(layers) as (inputs, gates), autocast(device, precision):
            loss, right = answer_loss(model, batch, device, precision)
            probe.add([x[-1] for x in inputs], [g[-1] for g in gates], batch)
        count = batch.targets.numel()
        correct, loss_sum, answers = correct + right, loss_sum + loss * count, answers + count
    model.train()
    return {"accuracy": float(correct) / answers, "loss": float(loss_sum) / answers, **probe.result()}


def train_run(model: RetrievalModel, task: Task, s: TrainSettings, device: torch.device, precision: str,
              on_eval: Callable[[dict], None], log: Callable[[str], None], step_model: nn.Module | None = None) -> dict:
    """Train `model` on `task`; returns the run's record. `step_model` (e.g. a torch.compile'd
    `model`) runs the training steps when given; evaluation always runs `model` (it hooks its layers)."""
    step_model = model if step_model is None else step_model
    start_time = time.perf_counter()
    train_rows = torch.Generator(device=device).manual_seed(s.seed)
    eval_rows = torch.Generator(device=device).manual_seed(s.seed + EVAL_SEED_OFFSET)
    optimizer = make_optimizer(model, s.lr, s.weight_decay, device)
    curriculum = Curriculum(s.curriculum_start, s.target_length, s.curriculum_threshold)
    grad_norms = GradientNorms(list(model.attentions), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record = {"eval": {"step": [], "accuracy": [], "loss": [], "train_length": [], "seconds": []},
              "train": {"step": [], "loss": [], "accuracy": [], "length": []},
              "diagnostics": {"step": [], "hit_rate": [], "hit_rate_random": [], "gates": [], "gates_at_answers": [],
                              "grad_norms": []},
              "curriculum": [{"step": 0, "length": curriculum.length}], "status": "running"}
    eval_seconds = 0.0

    def run_eval(step: int) -> float:
        nonlocal eval_seconds
        begin = time.perf_counter()
        result = evaluate(model, task, s, eval_rows, device, precision)
        eval_seconds += time.perf_counter() - begin
        curve = record["eval"]
        for key, value in (("step", step), ("accuracy", round(result["accuracy"], 4)),
                           ("loss", round(result["loss"], 4)), ("train_length", curriculum.length),
                           ("seconds", round(time.perf_counter() - start_time, 2))):
            curve[key].append(value)
        diag = record["diagnostics"]
        if result.get("hit_rate") is not None or any(grad_norms.groups):
            diag["step"].append(step)
            for key in ("hit_rate", "hit_rate_random", "gates", "gates_at_answers"):
                diag[key].append(result.get(key))
            diag["grad_norms"].append(grad_norms.result())
        hit = f"  hit {result['hit_rate']}" if result.get("hit_rate") else ""
        log(f"step {step:6d}  len {curriculum.length:6d}  eval acc {result['accuracy']:.3f}  "
            f"loss {result['loss']:.3f}{hit}")
        on_eval(record)
        return result["accuracy"]

    run_eval(0)
    step, stopped, pending = 0, "steps", []
    while step < s.steps:
        batch = task.batch(s.batch, curriculum.length, train_rows, device)
        lr = learning_rate(step, s.lr, s.warmup_steps, s.steps, s.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, right = answer_loss(step_model, batch, device, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.add()
        nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        pending.append(torch.stack((loss.detach(), right.float() / batch.targets.numel())))
        step += 1
        evaluating = step % s.eval_every == 0 or step == s.steps
        if step % s.sync_every and not evaluating:
            continue
        losses, accuracies = torch.stack(pending).mean(dim=0).tolist()  # the host sync
        train = record["train"]
        for key, value in (("step", step), ("loss", round(losses, 4)), ("accuracy", round(accuracies, 4)),
                           ("length", curriculum.length)):
            train[key].append(value)
        pending = []
        if not math.isfinite(losses):
            stopped = "diverged"
        elif curriculum.update(accuracies):
            record["curriculum"].append({"step": step, "length": curriculum.length})
            log(f"step {step:6d}  curriculum -> {curriculum.length} tokens")
        over_time = s.time_budget_s is not None and time.perf_counter() - start_time >= s.time_budget_s
        if over_time and stopped == "steps":
            stopped = "time_budget"
        if evaluating or stopped != "steps":
            accuracy = run_eval(step)
            if stopped == "steps" and s.stop_at_accuracy is not None and accuracy >= s.stop_at_accuracy:
                stopped = "accuracy"
        if stopped != "steps":
            break
    synchronize(device)
    wall = time.perf_counter() - start_time
    curve = record["eval"]
    record.update({
        "status": "finished", "steps": step, "stopped": stopped,
        "steps_to": {str(t): steps_to(curve["step"], curve["accuracy"], t) for t in THRESHOLDS},
        "final_accuracy": curve["accuracy"][-1], "wall_seconds": round(wall, 2),
        "train_seconds": round(wall - eval_seconds, 2), "eval_seconds": round(eval_seconds, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    })
    on_eval(record)
    return record
