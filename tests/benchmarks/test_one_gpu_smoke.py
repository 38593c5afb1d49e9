"""python -m benchmarks.distributed.one_gpu --smoke on the CPU: the scaling table of both shard
layouts at P = 2, 4, 8 (contiguous: rank 0 and the last timed; balanced: every rank), the bytes per
layer, and the JSON it writes."""

import json

from benchmarks.distributed import one_gpu as bench


def test_smoke_writes_a_row_per_layout_and_p(tmp_path, capsys):
    out = tmp_path / "sp.json"
    results = bench.main(["--smoke", "--out", str(out)])
    rows = {(r["layout"], r["P"]): r for r in results["scaling"]}
    for layout in ("contiguous", "balanced"):
        for world in (2, 4, 8):
            row = rows[(layout, world)]
            assert sorted(row["ms_per_rank"]) == bench.ranks_timed(world, layout) and row["scaling"] > 0
    assert bench.ranks_timed(4, "balanced") == [0, 1, 2, 3] and bench.ranks_timed(4, "contiguous") == [0, 3]
    saved = json.loads(out.read_text())
    assert len(saved["scaling"]) == 6 and {r["seq_len"] for r in saved["bytes"]} == {128, 256}
    for row in saved["bytes"]:  # keys and values dominate; the compressed tokens are n / stride of them
        g = row["gathered_bytes"]
        assert g["keys"] > g["compressed"] > 0 and row["received_per_rank"] < row["gathered_total"]
    assert "| seq | layout | P |" in capsys.readouterr().out
