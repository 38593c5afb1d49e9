"""benchmarks.kernels.selection_overlap: the load-fraction measure on hand-made selections, and a smoke run."""

import torch

from benchmarks.kernels.selection_overlap import load_fraction, main, random_like


def test_load_fraction_counts_distinct_blocks_per_tile():
    # one row, one head, 4 queries, 2 slots; tiles of 2: {1, 2} + {3} over 4 and 3 valid selections
    indices = torch.tensor([[[[1, 2], [2, 1], [3, 0], [3, 3]]]])
    valid = torch.tensor([[[[True, True], [True, True], [True, False], [True, False]]]])
    assert load_fraction(indices, valid, 1, 4) == 1.0
    assert load_fraction(indices, valid, 2, 4) == (2 + 1) / 6
    assert load_fraction(indices, valid, 4, 4) == 3 / 6
    assert load_fraction(indices, valid, 8, 4) is None  # no tile of 8 in 4 queries


def test_random_selections_stay_causal_and_distinct():
    valid = torch.ones(1, 1, 40, 3, dtype=torch.bool)
    picked = random_like(valid, 8, torch.Generator().manual_seed(0))
    own = torch.arange(40)[:, None] // 8
    late = own[:, 0] >= 3  # queries that see at least 3 earlier blocks
    assert (picked[0, 0][late] < own[late]).all()
    assert all(len(set(row.tolist())) == 3 for row in picked[0, 0][late])


def test_smoke_run(tmp_path):
    out = tmp_path / "overlap.json"
    results = main(["--smoke", "--out", str(out)])
    assert out.exists() and results["training"]["steps"] == 3
    for layer in results["trained"]:
        assert layer["load_fraction"][1] == 1.0 and 0 < layer["load_fraction"][16] <= 1.0
