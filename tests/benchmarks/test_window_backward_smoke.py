"""python -m benchmarks.kernels.window_backward --smoke on the CPU (interpreter): each variant of the window's
backward launch runs, equals the launch's own settings and is timed; the launch's settings are restored."""

import json

from benchmarks.kernels import window_backward as bench
from nsa_core.kernels.sliding_window import launch


def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "window_backward.json"
    rules = launch.tile_config, launch.DKDV_OVERRIDES
    results = bench.main(["--smoke", "--json", str(out)])
    assert (launch.tile_config, launch.DKDV_OVERRIDES) == rules
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert [(r["kernel"], r["variant"]) for r in results["rows"]] == [
        ("dk/dv", "own tiles"), ("dk/dv", "3 stages"), ("dq", "own tiles"), ("dq", "1 stage")]
    for row in results["rows"]:
        assert row["backward_ms"] > 0 and row["forward_ms"] > 0, row
        assert row["max_rel_diff"] < 1e-5, row
    assert "| 120 | 3 | dk/dv | 3 stages |" in capsys.readouterr().out
