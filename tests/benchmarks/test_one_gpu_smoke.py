"""python -m benchmarks.distributed.one_gpu --smoke on the CPU: the compute-balance table of both shard
layouts at P = 2, 4, 8 (contiguous: rank 0 and the last timed; balanced: every rank)."""

from benchmarks.distributed import one_gpu as bench


def test_smoke_prints_a_row_per_layout_and_p(capsys):
    rows = bench.main(["--smoke"])
    for layout, which in (("contiguous", "0, last"), ("balanced", "all")):
        for world in (2, 4, 8):
            assert any(row.startswith(f"| {layout} | {world} | {128 // world} | {which} |") for row in rows), rows
    assert bench.ranks_timed(4, "balanced") == [0, 1, 2, 3] and bench.ranks_timed(4, "contiguous") == [0, 3]
    assert "| layout | P | shard |" in capsys.readouterr().out
