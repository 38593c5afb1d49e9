"""benchmarks/quality.py end to end: the `--smoke` run on the CPU writes the JSON (all four models,
losses that go down, retrieval accuracies in [0, 1]) and the PNG; bad arguments are one-line
errors; passkey samples have the promised layout.

No __init__.py in this folder on purpose: as a package it would be named `benchmarks` and
shadow the repository's benchmarks/ package.
"""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("nsa", "dense", "window", "no_selection")
SMOKE_TIMEOUT_S = 600  # a hang fails instead of blocking CI; the run itself takes about a minute


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.quality", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    result = run_script("--smoke", "--out", str(out), timeout=SMOKE_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, json.loads((out / "results_quality.json").read_text()), result.stdout


def test_smoke_trains_all_four_models_and_their_loss_goes_down(smoke_run):
    _, results, _ = smoke_run
    assert set(results["runs"]) == set(VARIANTS)
    for name, run in results["runs"].items():
        assert len(run["val_loss"]) == len(run["val_step"]) >= 2, name
        assert run["val_loss"][-1] < run["val_loss"][0], (name, run["val_loss"])
        assert run["tokens_per_s"] > 0 and run["params"] > run["attention_params"] > 0, name
    tokens = {run["tokens"] for run in results["runs"].values()}
    assert len(tokens) == 1, f"models saw different token counts: {tokens}"


def test_smoke_no_selection_model_never_uses_its_selected_branch(smoke_run):
    _, results, _ = smoke_run
    depth = results["settings"]["depth"]
    for probe in ("branch_gates_after_lm", "branch_gates_after_passkey"):
        ablation, nsa = results["runs"]["no_selection"][probe], results["runs"]["nsa"][probe]
        assert len(ablation) == len(nsa) == depth
        assert all(layer["selected"] == 0.0 for layer in ablation)
        assert all(0.0 < layer[branch] < 1.0 for layer in nsa for branch in ("compressed", "selected", "sliding"))
        assert results["runs"]["dense"][probe] is None


def test_smoke_reports_retrieval_accuracy_per_length_and_depth(smoke_run):
    _, results, _ = smoke_run
    lengths = [str(n) for n in results["settings"]["retrieval_lengths"]]
    assert set(results["retrieval"]) == set(VARIANTS)
    for name, per_length in results["retrieval"].items():
        assert sorted(per_length) == sorted(lengths), name
        for length, record in per_length.items():
            assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["digit_accuracy"] <= 1.0, (name, length)
            assert len(record["by_depth"]) == results["settings"]["depth_buckets"]
            assert all(0.0 <= acc <= 1.0 for acc in record["by_depth"].values()), (name, length)


def test_smoke_writes_the_picture_and_the_table(smoke_run):
    out, _, stdout = smoke_run
    assert "NSA quality comparison" in stdout and "no_selection" in stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "results_quality.png").stat().st_size > 10_000


@pytest.fixture
def quality_modules(monkeypatch):
    """The repository root on sys.path, so that `benchmarks.quality*` import in this process."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))


@pytest.mark.parametrize("args, name", [(["--steps", "0"], "steps"), (["--models", "nsa,flash"], "models"),
                                        (["--retrieval-lengths", "64"], "retrieval_lengths"),
                                        (["--precision", "fp8"], "precision")])
def test_bad_arguments_are_one_line_errors_naming_the_argument(quality_modules, tmp_path, capsys, args, name):
    from benchmarks.quality import main

    assert main(["--smoke", "--out", str(tmp_path), *args]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ") and name in out and len(out.strip().splitlines()) == 1, out


def test_passkey_samples_have_the_exact_length_and_end_with_the_key(quality_modules):
    from benchmarks.quality_data import NEEDLE, QUESTION, passkey_batch, passkey_text

    for length, depth in ((256, 0.0), (300, 0.37), (1024, 1.0)):
        text, needle_start = passkey_text(length, depth, "48213")
        assert len(text) == length + 1 and text.endswith(QUESTION + "48213")
        assert text.index(NEEDLE.format(key="48213")) == needle_start and text.count("pass key is 48213") == 2
    inputs, labels, key_mask = passkey_batch(512, [0.1, 0.9], digits=5, rng=random.Random(0))
    assert inputs.shape == labels.shape == key_mask.shape == (2, 512)
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert key_mask.sum().item() == 2 * 2 * 5 and key_mask[:, -5:].all()
    for row in range(2):
        key = labels[row, -5:]
        assert torch.equal(labels[row][key_mask[row]], torch.cat((key, key)))  # the repetition, then the answer
    with pytest.raises(ValueError, match="too short"):
        passkey_text(40, 0.5, "48213")
