"""The paper's design options of SparseAttention (NSAConfig: independent_kv, gate_biases, forced
blocks): each against a plain reference, on the parallel pass, packed documents, sequence-parallel
shards, cached decoding and the kernels (Triton interpreter), and through the config round trips."""

import json

import pytest
import torch

from helpers import check_kernels_equal_reference, randomize_, rel_err
from nsa_core import NSAConfig, SparseAttention
from nsa_core.config import get_preset
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.seqs import Seqs
from nsa_core.reference.selection import forced_blocks

BASE = dict(dim=24, dim_head=8, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=8,
            compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=4, causal=True)


def module(seed=0, **options):
    return randomize_(SparseAttention(**{**BASE, **options}), std=0.3, seed=seed).double()


# independent keys and values -------------------------------------------------------------------------

def test_independent_kv_projects_one_pair_per_branch():
    shared, independent = SparseAttention(**BASE), SparseAttention(**BASE, independent_kv=True)
    d, h, hk = 8, 6, 2
    assert shared.to_qkv.weight.shape[0] == (h + 2 * hk) * d
    assert independent.to_qkv.weight.shape[0] == (h + 6 * hk) * d


def _independent_copy_of(shared: SparseAttention) -> SparseAttention:
    """An independent_kv module whose three key / value projections all equal shared's one."""
    ind = SparseAttention(**{**BASE, "independent_kv": True}).double()
    state = dict(shared.state_dict())
    q, k, v = state["to_qkv.weight"].split((6 * 8, 2 * 8, 2 * 8))
    state["to_qkv.weight"] = torch.cat((q, k, k, k, v, v, v))
    ind.load_state_dict(state)
    return ind


def test_independent_kv_with_equal_projections_equals_shared():
    shared = module()
    ind = _independent_copy_of(shared)
    x = torch.randn(2, 37, 24, dtype=torch.float64)
    assert rel_err(ind(x), shared(x)) < 1e-12


@pytest.mark.parametrize("branch, changes, may_change", [(0, {"compressed"}, {"selected"}), (1, {"selected"}, set()),
                                                      (2, {"window"}, set())])
def test_each_branch_reads_its_own_keys(branch, changes, may_change):
    """Perturbing one branch's key projection changes that branch's output alone (the compressed
    keys also score the blocks, so they may move the selected branch too)."""
    attn = module(independent_kv=True)
    x = torch.randn(1, 29, 24, dtype=torch.float64)

    def branches(mod):
        seen = {}
        original = mod.selected_branch, mod.window_branch
        mod.selected_branch = lambda *a: seen.setdefault("selected", original[0](*a))
        mod.window_branch = lambda *a: seen.setdefault("window", original[1](*a))
        xn = mod.norm(x)
        q, k, v = mod.project(xn)
        keys = mod.keys_of(k, v)
        mod.attend(xn, q, keys, Seqs.batch(x.shape[1]))
        del mod.selected_branch, mod.window_branch
        seen["compressed"] = keys.compressed_k
        return seen

    before = branches(attn)
    with torch.no_grad():
        rows = attn.to_qkv.weight[6 * 8 + branch * 2 * 8: 6 * 8 + (branch + 1) * 2 * 8]
        rows.add_(torch.randn_like(rows))
    after = branches(attn)
    for name in ("compressed", "selected", "window"):
        differs = not torch.equal(before[name], after[name])
        if name not in may_change:
            assert differs == (name in changes), name


def test_independent_kv_decoding_equals_parallel():
    attn = module(independent_kv=True, num_forced_initial_blocks=1, num_forced_local_blocks=1)
    x = torch.randn(2, 41, 24, dtype=torch.float64)
    with torch.no_grad():
        parallel = attn(x)
        cache = attn.new_cache(2, 64)
        outs = [attn(x[:, :7], cache=cache)]
        for t in range(7, 41, 3):
            outs.append(attn(x[:, t:t + 3], cache=cache))
    assert cache.window_k_pages is not None
    assert rel_err(torch.cat(outs, dim=1), parallel) < 1e-10


def test_independent_kv_growable_cache_keeps_window_keys():
    attn = module(independent_kv=True)
    x = torch.randn(1, 30, 24, dtype=torch.float64)
    with torch.no_grad():
        parallel = attn(x)
        out, cache = attn(x[:, :2], return_cache=True)
        outs = [out]
        for t in range(2, 30):
            out, cache = attn(x[:, t:t + 1], cache=cache, return_cache=True)
            outs.append(out)
    assert rel_err(torch.cat(outs, dim=1), parallel) < 1e-10


def test_independent_kv_packed_equals_separate():
    attn = module(independent_kv=True, num_forced_initial_blocks=1, num_forced_local_blocks=2)
    lengths = [13, 1, 0, 26]
    x = torch.randn(1, sum(lengths), 24, dtype=torch.float64)
    cu = torch.tensor([0, 13, 14, 14, 40])
    packed = attn(x, cu_seqlens=cu)
    alone = torch.cat([attn(x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s], dim=1)
    assert rel_err(packed, alone) < 1e-12


# forced blocks ---------------------------------------------------------------------------------------

def test_forced_block_indices():
    pos = torch.tensor([0, 7, 8, 16, 40])  # own blocks 0, 0, 1, 2, 5 (blocks of 8)
    idx, valid = forced_blocks(pos, 8, initial=1, local=2)
    pairs = [sorted(i for i, ok in zip(row, vrow) if ok) for row, vrow in zip(idx.tolist(), valid.tolist())]
    assert pairs == [[], [], [0], [0, 1], [0, 3, 4]]


@pytest.mark.parametrize("initial, local", [(1, 0), (0, 2), (1, 2), (2, 2)])
def test_forced_blocks_are_selected_and_the_rest_is_top_k(initial, local):
    attn = module(num_forced_initial_blocks=initial, num_forced_local_blocks=local)
    free = SparseAttention(**BASE).double()
    free.load_state_dict(attn.state_dict())
    x = torch.randn(2, 57, 24, dtype=torch.float64)
    got, plain = attn.select(x), free.select(x)
    sel, n_sel = 8, BASE["num_selected_blocks"]
    for b in range(2):
        for h in range(2):
            for t in range(57):
                own = t // sel
                chosen = {i for i, ok in zip(got.indices[b, h, t].tolist(), got.valid[b, h, t].tolist()) if ok}
                forced = ({i for i in range(initial) if i < own}
                          | {own - 1 - j for j in range(local) if own - 1 - j >= 0})
                assert forced <= chosen
                assert len(chosen) <= n_sel and all(i < own for i in chosen)
                assert len(chosen) == min(n_sel, own)  # every slot filled while blocks remain
    # the forced module ranks the unforced blocks as the plain module does: with nothing forced it equals it
    same = SparseAttention(**BASE, num_forced_initial_blocks=0).double()
    same.load_state_dict(attn.state_dict())
    assert torch.equal(same.select(x).indices, plain.indices)


def test_forced_blocks_rest_follows_scores():
    """The unforced slots hold the highest-probability unforced blocks (checked against the probs)."""
    attn = module(num_forced_initial_blocks=1, num_forced_local_blocks=1)
    free = SparseAttention(**{**BASE, "num_selected_blocks": 7}).double()  # every block of 57 tokens ranked
    free.load_state_dict(attn.state_dict())
    x = torch.randn(1, 57, 24, dtype=torch.float64)
    got, ranking = attn.select(x), free.select(x)
    for h in range(2):
        for t in range(57):
            own = t // 8
            forced = {0, own - 1} & set(range(own))
            order = [i for i, ok in zip(ranking.indices[0, h, t].tolist(), ranking.valid[0, h, t].tolist())
                     if ok and i not in forced]
            rest = [i for i, ok in zip(got.indices[0, h, t, 2:].tolist(), got.valid[0, h, t, 2:].tolist()) if ok]
            assert rest == order[:len(rest)]
            assert len(rest) == min(2, len(order))


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BASE = dict(BASE, dim_head=16)  # FlexAttention on CUDA takes head dims >= 16
needs_kernels = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                   reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")
SCRATCH = dict(independent_kv=True, num_forced_initial_blocks=1, num_forced_local_blocks=2, gate_biases=(0, 0, 0))


@needs_kernels
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("options", [SCRATCH, dict(SCRATCH, importance_score="summed_probs"),
                                     dict(importance_score="summed_probs")], ids=["scratch", "scratch_summed", "summed"])
def test_paper_options_on_the_kernels_equal_the_reference(options):
    check_kernels_equal_reference(DEVICE, **KERNEL_BASE, **options)


@needs_kernels
def test_paper_options_decoding_on_the_kernels_equals_parallel():
    pages = dict(KERNEL_BASE, compress_block_size=16, compress_block_sliding_stride=8, selection_block_size=16)  # kernel pages
    ref = randomize_(SparseAttention(**pages, **SCRATCH, backend="torch"), std=0.3).to(DEVICE)
    ker = SparseAttention(**pages, **SCRATCH, backend="triton").to(DEVICE)
    ker.load_state_dict(ref.state_dict())
    x = torch.randn(1, 71, 24, device=DEVICE)
    with torch.no_grad():
        parallel = ref(x)
        cache = ker.new_cache(1, 80)
        outs = [ker(x[:, :37], cache=cache)] + [ker(x[:, t:t + 2], cache=cache) for t in range(37, 71, 2)]
    assert rel_err(torch.cat(outs, dim=1), parallel) < 1e-4


# gates and config ------------------------------------------------------------------------------------

def test_gate_biases_set_the_initial_gates():
    attn = SparseAttention(**BASE, gate_biases=(0.5, -1.0, 3.0))
    assert attn.to_strategy_combine[0].bias.tolist() == [0.5, -1.0, 3.0] * 6
    assert SparseAttention(**BASE).to_strategy_combine[0].bias.tolist() == [-2.0, -2.0, 2.0] * 6


def test_options_round_trip_through_json_and_safetensors(tmp_path):
    from nsa_core.checkpoint.safetensors import load_safetensors, save_safetensors

    cfg = NSAConfig(**BASE, independent_kv=True, gate_biases=(0.0, 0.25, -1.0), num_forced_initial_blocks=1,
                    num_forced_local_blocks=2)
    again = NSAConfig.from_json(cfg.to_json())
    assert again == cfg and again.gate_biases == (0.0, 0.25, -1.0)
    assert json.loads(cfg.to_json())["gate_biases"] == [0.0, 0.25, -1.0]
    attn = randomize_(SparseAttention.from_config(cfg))
    save_safetensors(attn, tmp_path / "m.safetensors")
    loaded = load_safetensors(tmp_path / "m.safetensors")
    assert loaded.config == cfg
    x = torch.randn(1, 20, 24)
    assert torch.equal(loaded(x), attn(x))


@pytest.mark.parametrize("options, message", [
    (dict(num_forced_initial_blocks=3, num_forced_local_blocks=2), "count toward num_selected_blocks"),
    (dict(num_forced_local_blocks=1, causal=False), "need causal=True"),
    (dict(num_forced_initial_blocks=-1), "num_forced_initial_blocks"),
    (dict(gate_biases=(0.0, 1.0)), "gate_biases"),
    (dict(gate_biases=(0.0, float("nan"), 1.0)), "gate_biases"),
    (dict(independent_kv=1), "independent_kv"),
])
def test_bad_options_name_themselves(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NSAConfig(**{**BASE, **options})


def test_scratch_preset_is_the_paper_shape_with_the_paper_design():
    paper, scratch = get_preset("paper"), get_preset("paper_scratch")
    assert scratch.replace(independent_kv=False, gate_biases=paper.gate_biases, num_forced_initial_blocks=0,
                           num_forced_local_blocks=0) == paper
    assert scratch.independent_kv and scratch.num_forced_initial_blocks == 1 and scratch.num_forced_local_blocks == 2
