"""The environment record of a benchmark run names the commit it ran at."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from benchmarks.quality_report import environment

REPO = Path(__file__).resolve().parents[2]


def test_commit_named_by_the_environment_wins(monkeypatch):
    monkeypatch.setenv("NSA_GIT_COMMIT", "0123abc")
    assert environment(torch.device("cpu"), "fp32")["git_commit"] == "0123abc"


def test_commit_read_from_the_checkout(monkeypatch):
    monkeypatch.delenv("NSA_GIT_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert environment(torch.device("cpu"), "fp32")["git_commit"] == (head or None)


def test_no_checkout_records_none(monkeypatch, tmp_path):
    import benchmarks.quality_report as report

    monkeypatch.delenv("NSA_GIT_COMMIT", raising=False)
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "absent"))
    assert report._git_commit(tmp_path) is None
