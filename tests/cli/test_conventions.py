"""One convention for booleans (--flag/--no-flag), --json wherever a command reports something,
progress on stderr only, bench's small CPU defaults, and `check` on sequences shorter than a
compression stride."""

import io
import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from nsa_cli.main import app
from nsa_core import SparseAttention, get_preset

runner = CliRunner()
ENV = {"COLUMNS": "120", "NO_COLOR": "1"}


def run(*args):
    return runner.invoke(app, list(map(str, args)), env=ENV)


def test_config_create_takes_no_causal_and_reports_json(tmp_path):
    out = tmp_path / "c.json"
    result = run("config", "create", "-o", out, "--preset", "tiny", "--no-causal", "--no-norm", "--kv-heads", 1, "--json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)
    assert reported["output"] == str(out) and reported["config"] == json.loads(out.read_text())
    assert reported["config"]["causal"] is False and reported["config"]["norm"] is False
    assert run("config", "create", "-o", out, "--preset", "tiny", "--no-causal", "--causal", "--force").exit_code == 0
    assert json.loads(out.read_text())["causal"] is True  # the last flag wins


def test_export_and_convert_report_json_and_take_no_causal(tmp_path):
    weights = tmp_path / "w.safetensors"
    exported = json.loads(run("export", "--preset", "tiny", "-o", weights, "--json").stdout)
    assert exported["output"] == str(weights) and exported["parameters"] > 0 and exported["bytes"] == weights.stat().st_size
    back = tmp_path / "w.pt"
    to = json.loads(run("convert", weights, back, "--to", "lucidrains", "--json").stdout)
    assert to["tensors"] == len(torch.load(back, weights_only=True))
    state = tmp_path / "theirs.pt"
    torch.save(SparseAttention.from_config(get_preset("tiny")).state_dict(), state)
    result = run("convert", state, tmp_path / "ours.safetensors", "--from", "lucidrains", "--no-causal", "--sliding-window-size", 8,
                 "--compress-block-sliding-stride", 4, "--selection-block-size", 8, "--num-selected-blocks", 2, "--json")
    assert result.exit_code == 0, result.output
    converted = json.loads(result.stdout)
    assert converted["config"]["causal"] is False and converted["inferred"]["dim"] == 64
    assert json.loads(run("inspect", tmp_path / "ours.safetensors", "--json").stdout)["config"]["causal"] is False


@pytest.fixture
def terminal_stderr(monkeypatch):
    """stderr as a terminal, so progress shows; what it printed."""
    from nsa_cli.support import common

    buffer = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=buffer, force_terminal=True, width=100))
    return buffer


def test_progress_goes_to_stderr_not_stdout_and_not_with_json(tmp_path, terminal_stderr):
    result = run("export", "--preset", "tiny", "-o", tmp_path / "a.safetensors")
    assert result.exit_code == 0 and result.stdout == "" and "export:" in terminal_stderr.getvalue()
    assert result.stderr.startswith("wrote ")  # messages on stderr, results on stdout
    terminal_stderr.truncate(0)
    terminal_stderr.seek(0)
    result = run("export", "--preset", "tiny", "-o", tmp_path / "b.safetensors", "--json")
    assert json.loads(result.stdout)["parameters"] > 0 and terminal_stderr.getvalue() == ""


def test_check_prints_a_line_per_step_when_stderr_is_not_a_terminal():
    """A log (stderr not a terminal) shows where a long check is: one line per step, in order, with
    the seconds since the start; none with --json, and never on stdout."""
    from nsa_cli.support.checks import STEPS

    result = run("check", "--preset", "tiny", "--seq-len", 9)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [f"check: {step}" for step in STEPS] + ["check: done"]
    seconds = [float(line[1:].split(" s]")[0]) for line in lines]
    assert seconds == sorted(seconds) and "check: forward" not in result.stdout
    result = run("check", "--preset", "tiny", "--seq-len", 9, "--json")
    assert result.exit_code == 0 and result.stderr == "" and json.loads(result.stdout)["passed"]


def test_bench_progress_and_small_cpu_defaults(monkeypatch, terminal_stderr):
    from nsa_cli.commands import bench

    seen = {}

    def fake_benchmark(cfg, lengths, *, on_progress, **kwargs):
        seen.update(cfg=cfg, lengths=lengths, **kwargs)
        on_progress(1, 2 * len(lengths), "seq_len 256: nsa")
        return []

    monkeypatch.setattr(bench, "benchmark", fake_benchmark)
    assert run("bench", "--device", "cpu").exit_code == 0
    assert seen["cfg"] == get_preset("tiny") and seen["lengths"] == [256, 512] and seen["dtype"] == "fp32"
    assert "bench: seq_len 256: nsa" in terminal_stderr.getvalue()
    assert run("bench", "--device", "cpu", "--preset", "seeds", "--seq-len", "1k", "--dtype", "bf16").exit_code == 0
    assert seen["cfg"] == get_preset("seeds") and seen["lengths"] == [1024] and seen["dtype"] == "bf16"


def test_check_passes_below_a_compression_stride():
    """At seq_len 3 (stride 4) no query attends a compressed block: the compression MLP and the
    intra-block positions get no gradient, which is not a failure."""
    result = run("check", "--seq-len", 3, "--kv-heads", 4, "--json")
    assert result.exit_code == 0, result.output
    grads = next(c for c in json.loads(result.stdout)["checks"] if c["name"].startswith("gradients"))
    assert grads["passed"] and grads["value"].startswith("6/16")
    assert len(grads["figures"]["unreachable_at_this_length"]) == 10 and "below seq_len 5" in grads["detail"]


@pytest.mark.parametrize("causal, length, reachable", [(True, 4, False), (True, 5, True), (False, 3, False), (False, 4, True)])
def test_compression_reachability_matches_the_module(causal, length, reachable):
    """The rule `check` uses, against the gradients the module really gets."""
    from nsa_cli.support.checks import compression_unreachable, randomize_parameters

    cfg = get_preset("seeds").replace(causal=causal, backend="torch")
    module = SparseAttention.from_config(cfg)
    randomize_parameters(module, 0)
    module(torch.randn(1, length, cfg.dim)).sum().backward()
    grad = module.k_compress[1].weight.grad
    assert (grad is not None and bool(grad.any())) == reachable
    assert compression_unreachable(cfg, length) == (not reachable)
