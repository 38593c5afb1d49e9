"""python -m benchmarks.decode.step_warps --smoke on the CPU (interpreter): each variant of the selection's merge
and of the fused combine is run, checked against the default and timed."""

import json

from benchmarks.decode import step_warps as bench
from nsa_core.kernels.decode import compressed_selection, fine_window


def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "warps.json"
    results = bench.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    launches = [r["launch"] for r in results["rows"]]
    assert launches == ["selection"] * 2 + ["selection, sorted top-k"] + ["split + combine with gates"] * 2 + [
        "split + combine, gates given"]
    for row in results["rows"]:
        assert row["us"] > 0 and row.get("same_blocks", True), row
        assert row.get("rel_err", 0.0) < 1e-5, row
    assert [r["warps"] for r in results["rows"][:5]] == ["default", 2, "default", "default", 2]
    assert "| selection | 200 | 2 | 2 |" in capsys.readouterr().out


def test_sweep_restores_the_launch_rules():
    rules = (compressed_selection.merge_kernel_warps, compressed_selection.SORTED_TOP_K, fine_window.combine_warps,
             fine_window.GATE_INPUTS_PER_STEP)
    bench.main(["--smoke"])
    assert (compressed_selection.merge_kernel_warps, compressed_selection.SORTED_TOP_K, fine_window.combine_warps,
            fine_window.GATE_INPUTS_PER_STEP) == rules
