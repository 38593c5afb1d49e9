"""python -m benchmarks.kernels.selected_tiles --smoke on the CPU (interpreter): the whole script runs
(check against by query, timings, table, JSON), and the benchmark's overlapping selections stay
causal, distinct and drawn from each tile's pool."""

import json

import torch

from benchmarks.kernels import selected_tiles as bench


def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "tiles.json"
    results = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert {(r["case"]["name"], r["scheme"]) for r in results["rows"]} >= {("lm-packed", "by_tile"), ("paper", "by_tile+dq")}
    for row in results["rows"]:
        assert max(row["max_err_vs_by_query"].values()) < 1e-4, row["scheme"]
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["union_blocks_per_tile"] >= 1
    assert "| by_tile | lm-packed |" in capsys.readouterr().out


def test_overlapping_selections_share_a_pool_per_tile():
    case = bench.Case("x", 200, 4, 2, 16, 8, 4, (90, 0, 1, 109), "overlap", ("by_tile",))
    indices, valid = bench.selections(case, "cpu")
    own = bench.positions(case, "cpu") // case.block
    assert (indices[valid] < own.view(1, 1, -1, 1).expand_as(indices)[valid]).all()
    for t in range(0, 200, 16):
        for h in range(2):
            tile = {b for r in range(t, min(t + 16, 200)) for b, ok in zip(indices[0, h, r].tolist(), valid[0, h, r].tolist()) if ok}
            assert len(tile) <= 20
            for r in range(t, min(t + 16, 200)):
                picked = indices[0, h, r][valid[0, h, r]].tolist()
                assert len(picked) == len(set(picked))
    random_case = bench.Case("x", 200, 4, 2, 16, 8, 4, None, "random", ("by_tile",))
    indices, valid = bench.selections(random_case, "cpu")
    assert valid.any() and (indices[valid] < (torch.arange(200) // 8).view(1, 1, -1, 1).expand_as(indices)[valid]).all()
