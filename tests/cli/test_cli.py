"""Every `nsa` command through typer's CliRunner, bad input included (fixed terminal width)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from helpers import randomize_
from nsa_cli.main import app

runner = CliRunner()
ENV = {"COLUMNS": "120", "NO_COLOR": "1"}


def run(*args):
    return runner.invoke(app, list(map(str, args)), env=ENV)


def assert_user_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for w in words:
        assert w in result.output


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for cmd in ("config", "check", "visualize-selection", "export", "inspect", "convert", "bench", "env"):
        assert cmd in result.output


def test_check_main_job_json():
    result = run("check", "--seq-len", 40, "--kv-heads", 4, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is True
    names = [c["name"] for c in data["checks"]]
    assert "cached decoding equals parallel" in names and "gradcheck (tiny float64 copy)" in names
    assert data["config"]["kv_heads"] == 4


def test_check_table_and_non_causal():
    result = run("check", "--preset", "tiny", "--seq-len", 19, "--no-causal")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "SKIP" in result.output


def test_check_bad_arguments():
    assert_user_error(run("check", "--kv-heads", 3), "kv_heads must divide heads")
    assert_user_error(run("check", "--dtype", "int8"), "dtype must be one of")
    assert_user_error(run("check", "--preset", "nope"), "unknown preset")
    assert_user_error(run("check", "--seq-len", 0), "--seq-len must be an integer >= 1")


def test_config_list_show_create(tmp_path):
    assert "paper" in run("config", "list").output
    shown = run("config", "show", "paper", "--seq-len", 65536, "--json")
    assert shown.exit_code == 0
    data = json.loads(shown.stdout)
    assert data["parameters"]["total"] > 0 and data["costs"][-1]["name"] == "dense attention"
    out = tmp_path / "c.json"
    created = run("config", "create", "-o", out, "--preset", "tiny", "--kv-heads", 1, "--no-causal")
    assert created.exit_code == 0, created.output
    saved = json.loads(out.read_text())
    assert saved["kv_heads"] == 1 and saved["causal"] is False
    assert run("config", "show", out).exit_code == 0
    assert_user_error(run("config", "create", "-o", out), "exists")
    assert_user_error(run("config", "create", "-o", tmp_path / "d.json", "--heads-typo", 3), "unknown option")
    assert_user_error(run("config", "create", "-o", tmp_path / "d.json", "--kv-heads", "x"), "integer")
    assert_user_error(run("config", "show", "no-such-thing"), "neither a preset")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_user_error(run("config", "show", bad), "not valid JSON")


def test_export_inspect(tmp_path):
    out = tmp_path / "w.safetensors"
    assert run("export", "--preset", "tiny", "-o", out).exit_code == 0
    assert_user_error(run("export", "--preset", "tiny", "-o", out), "exists", "--force")
    assert run("export", "--preset", "tiny", "-o", out, "--force", "--seed", 3).exit_code == 0
    inspected = run("inspect", out, "--json")
    data = json.loads(inspected.stdout)
    assert inspected.exit_code == 0 and data["passed"] is True
    assert data["config"]["dim"] == 64 and data["findings"] == []
    assert data["tensors"]["to_qkv.weight"]["shape"] == [128, 64]
    assert "to_qkv.weight" in run("inspect", out).output
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage!garbage!")
    assert_user_error(run("inspect", corrupt), "not a safetensors file")
    assert_user_error(run("inspect", tmp_path / "missing.safetensors"), "does not exist")


def test_export_with_weights(tmp_path):
    from nsa_core import SparseAttention, get_preset

    module = randomize_(SparseAttention.from_config(get_preset("tiny")))
    torch.save(module.state_dict(), tmp_path / "w.pt")
    assert run("export", "--preset", "tiny", "--weights", tmp_path / "w.pt", "-o", tmp_path / "w.safetensors").exit_code == 0
    assert_user_error(run("export", "--preset", "seeds", "--weights", tmp_path / "w.pt", "-o", tmp_path / "x.safetensors"),
                      "do not match")


def test_inspect_fails_on_mismatch(tmp_path):
    from safetensors.torch import save_file

    from nsa_core import get_preset

    path = tmp_path / "odd.safetensors"
    save_file({"to_qkv.weight": torch.zeros(3, 3), "extra": torch.zeros(1)}, path,
              metadata={"nsa_config": get_preset("tiny").to_json(indent=None)})
    inspected = run("inspect", path, "--json")
    assert inspected.exit_code == 1  # the README: a failed check exits 1
    data = json.loads(inspected.stdout)
    joined = " ".join(data["findings"])
    assert "unexpected tensor extra" in joined and "missing tensor" in joined and "to_qkv.weight has shape" in joined


def test_visualize_selection(tmp_path):
    shown = run("visualize-selection", "--seq-len", 100)
    assert shown.exit_code == 0, shown.output
    assert "legend" in shown.output and "own block" in shown.output
    data = json.loads(run("visualize-selection", "--seq-len", 40, "--json").stdout)
    assert data["selected_key_blocks_per_query_block"]["0"] == []
    assert len(data["queries_per_selected_key_block"]) == 5 and data["output"] is None
    svg = tmp_path / "s.svg"
    assert run("visualize-selection", "-o", svg).exit_code == 0 and svg.read_text().startswith("<svg")
    html = tmp_path / "s.html"
    assert run("visualize-selection", "-o", html).exit_code == 0 and "<html" in html.read_text().lower()
    assert_user_error(run("visualize-selection", "--head", 9), "head must be in")
    assert_user_error(run("visualize-selection", "-o", tmp_path / "s.gif"), ".png, .svg or .html")


def test_visualize_from_weights_and_input(tmp_path):
    weights = tmp_path / "w.safetensors"
    run("export", "--preset", "tiny", "-o", weights)
    inp = tmp_path / "x.pt"
    torch.save(torch.randn(1, 50, 64), inp)
    assert run("visualize-selection", "--weights", weights, "--input", inp).exit_code == 0
    torch.save(torch.randn(1, 50, 63), inp)
    assert_user_error(run("visualize-selection", "--weights", weights, "--input", inp), "dim=64")


def test_png_without_matplotlib_says_how(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert_user_error(run("visualize-selection", "-o", tmp_path / "s.png"), "pip install 'nsa[plot]'")


def test_convert_round_trip(tmp_path):
    oracle = pytest.importorskip("native_sparse_attention_pytorch")
    theirs = randomize_(oracle.SparseAttention(dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=4,
                                               compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=8,
                                               num_selected_blocks=2, causal=True), std=0.2)
    src = tmp_path / "theirs.pt"
    torch.save(theirs.state_dict(), src)
    dst = tmp_path / "ours.safetensors"
    assert_user_error(run("convert", src, dst, "--from", "lucidrains"), "cannot tell")
    result = run("convert", src, dst, "--from", "lucidrains", "--causal", "--sliding-window-size", 4,
                 "--compress-block-sliding-stride", 4, "--selection-block-size", 8, "--num-selected-blocks", 2)
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output
    back = tmp_path / "back.pt"
    assert run("convert", dst, back, "--to", "lucidrains").exit_code == 0
    state = torch.load(back, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in theirs.state_dict().items())
    assert_user_error(run("convert", src, tmp_path / "x", "--from", "other"), "lucidrains")
    assert_user_error(run("convert", src, dst, "--from", "lucidrains"), "exists")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"nope")
    assert_user_error(run("convert", garbage, tmp_path / "y.safetensors", "--from", "lucidrains"), "not a loadable")


def test_bench_needs_cuda_or_cpu_flag():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert_user_error(run("bench"), "no CUDA device")
    result = run("bench", "--device", "cpu", "--preset", "tiny", "--seq-len", "64,128", "--dtype", "fp32", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["seq_len"] for r in rows] == [64, 128] and all(r["nsa_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    assert_user_error(run("bench", "--device", "cpu", "--seq-len", "a,b"), "--seq-len")


def test_env():
    data = json.loads(run("env", "--json").stdout)
    assert {"python", "torch", "triton", "kernels_can_run"} <= set(data)


def test_visualize_png_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    assert run("visualize-selection", "--seq-len", 64, "-o", png).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_decode_on_the_cpu():
    """`nsa bench --decode` as a user runs it on a CPU: one step per context against dense with a static
    KV cache, the bytes each reads and their floor at the measured copy bandwidth, generation tokens/s."""
    result = run("bench", "--decode", "--device", "cpu", "--preset", "tiny", "--seq-len", "96,160", "--batch", 2, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["context"] for r in report["rows"]] == [96, 160] and report["batch"] == 2
    for r in report["rows"]:
        assert r["nsa_ms"] > 0 and r["dense_ms"] > 0 and r["speedup"] == pytest.approx(r["dense_ms"] / r["nsa_ms"])
        assert r["nsa_floor_ms"] > 0 and r["dense_floor_ms"] > 0
        # the attention alone: the step minus its projections, timed alone
        assert r["nsa_projections_ms"] > 0 and r["dense_projections_ms"] > 0
        assert r["nsa_attention_ms"] == pytest.approx(r["nsa_ms"] - r["nsa_projections_ms"])
        assert r["dense_attention_ms"] == pytest.approx(r["dense_ms"] - r["dense_projections_ms"])
        if r["nsa_attention_ms"] > 0 and r["dense_attention_ms"] > 0:
            assert r["attention_speedup"] == pytest.approx(r["dense_attention_ms"] / r["nsa_attention_ms"])
        # one bandwidth for both sides: the floors are in the ratio of the bytes
        assert r["nsa_floor_ms"] / r["dense_floor_ms"] == pytest.approx(r["nsa_cache_mb"] / r["dense_cache_mb"])
    assert report["rows"][1]["dense_cache_mb"] > report["rows"][0]["dense_cache_mb"]
    assert all(v > 0 for v in report["generation"]["tokens_per_s"].values())
    table = run("bench", "--decode", "--device", "cpu", "--preset", "tiny", "--seq-len", "96")
    assert table.exit_code == 0 and "byte floor" in table.stdout and "tokens/s" in table.stdout
    assert "attention" in table.stdout
