"""python -m benchmarks.decode.compression_tiles --smoke on the CPU (interpreter): every tiling is checked
against the PyTorch path and timed, for a batch where one row completes a window and one where all do."""

import json

from benchmarks.decode import compression_tiles as bench


def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "tiles.json"
    results = bench.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert {r["case"] for r in results["rows"]} == {"ragged", "in step"} and len(results["rows"]) == 4
    for row in results["rows"]:
        assert row["max_error"] < 1e-4 and row["us"] > 0, row
    assert "| ragged | 32 | 128 |" in capsys.readouterr().out


def test_problem_completes_windows_only_where_asked():
    attn, t, scratch = bench.compression_problem(bench.SMOKE, 3, 1, 256, "cpu", bench.torch.float32)
    ends = t["slot_of"][t["positions"][:, 0]]
    assert (ends != scratch).tolist() == [True, False, False]
