"""A paused language-model run: everything its training loop needs to go on in a later command.

A run longer than one command (a device call lasts at most 10 minutes) saves its state at each
evaluation: weights, optimizer moments, the batch generator, the step, the training seconds so far
and the record of curves. A later command with the same checkpoint file continues exactly where it
stopped: the batches, learning rates and curves are those of an uninterrupted run (the weights agree
to the last bit on the same device and versions; `test_lm.py` checks it on the CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class TrainingState:
    step: int
    seconds: float  # training seconds so far (evaluations and compilation excluded)
    record: dict  # the run's record: curves, train losses, segments


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, batches: torch.Generator,
                    state: TrainingState, config: dict) -> None:
    """Write, then rename over the old file (a killed process never leaves half a checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"config": config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "batches": batches.get_state(), "step": state.step, "seconds": state.seconds,
                "record": state.record}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, batches: torch.Generator,
                    config: dict) -> TrainingState:
    """Restore model, optimizer and generator in place from `path`; its run must have the same `config`."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("config") != config:
        raise ValueError(f"checkpoint {path} belongs to a run of another configuration; "
                         "delete it or point --checkpoint-dir elsewhere")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    batches.set_state(saved["batches"])
    return TrainingState(step=int(saved["step"]), seconds=float(saved["seconds"]), record=saved["record"])
