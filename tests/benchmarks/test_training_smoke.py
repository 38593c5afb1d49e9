"""python -m benchmarks.module.training --smoke on the CPU: every section that runs on a CPU (attention, the
training step) times its paths, the CUDA-only ones say why not, the tables print and the JSON holds it
all; the attention path without output projection is attend_projected less that projection; the cold
compile-time child process runs (tiny preset on the CPU)."""

import json
import os

import pytest
import torch

from benchmarks.module import training as bench
from benchmarks.module.cold_compile import compile_time
from benchmarks.module.training_attention import AttentionOutput, random_leaves
from nsa_core import SparseAttention, get_preset


def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "training.json"
    results = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["device"] == "cpu" and results["torch"] == torch.__version__
    section = results["attention"]["2"]
    assert section["correctness"]["ok"] and section["correctness"]["seq_len"] == 64
    if os.environ.get("TRITON_INTERPRET") == "1":  # the check runs the kernels wherever they run
        assert section["correctness"]["kernel_path"] == "triton"
    row = section["rows"]["128"]
    for path in ("dense SDPA (CPU)", "nsa eager", "output projection alone"):
        assert row[path]["fwd"] > 0 and row[path]["fwd_bwd"] > 0, path
    assert row["nsa graphed"] == {"skipped": "needs CUDA"} and row["flash-nsa"] == {"skipped": "needs CUDA"}
    assert row["ratios"]["nsa eager / best dense fwd_bwd"] > 0
    assert row["ratios"]["nsa graphed / best dense fwd_bwd"] is None
    step = results["step"]["rows"]["64x2"]
    assert step["nsa eager"]["ms"] > 0 and step["dense SDPA (CPU) eager"]["ms"] > 0
    assert step["nsa graphed"]["skipped"] == step["dense graphed"]["skipped"] == "needs CUDA"
    assert step["ratios"]["best dense eager / nsa eager"] > 0
    assert results["compile"] == {"skipped": "skipped: needs CUDA"}
    printed = capsys.readouterr().out
    assert "| T | dense SDPA (CPU) | flash-nsa | nsa eager | nsa graphed |" in printed
    assert "| 64x2 |" in printed


def test_sections_run_alone():
    results = bench.main(["--smoke", "--sections", "step"])
    assert "step" in results and "attention" not in results and "compile" not in results


def test_attention_output_is_attend_projected_before_the_output_projection():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    nsa = SparseAttention.from_config(cfg)
    leaves = random_leaves(cfg, 40, torch.device("cpu"), torch.float32, seed=0)
    core = AttentionOutput(nsa)
    assert isinstance(nsa.combine_heads, torch.nn.Linear)  # the module itself keeps its projection
    torch.testing.assert_close(nsa.combine_heads(core(*leaves)), nsa.attend_projected(*leaves), rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused():
    for argv in (["--step-shapes", "512by32"], ["--seq-lens", "4096,x"], ["--sections", "attention,speed"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--smoke", *argv])
        assert exit_info.value.code == 2


def test_compile_time_child_runs():
    result = compile_time("tiny", 64, "cpu")
    assert "error" not in result, result
    assert result["first_call_s"] > 0 and result["second_call_s"] > 0 and result["within_limit"]
