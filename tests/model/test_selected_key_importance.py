"""Importance "selected_keys" (NSAConfig.importance_score): blocks scored by the selected branch's own
mean logit over each block (its rotated queries against the mean of the block's rotated keys, averaged
over a group's heads), against a plain loop over queries and blocks; the module on the parallel pass,
packed documents, cached decoding, sequence-parallel shards (tests/distributed) and the kernels; the
gradient use_diff_topk sends into the selected keys; config round trips and refusals."""

import pytest
import torch

from helpers import KERNEL_DEVICE, check_kernels_equal_reference, needs_kernels, randomize_, rel_err
from nsa_core import NSAConfig, SparseAttention
from nsa_core.model.selection_keys import block_mean_keys
from nsa_core.ops.compressed_selection import compressed_selection
from nsa_core.seqs import Seqs

# G = 3 (not a power of two), selection blocks of 8 = 2 strides, a row of 53 tokens (6 complete blocks)
BASE = dict(dim=24, dim_head=8, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=8,
            compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=3, causal=True,
            importance_score="selected_keys")
DEVICE = KERNEL_DEVICE
KERNEL_BASE = dict(BASE, dim_head=16)  # FlexAttention on CUDA takes head dims >= 16


def module(seed=0, **changes):
    return randomize_(SparseAttention(**{**BASE, **changes}), std=0.3, seed=seed).double()


def rotated_queries_and_keys(attn, x):
    q, k, v = attn.project(attn.norm(x))
    ks = attn.branch_kv(k, v)[1][0]
    positions = torch.arange(x.shape[1])
    return attn.rotate(q, positions), attn.rotate(ks, positions)


def plain_block_logits(q_rot, k_rot, *, group, sel, share, scale):
    """(B, H, T, NB) float64 by loops: the mean over a block's tokens of q . k (x scale), averaged over
    the group's heads when it shares its selection; blocks not complete before the query at -inf."""
    B, HQ, T, _ = q_rot.shape
    nb = T // sel
    heads = HQ // group if share else HQ
    out = torch.full((B, heads, T, nb), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(heads):
            members = range(h * group, (h + 1) * group) if share else [h]
            for t in range(T):
                for j in range(nb):
                    if (j + 1) * sel > t:
                        continue
                    logits = [q_rot[b, m, t] @ k_rot[b, m // group, i] * scale
                              for m in members for i in range(j * sel, (j + 1) * sel)]
                    out[b, h, t, j] = torch.stack(logits).mean()
    return out


@pytest.mark.parametrize("share", [True, False])
def test_selection_is_the_top_of_the_selected_branchs_own_mean_logits(share):
    attn = module(query_heads_share_selected_kv=share)
    x = torch.randn(2, 53, 24, dtype=torch.float64)
    with torch.no_grad():
        got = attn.select(x)
        q_rot, k_rot = rotated_queries_and_keys(attn, x)
    want = plain_block_logits(q_rot, k_rot, group=3, sel=8, share=share, scale=attn.scale)
    assert got.indices.shape == (2, 2 if share else 6, 53, 3)
    for b in range(2):
        for h in range(got.indices.shape[1]):
            for t in range(53):
                visible = int(torch.isfinite(want[b, h, t]).sum())
                chosen = got.indices[b, h, t][got.valid[b, h, t]].tolist()
                assert len(chosen) == min(3, visible)
                if chosen:
                    order = want[b, h, t].argsort(descending=True, stable=True).tolist()
                    assert sorted(chosen) == sorted(order[: len(chosen)])


def test_block_keys_are_block_means_and_packed_documents_restart_them():
    k = torch.randn(1, 2, 29 + 40, 8, dtype=torch.float64)
    whole = block_mean_keys(k, 8)
    assert whole.shape == (1, 2, 8, 8) and torch.allclose(whole[:, :, 3], k[:, :, 24:32].mean(dim=2))
    seqs = Seqs.packed(torch.tensor([0, 29, 69]), 69)
    packed = block_mean_keys(k, 8, seqs)  # document 2 starts at token 29: its block j in slot 29 // 8 + j = 3 + j
    assert packed.shape == (1, 2, 69 // 8, 8)
    assert torch.allclose(packed[:, :, 2], k[:, :, 16:24].mean(dim=2))
    for j in range(5):
        assert torch.allclose(packed[:, :, 3 + j], k[:, :, 29 + 8 * j: 37 + 8 * j].mean(dim=2))


def test_the_score_changes_what_is_selected_and_only_that():
    x = torch.randn(2, 53, 24, dtype=torch.float64)
    own, compressed = module(), module(importance_score="mean_logits")
    with torch.no_grad():
        assert rel_err(own(x), compressed(x)) > 1e-3
        everything = dict(num_selected_blocks=8)
        assert rel_err(module(**everything)(x), module(**everything, importance_score="mean_logits")(x)) < 1e-12


def test_packed_documents_equal_separate_ones():
    attn = module(independent_kv=True, num_forced_initial_blocks=1)
    a, b = torch.randn(1, 29, 24, dtype=torch.float64), torch.randn(1, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        packed = attn(torch.cat((a, b), 1), cu_seqlens=torch.tensor([0, 29, 69]))
        assert rel_err(packed[:, :29], attn(a)) < 1e-10 and rel_err(packed[:, 29:], attn(b)) < 1e-10


@pytest.mark.parametrize("share", [True, False])
def test_decoding_equals_parallel(share):
    """Prefill, multi-token and single-token steps over ragged rows; the step reads the token pages' block means."""
    attn = module(independent_kv=True, num_forced_local_blocks=1, query_heads_share_selected_kv=share)
    x = torch.randn(2, 41, 24, dtype=torch.float64)
    with torch.no_grad():
        parallel = attn(x)
        cache = attn.new_cache(2, 64)
        outs = [attn(x[:, :9], cache=cache)] + [attn(x[:, t:t + 4], cache=cache) for t in range(9, 41, 4)]
    assert rel_err(torch.cat(outs, dim=1), parallel) < 1e-10


def test_the_cache_keeps_each_pages_block_key_through_growth_and_a_step_taken_back():
    """A growable cache from 12 tokens (it grows twice), a step of junk taken back and written again:
    the outputs equal the parallel pass and every complete page's block key is the mean of its keys."""
    from nsa_core.model.cache import NSACache

    attn = module(num_forced_initial_blocks=1)
    x = torch.randn(2, 41, 24, dtype=torch.float64)
    junk = torch.randn(2, 4, 24, dtype=torch.float64)
    with torch.no_grad():
        parallel = attn(x)
        cache = NSACache.allocate(attn.config, 2, 12, device="cpu", dtype=torch.float64, growable=True)
        outs = [attn(x[:, :9], cache=cache)]
        for t in range(9, 41, 4):
            if t == 29:  # positions 29 .. 32 complete page 3 and open page 4 with junk, then are taken back
                state = cache.snapshot()
                attn(junk, cache=cache)
                cache.restore(state)
            outs.append(attn(x[:, t:t + 4], cache=cache))
    assert cache.capacity >= 41 and rel_err(torch.cat(outs, dim=1), parallel) < 1e-10
    complete = 41 // cache.page_size
    pages = cache.block_table[:, :complete].long()
    assert torch.equal(cache.block_key_pages[pages], cache.k_pages[pages].mean(dim=3))


def test_use_diff_topk_trains_the_selected_keys_through_the_scores():
    """With the straight-through gates the selected branch's key projection gets a gradient from the
    scores too: more than from its attention alone (the gates' part), and finite."""
    x = torch.randn(1, 37, 24, dtype=torch.float64)

    def key_grad(diff):
        attn = module(independent_kv=True, use_diff_topk=diff)
        attn(x).square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)
        d, h, hk = 8, 6, 2
        return attn.to_qkv.weight.grad[h * d + hk * d: h * d + 2 * hk * d]  # the selected branch's keys

    with_gates, without = key_grad(True), key_grad(False)
    assert rel_err(with_gates, without) > 1e-6


def test_the_op_asks_for_the_block_keys_and_rotated_queries():
    attn = module()
    q, k, v = attn.project(attn.norm(torch.randn(1, 20, 24, dtype=torch.float64)))
    keys = attn.keys_of(k, v)
    common = dict(num_memory=1, scale=attn.scale)
    with pytest.raises(ValueError, match="selection_keys"):
        compressed_selection(q, keys.compressed_k, keys.compressed_v, None, attn.selection_rule, **common)
    with pytest.raises(ValueError, match="selection_q"):
        compressed_selection(q, keys.compressed_k, keys.compressed_v, keys.selection_keys, attn.selection_rule,
                             selection_q=q[:, :, :3], **common)


@needs_kernels
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("changes", [dict(), dict(independent_kv=True, num_forced_initial_blocks=1,
                                                  num_forced_local_blocks=1, gate_biases=(0, 0, 0))])
def test_kernels_equal_the_reference(changes):
    check_kernels_equal_reference(DEVICE, **KERNEL_BASE, **changes)


@needs_kernels
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("changes", [dict(), dict(query_heads_share_selected_kv=False),
                                     dict(num_forced_initial_blocks=1, num_forced_local_blocks=1)])
def test_a_steps_selection_over_cached_block_keys_on_the_kernel_equals_the_twin(changes):
    """The fused step kernel picking blocks from a cache's block keys (one key per block, a stride of one
    block) against the PyTorch step selection: ragged rows (one with no complete block yet), three
    queries per row, G = 3; the keys given whole, and as a cache holds them (pages behind a permuted table)."""
    from nsa_core.ops.compressed_selection import _step_block_key_selection
    from nsa_core.ops.paged import PooledBlockKeys
    from nsa_core.ops.step_selection import select_step_blocks

    rule = SparseAttention(**BASE, **changes).selection_rule.block_key_rule()
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(3, 6, 3, 8, generator=generator).to(DEVICE)
    keys = torch.randn(3, 7, 2, 8, generator=generator).to(DEVICE).transpose(1, 2)  # as the cache's gather lays them
    seqs = Seqs.step(torch.tensor([41, 5, 20], device=DEVICE), 3, 56)
    want = select_step_blocks(q, PooledBlockKeys(keys), rule, seqs)
    table = torch.randperm(3 * 7 + 2, generator=generator)[:21].view(3, 7).int().to(DEVICE)
    pages = torch.full((3 * 7 + 2, 2, 8), float("nan"), device=DEVICE)
    pages[table.long()] = keys.transpose(1, 2)  # (B, NB, HKV, D) into their physical pages
    for given in (PooledBlockKeys(keys), PooledBlockKeys(pages=pages, table=table)):
        assert given.shape == tuple(keys.shape) and torch.equal(given.keys, keys)
        got = _step_block_key_selection(q, given, rule, seqs)
        assert torch.equal(got.valid, want.valid)
        assert torch.equal(torch.where(want.valid, got.indices, 0), torch.where(want.valid, want.indices, 0))
        assert rel_err(got.probs[want.valid], want.probs[want.valid]) < 1e-5


def test_round_trips_and_refusals(tmp_path):
    from nsa_core.checkpoint.lucidrains import check_oracle_can_run
    from nsa_core.checkpoint.safetensors import load_safetensors, save_safetensors

    cfg = NSAConfig(**BASE)
    assert NSAConfig.from_json(cfg.to_json()) == cfg
    attn = randomize_(SparseAttention.from_config(cfg))
    save_safetensors(attn, tmp_path / "m.safetensors")
    loaded = load_safetensors(tmp_path / "m.safetensors")
    assert loaded.config.importance_score == "selected_keys"
    x = torch.randn(1, 30, 24)
    assert torch.equal(loaded(x), attn(x))
    with pytest.raises(ValueError, match="importance_score='selected_keys'"):
        check_oracle_can_run(cfg)


def test_the_cli_config_commands_take_it(tmp_path):
    from typer.testing import CliRunner

    from nsa_cli.main import app

    out = tmp_path / "c.json"
    made = CliRunner().invoke(app, ["config", "create", "-o", str(out), "--preset", "tiny", "--importance-score",
                                    "selected_keys"])
    assert made.exit_code == 0, made.output
    assert NSAConfig.from_json(out.read_text()).importance_score == "selected_keys"
