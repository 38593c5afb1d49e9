"""python -m benchmarks.module.packed --smoke on the CPU: the whole script runs (correctness check, every path
that runs on a CPU timed, the table, the JSON), and packed equals per-document."""

import json

from benchmarks.module import packed as bench


def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "packed.json"
    results = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert max(results["correctness"].values()) < 1e-5
    assert sum(results["documents"]) == results["seq_len"] == 128
    rows = results["rows"]
    for name in ("NSA packed (one call)", "NSA per-document calls (sum)", "dense SDPA per document"):
        assert rows[name]["fwd"] > 0 and rows[name]["fwd_bwd"] > 0, name
    assert rows["dense FlexAttention document mask"]["fwd"] > 0  # no CPU backward
    assert results["ratios"]["fwd"]["packed_over_per_doc"] > 0
    assert results["flash_nsa"].startswith("not run")
    assert "| NSA packed (one call) |" in capsys.readouterr().out


def test_document_lengths_fill_the_row():
    lengths = bench.document_lengths(65536, 1024, 16384, seed=0)
    assert sum(lengths) == 65536 and all(1 <= n <= 16384 for n in lengths)
    assert all(n >= 1024 for n in lengths[:-1])
    assert lengths == bench.document_lengths(65536, 1024, 16384, seed=0)
