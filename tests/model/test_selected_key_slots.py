"""selected_key_slots (NSAConfig): the forced blocks and the importance score's slots, then slots the
selected branch's own block keys fill, against a plain rebuild from the two scores (the module without
the option, and a loop over queries and blocks); the module on the parallel pass, packed documents,
cached decoding and the kernels; config round trips and refusals. Sequence-parallel shards and the
paged serving cache take it in tests/distributed and tests/serving."""

import pytest
import torch

from helpers import KERNEL_DEVICE, check_kernels_equal_reference, needs_kernels, randomize_, rel_err
from nsa_core import NSAConfig, SparseAttention
from nsa_core.selection import Selection, merge_selections

# G = 3 (not a power of two), selection blocks of 8 = 2 strides, 4 slots: 1 forced initial, 1 forced local,
# 1 by the compressed score, 1 by the block keys
BASE = dict(dim=24, dim_head=8, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=8,
            compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=4, causal=True,
            num_forced_initial_blocks=1, num_forced_local_blocks=1, selected_key_slots=1)
DEVICE = KERNEL_DEVICE
KERNEL_BASE = dict(BASE, dim_head=16)  # FlexAttention on CUDA takes head dims >= 16


def module(seed=0, **changes):
    return randomize_(SparseAttention(**{**BASE, **changes}), std=0.3, seed=seed).double()


def plain_block_key_logits(attn, x):
    """(B, HKV, T, NB) float64 by loops: the selected branch's rotated queries against each complete block's
    keys, the mean logit over the block's tokens and the group's heads (blocks not complete before the
    query: -inf)."""
    q, k, v = attn.project(attn.norm(x))
    positions = torch.arange(x.shape[1])
    q_rot, k_rot = attn.rotate(q, positions), attn.rotate(attn.branch_kv(k, v)[1][0], positions)
    B, HQ, T, _ = q_rot.shape
    sel, group = attn.config.selection_block_size, attn.config.group_size
    out = torch.full((B, HQ // group, T, T // sel), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(HQ // group):
            for t in range(T):
                for j in range((t // sel)):  # complete blocks before the query's own
                    logits = q_rot[b, h * group:(h + 1) * group, t] @ k_rot[b, h, j * sel:(j + 1) * sel].T
                    out[b, h, t, j] = logits.mean() * attn.scale
    return out


@pytest.mark.parametrize("importance", ["mean_logits", "summed_probs"])
@pytest.mark.parametrize("key_slots", [1, 2])
def test_the_selection_is_the_importance_part_then_the_block_keys_top(importance, key_slots):
    attn = module(importance_score=importance, selected_key_slots=key_slots, independent_kv=True)
    without = module(importance_score=importance, selected_key_slots=0, independent_kv=True,
                     num_selected_blocks=4 - key_slots)  # the same weights: the importance's part alone
    x = torch.randn(2, 61, 24, dtype=torch.float64)
    with torch.no_grad():
        got, first = attn.select(x), without.select(x)
        logits = plain_block_key_logits(attn, x)
    assert got.indices.shape == (2, 2, 61, 4)
    assert torch.equal(got.indices[..., :4 - key_slots], first.indices)
    assert torch.equal(got.valid[..., :4 - key_slots], first.valid)
    for b in range(2):
        for h in range(2):
            for t in range(61):
                chosen = got.indices[b, h, t][got.valid[b, h, t]].tolist()
                assert len(chosen) == len(set(chosen))  # a block both scores pick is attended once
                visible = int(torch.isfinite(logits[b, h, t]).sum())
                order = logits[b, h, t].argsort(descending=True, stable=True).tolist()[:min(key_slots, visible)]
                want = set(first.indices[b, h, t][first.valid[b, h, t]].tolist()) | set(order)
                assert set(chosen) == want


def test_merging_marks_the_second_selections_repeats_invalid():
    first = Selection(indices=torch.tensor([[[[3, 0]]]]), valid=torch.tensor([[[[True, False]]]]),
                      probs=torch.tensor([[[[0.5, 0.0]]]]), gates=None)
    second = Selection(indices=torch.tensor([[[[3, 0, 5]]]]), valid=torch.tensor([[[[True, True, True]]]]),
                       probs=torch.tensor([[[[0.3, 0.2, 0.1]]]]), gates=None)
    merged = merge_selections(first, second)
    assert merged.indices.tolist() == [[[[3, 0, 3, 0, 5]]]]
    assert merged.valid.tolist() == [[[[True, False, False, True, True]]]]  # 0 was not a valid slot of first
    assert merge_selections(None, second) is second and merge_selections(first, None) is first


def test_the_block_key_slots_change_the_output_and_every_block_selected_does_not():
    x = torch.randn(2, 53, 24, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(module()(x), module(selected_key_slots=0)(x)) > 1e-3
        everything = dict(num_selected_blocks=9)  # every block of 53 tokens either way
        assert rel_err(module(**everything)(x), module(**everything, selected_key_slots=0)(x)) < 1e-12


def test_packed_documents_equal_separate_ones():
    attn = module(independent_kv=True)
    a, b = torch.randn(1, 29, 24, dtype=torch.float64), torch.randn(1, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        packed = attn(torch.cat((a, b), 1), cu_seqlens=torch.tensor([0, 29, 69]))
    assert rel_err(packed[:, :29], attn(a)) < 1e-10 and rel_err(packed[:, 29:], attn(b)) < 1e-10


@pytest.mark.parametrize("changes", [dict(), dict(query_heads_share_selected_kv=False, importance_score="summed_probs",
                                                  independent_kv=True)])
def test_decoding_equals_parallel(changes):
    """Prefill, multi-token and single-token steps; the step scores the cache's compressed slots and its block keys."""
    attn = module(**changes)
    x = torch.randn(2, 47, 24, dtype=torch.float64)
    with torch.no_grad():
        parallel = attn(x)
        cache = attn.new_cache(2, 64)
        outs = [attn(x[:, :9], cache=cache)] + [attn(x[:, t:t + 3], cache=cache) for t in range(9, 30, 3)]
        outs += [attn(x[:, t:t + 1], cache=cache) for t in range(30, 47)]
    assert cache.block_key_pages is not None
    assert rel_err(torch.cat(outs, dim=1), parallel) < 1e-10


def test_gradients_reach_every_branch():
    attn = module(independent_kv=True)
    attn(torch.randn(2, 45, 24, dtype=torch.float64)).square().sum().backward()
    grads = {name: p.grad for name, p in attn.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["to_qkv.weight"].abs().sum() > 0


@needs_kernels
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("changes", [dict(), dict(independent_kv=True, importance_score="summed_probs",
                                                  gate_biases=(0, 0, 0))])
def test_kernels_equal_the_reference(changes):
    check_kernels_equal_reference(DEVICE, **KERNEL_BASE, **changes)


@needs_kernels
def test_decoding_on_the_kernels_equals_parallel():
    pages = dict(KERNEL_BASE, compress_block_size=16, compress_block_sliding_stride=8, selection_block_size=16)
    ref = randomize_(SparseAttention(**pages, independent_kv=True, backend="torch"), std=0.3).to(DEVICE)
    ker = SparseAttention(**pages, independent_kv=True, backend="triton").to(DEVICE)
    ker.load_state_dict(ref.state_dict())
    x = torch.randn(1, 71, 24, device=DEVICE)
    with torch.no_grad():
        parallel = ref(x)
        cache = ker.new_cache(1, 80)
        outs = [ker(x[:, :40], cache=cache)] + [ker(x[:, t:t + 1], cache=cache) for t in range(40, 71)]
    assert rel_err(torch.cat(outs, dim=1), parallel) < 1e-4


def test_round_trips_and_refusals(tmp_path):
    from typer.testing import CliRunner

    from nsa_cli.main import app
    from nsa_core.checkpoint.lucidrains import check_oracle_can_run
    from nsa_core.checkpoint.safetensors import load_safetensors, save_safetensors

    cfg = NSAConfig(**BASE)
    assert NSAConfig.from_json(cfg.to_json()) == cfg and cfg.scores_block_keys
    attn = randomize_(SparseAttention.from_config(cfg))
    save_safetensors(attn, tmp_path / "m.safetensors")
    loaded = load_safetensors(tmp_path / "m.safetensors")
    x = torch.randn(1, 30, 24)
    assert loaded.config.selected_key_slots == 1 and torch.equal(loaded(x), attn(x))
    with pytest.raises(ValueError, match="selected_key_slots"):
        check_oracle_can_run(cfg)
    out = tmp_path / "c.json"
    made = CliRunner().invoke(app, ["config", "create", "-o", str(out), "--preset", "paper_scratch",
                                    "--selected-key-slots", "4"])
    assert made.exit_code == 0, made.output
    assert NSAConfig.from_json(out.read_text()).selected_key_slots == 4
    refused = CliRunner().invoke(app, ["config", "create", "-o", str(tmp_path / "d.json"), "--preset", "paper_scratch",
                                       "--selected-key-slots", "14"])
    assert refused.exit_code == 2 and "selected_key_slots must be at most" in refused.output


@pytest.mark.parametrize("changes, message", [
    (dict(selected_key_slots=3), "at most num_selected_blocks - forced blocks = 2"),
    (dict(selected_key_slots=-1), "selected_key_slots must be an int >= 0"),
    (dict(importance_score="selected_keys"), "pass importance_score 'mean_logits' or 'summed_probs'"),
    (dict(use_diff_topk=True), "use_diff_topk"),
    (dict(causal=False, num_forced_initial_blocks=0, num_forced_local_blocks=0), "causal=True"),
])
def test_refusals_name_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        NSAConfig(**{**BASE, **changes})
    with pytest.raises(TypeError, match="selected_key_slots must be an int"):
        NSAConfig(**{**BASE, "selected_key_slots": 1.0})
