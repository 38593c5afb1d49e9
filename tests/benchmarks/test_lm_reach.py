"""The attention-reach probe of the language-model comparison (benchmarks/lm/attention_reach.py): the far
attention mass against a plain softmax, the selection's shares on hand-made cases, and the probe on the
comparison's models (every block selectable: captured = ideal = all)."""

import json
from dataclasses import replace

import pytest
import torch

from benchmarks.lm.attention_reach import attention_reach, far_block_mass, long_documents, selection_shares
from benchmarks.lm.cli import main
from benchmarks.lm.corpus import SEPARATOR
from benchmarks.lm.models import build_model
from benchmarks.lm.settings import SMOKE


def test_far_mass_matches_a_plain_softmax():
    torch.manual_seed(0)
    h, hk, n, d, window, block, start = 6, 2, 29, 8, 5, 4, 11  # groups of 3, odd length, a partial last block
    q, k = torch.randn(1, h, n, d), torch.randn(1, hk, n, d)
    blocks, far = far_block_mass(q, k, 0.3, start, window, block)
    assert blocks.shape == (h, n - start, 8)
    for head in range(h):
        for i, t in enumerate(range(start, n)):
            probs = (q[0, head, t] @ k[0, head // 3, : t + 1].T * 0.3).softmax(-1)
            distance = t - torch.arange(t + 1)
            assert far[head, i] == pytest.approx(float(probs[distance >= window].sum()), abs=1e-6)
            for b in range(8):
                in_block = (torch.arange(t + 1) // block == b) & (distance >= window)
                assert blocks[head, i, b] == pytest.approx(float(probs[in_block].sum()), abs=1e-6)


def test_selection_shares_on_a_hand_made_case():
    # two heads share one selection; their far mass per block averages to [0.1, 0.4, 0.0, 0.2]
    blocks = torch.tensor([[[0.2, 0.3, 0.0, 0.1]], [[0.0, 0.5, 0.0, 0.3]]])
    indices = torch.tensor([[[3, 0, 2]]])
    valid = torch.tensor([[[True, True, False]]])  # picks blocks 3 and 0
    shares = selection_shares(blocks, indices, valid, heads_per_selection=2)
    assert float(shares["total"][0, 0]) == pytest.approx(0.7)
    assert float(shares["captured"][0, 0]) == pytest.approx(0.3)
    assert float(shares["ideal"][0, 0]) == pytest.approx(0.6)  # blocks 1 and 3
    assert float(shares["random"][0, 0]) == pytest.approx(0.7 * 2 / 3)  # 2 of the 3 blocks holding far mass


def test_long_documents_are_the_first_long_ones_cut_at_the_context():
    val = torch.tensor([1, 2, SEPARATOR, 3, 4, 5, 6, 7, SEPARATOR, 8, SEPARATOR, 9, 9, 9, 9], dtype=torch.uint8)
    docs = long_documents(val, min_length=3, count=5, context=4)
    assert [d.tolist() for d in docs] == [[3, 4, 5, 6], [9, 9, 9, 9]]
    assert long_documents(val, min_length=3, count=1, context=10)[0].tolist() == [3, 4, 5, 6, 7]


def randomized(model, std: float = 0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def test_probe_on_the_comparisons_models():
    torch.manual_seed(0)
    docs = [torch.randint(1, 256, (n,), dtype=torch.uint8) for n in (90, 71)]
    every_block = replace(SMOKE.shape, num_selected=16)  # 90 tokens in blocks of 8: every block selectable
    # small weights: no block's importance falls under the oracle's validity threshold (1e-10), so every
    # visible block is picked
    nsa = randomized(build_model("nsa", every_block, 0, dict(SMOKE.nsa_options), backend="torch"), std=0.05)
    reach = attention_reach(nsa, docs, far_from=40, window=SMOKE.shape.window, device=torch.device("cpu"))
    assert reach["queries"] == 50 + 31 and len(reach["per_layer"]) == every_block.depth
    for layer in reach["per_layer"]:
        assert 0 < layer["far_mass"] < 1
        assert layer["captured"] == pytest.approx(1.0, abs=1e-3) and layer["ideal"] == pytest.approx(1.0, abs=1e-3)
        # every query selects every block it sees: a tile loads its last query's blocks, shared by the others
        assert 0 < layer["load_fraction_16q"] < layer["load_fraction_4q"] < 1
    few = randomized(build_model("nsa", replace(SMOKE.shape, num_selected=2), 0, {}, backend="torch"))
    for layer in attention_reach(few, docs, 40, SMOKE.shape.window, torch.device("cpu"))["per_layer"]:
        assert layer["captured"] <= layer["ideal"] + 1e-6 and layer["random"] <= layer["ideal"] + 1e-6
        assert layer["ideal"] < 1
    dense = randomized(build_model("dense", SMOKE.shape, 0, {}, backend="torch"))
    dense_reach = attention_reach(dense, docs, 40, SMOKE.shape.window, torch.device("cpu"))
    assert all(set(layer) == {"far_mass"} and 0 < layer["far_mass"] < 1 for layer in dense_reach["per_layer"])
    window = build_model("window", SMOKE.shape, 0, {}, backend="torch")
    assert attention_reach(window, docs, 40, SMOKE.shape.window, torch.device("cpu")) is None
    assert attention_reach(dense, [], 40, SMOKE.shape.window, torch.device("cpu")) is None


def test_smoke_run_records_the_reach(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path), "--models", "nsa,window", "--steps", "1"]) == 0
    nsa = json.loads((tmp_path / "runs" / "nsa-lr0.003-seed0.json").read_text())
    window = json.loads((tmp_path / "runs" / "window-lr0.003-seed0.json").read_text())
    reach = nsa["final"]["reach"]
    assert reach["documents"] == SMOKE.reach_documents and reach["far_from"] == SMOKE.buckets[-2]
    assert all({"far_mass", "captured", "ideal", "random", "load_fraction_4q", "load_fraction_16q"} <= set(layer)
               for layer in reach["per_layer"])
    assert window["final"]["reach"] is None
    summary = json.loads((tmp_path / "summary_lm.json").read_text())
    row = {r["model"]: r for r in summary["rows"]}
    assert set(row["nsa"]["reach"]) == {"far_mass", "captured", "ideal", "random", "load_fraction_4q",
                                        "load_fraction_16q"} and row["window"]["reach"] is None
