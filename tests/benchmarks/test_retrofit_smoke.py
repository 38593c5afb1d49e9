"""benchmarks.hf.retrofit: a smoke run (a few steps of a tiny model) reports every figure."""

import pytest

pytest.importorskip("transformers")

from benchmarks.hf.retrofit import main  # noqa: E402


def test_smoke_run(tmp_path):
    out = tmp_path / "retrofit.json"
    result = main(["--smoke", "--out", str(out)])
    assert out.exists()
    within = result["within_window"]
    assert abs(within["converted"] - within["dense"]) <= 1e-5 * within["dense"]
    assert set(result["after"]) == {"dense", "converted"}
