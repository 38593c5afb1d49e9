"""The paper's importance score (NSAConfig.importance_score = "summed_probs", eq. 8-10): the
compressed attention's probabilities summed over the compressed blocks that overlap each selection
block and over the heads of a group, against a plain loop; the selection it makes; the module on the
parallel pass, packed documents and cached decoding (on the kernels: test_paper_options.py); the config
round trip and the conversion refusal."""

import math

import pytest
import torch

from helpers import randomize_, rel_err
from nsa_core import NSAConfig, SparseAttention
from nsa_core.ops.block_selection import select_blocks
from nsa_core.reference.compressed_attention import compressed_scores
from nsa_core.reference.selection import overlapping_compressed_blocks, summed_block_probs
from nsa_core.selection import SelectionRule

BASE = dict(dim=24, dim_head=8, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=8,
            compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=3, causal=True,
            importance_score="summed_probs")


def covered_tokens(c, block, stride):
    """Compressed block c's tokens (model/compression.py: windows end at (c + 1) * stride - 1)."""
    return set(range((c + 1) * stride - block, (c + 1) * stride))


def plain_summed_probs(scores, visible, block, stride, sel, nb):
    """One query and head at a time, with Python sets for the overlaps."""
    B, H, T, C = scores.shape
    out = torch.zeros(B, H, T, nb, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                seen = [c for c in range(C) if visible[t, c]]
                if not seen:
                    continue
                weights = torch.softmax(scores[b, h, t, seen].double(), dim=0)
                p = dict(zip(seen, weights.tolist()))
                for j in range(nb):
                    tokens = set(range(j * sel, (j + 1) * sel))
                    out[b, h, t, j] = sum(p.get(c, 0.0) for c in range(C) if covered_tokens(c, block, stride) & tokens)
    return out


def test_overlaps_in_the_paper_geometry():
    """l = 32, d = 16, l' = 64: selection block j meets compressed blocks 4j .. 4j + 4 (paper eq. 9's range)."""
    indices, valid = overlapping_compressed_blocks(3, 12, 32, 16, 64)
    assert [indices[j][valid[j]].tolist() for j in range(3)] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11]]


@pytest.mark.parametrize("block, stride, sel", [(8, 4, 8), (32, 16, 64), (12, 4, 8), (16, 8, 4)])
def test_summed_probs_equal_a_plain_loop(block, stride, sel):
    gen = torch.Generator().manual_seed(block + sel)
    q, ck = torch.randn(1, 2, 45, 8, generator=gen), torch.randn(1, 2, 45 // stride, 8, generator=gen)
    pos = torch.arange(45)
    scores = compressed_scores(q, ck, stride, True, 8 ** -0.5, pos)
    visible = (torch.arange(ck.shape[2]) + 1) * stride - 1 < pos[:, None]
    got = summed_block_probs(scores, compress_block=block, stride=stride, selection_block_size=sel)
    want = plain_summed_probs(scores, visible, block, stride, sel, got.shape[-1])
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    assert (got[:, :, : stride] == 0).all()  # no compressed block is visible yet: nothing scored


def rule(**changes):
    fields = dict(num_selected=3, selection_block_size=8, stride=4, group_size=3, share_across_group=True,
                  interpolated=False, use_diff_topk=False, causal=True, scale=8 ** -0.5, importance="summed_probs",
                  compress_block=8)
    return SelectionRule(**{**fields, **changes})


@pytest.mark.parametrize("forced", [(0, 0), (1, 1)])
def test_selection_takes_the_top_group_sums(forced):
    """The chosen blocks are the largest sums over the group's heads (own block excluded, forced
    blocks first), their probs those sums normalised over the scored blocks."""
    r = rule(forced_initial=forced[0], forced_local=forced[1])
    gen = torch.Generator().manual_seed(7)
    q, ck = torch.randn(1, 6, 61, 8, generator=gen, dtype=torch.float64), torch.randn(1, 2, 15, 8, generator=gen, dtype=torch.float64)
    got = select_blocks(q, ck, r, backend="torch")
    pos = torch.arange(61)
    sums = summed_block_probs(compressed_scores(q, ck, 4, True, r.scale, pos), compress_block=8, stride=4,
                              selection_block_size=8).view(1, 2, 3, 61, -1).sum(2)
    sums[..., torch.arange(sums.shape[-1]) == (pos // 8)[:, None]] = 0  # the own block
    for t in (20, 47, 60):
        for h in range(2):
            chosen = got.indices[0, h, t][got.valid[0, h, t]].tolist()
            free = [c for c in chosen]
            if forced != (0, 0):
                expected_forced = sorted({0, t // 8 - 1} - {t // 8})
                assert sorted(chosen[: len(expected_forced)]) == expected_forced
                free = chosen[len(expected_forced):]
                s = sums[0, h, t].clone()
                s[expected_forced] = -1
            else:
                s = sums[0, h, t]
            top = s.topk(len(free)).indices.tolist()
            assert sorted(free) == sorted(top), (t, h)
            probs = got.probs[0, h, t][got.valid[0, h, t]]
            assert torch.allclose(probs, sums[0, h, t, chosen] / sums[0, h, t].sum())
    early = got.valid[0, :, :4]  # queries before the first compressed block ends: nothing valid
    assert not early.any()


def module(seed=0, **changes):
    return randomize_(SparseAttention(**{**BASE, **changes}), std=0.3, seed=seed).double()


def test_the_score_changes_what_is_selected_and_only_that():
    """Same weights, the other score: the output differs (different blocks), and a module whose every
    block fits in the selection gives the same output either way."""
    x = torch.randn(2, 53, 24, dtype=torch.float64)
    summed, mean = module(), module(importance_score="mean_logits")
    assert rel_err(summed(x), mean(x)) > 1e-3
    everything = dict(num_selected_blocks=8)
    assert rel_err(module(**everything)(x), module(**everything, importance_score="mean_logits")(x)) < 1e-12


def test_packed_documents_equal_separate_ones():
    attn = module(num_forced_initial_blocks=1)
    a, b = torch.randn(1, 29, 24, dtype=torch.float64), torch.randn(1, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        packed = attn(torch.cat((a, b), 1), cu_seqlens=torch.tensor([0, 29, 69]))
        assert rel_err(packed[:, :29], attn(a)) < 1e-10 and rel_err(packed[:, 29:], attn(b)) < 1e-10


def test_decoding_equals_parallel():
    attn = module(independent_kv=True, num_forced_local_blocks=1)
    x = torch.randn(2, 41, 24, dtype=torch.float64)
    with torch.no_grad():
        parallel = attn(x)
        cache = attn.new_cache(2, 64)
        outs = [attn(x[:, :9], cache=cache)] + [attn(x[:, t:t + 4], cache=cache) for t in range(9, 41, 4)]
    assert rel_err(torch.cat(outs, dim=1), parallel) < 1e-10


def test_gradients_are_finite_with_use_diff_topk():
    """Blocks with zero probability get -inf logits; the straight-through gates' backward never divides by 0."""
    attn = module(use_diff_topk=True)
    x = torch.randn(1, 37, 24, dtype=torch.float64, requires_grad=True)
    attn(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)


def test_round_trips_and_refusals(tmp_path):
    from nsa_core.checkpoint.lucidrains import check_oracle_can_run
    from nsa_core.checkpoint.safetensors import load_safetensors, save_safetensors

    cfg = NSAConfig(**BASE)
    assert NSAConfig.from_json(cfg.to_json()) == cfg and NSAConfig(**{**BASE, "importance_score": "mean_logits"}) != cfg
    attn = randomize_(SparseAttention.from_config(cfg))
    save_safetensors(attn, tmp_path / "m.safetensors")
    assert load_safetensors(tmp_path / "m.safetensors").config.importance_score == "summed_probs"
    with pytest.raises(ValueError, match="importance_score"):
        NSAConfig(**{**BASE, "importance_score": "max"})
    with pytest.raises(ValueError, match="importance_score"):
        check_oracle_can_run(cfg)
    assert math.isfinite(attn(torch.randn(1, 9, 24)).sum().item())


def test_the_cli_config_commands_take_it(tmp_path):
    from typer.testing import CliRunner

    from nsa_cli.main import app

    out = tmp_path / "c.json"
    made = CliRunner().invoke(app, ["config", "create", "-o", str(out), "--preset", "tiny", "--importance-score",
                                    "summed_probs"])
    assert made.exit_code == 0, made.output
    assert NSAConfig.from_json(out.read_text()).importance_score == "summed_probs"
    bad = CliRunner().invoke(app, ["config", "create", "-o", str(tmp_path / "d.json"), "--preset", "tiny",
                                   "--importance-score", "max"])
    assert bad.exit_code == 2 and "importance_score must be one of" in bad.output and "Traceback" not in bad.output


def test_not_causal_every_block_is_scored():
    """Without causality every compressed block is visible: the selection is the top-k of the group
    sums over all blocks (the own block too when selection blocks equal the stride, as the mean-logit
    score has it)."""
    r = rule(causal=False, selection_block_size=4, stride=4, compress_block=8, num_selected=2)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 33, 8, generator=gen, dtype=torch.float64)
    ck = torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64)
    got = select_blocks(q, ck, r, backend="torch")
    scores = compressed_scores(q, ck, 4, False, r.scale, torch.arange(33))
    sums = summed_block_probs(scores, compress_block=8, stride=4, selection_block_size=4).view(1, 2, 3, 33, -1).sum(2)
    assert got.valid.all()
    assert torch.equal(got.indices.sort(-1).values, sums.topk(2, dim=-1).indices.sort(-1).values)
