"""Sequence-parallel SparseAttention over gloo equals the single process (float64, CPU), in both
shard layouts (contiguous and balanced).

Every case of a layout runs inside one spawned group (spawns are the slow part): each rank builds the
same module and inputs, runs the whole sequence alone and its shard with the group, and compares its
output shard (and the outputs of all ranks put back in sequence order), its input-gradient shard and
the parameter gradients summed over the ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import forward_backward, randomize_, rel_err
from launcher import run_ranks
from nsa_core.distributed import LAYOUTS, shard_sequence, shard_spans, unshard_sequence
from nsa_core.model.attention import SparseAttention
from nsa_core.model.transformer import Transformer

SEQ_LEN = 24
TOL = 1e-10

BASE = dict(dim=16, dim_head=8, sliding_window_size=5, compress_block_size=4, compress_block_sliding_stride=2,
            selection_block_size=4, num_selected_blocks=2, num_compressed_mem_kv=2)

SPARSE_KWARGS = {k: v for k, v in BASE.items() if k not in ("dim", "dim_head")}

# G = heads / kv_heads of 1, 3 and 16; kv heads 1 and 2 are fewer than 4 ranks; shards of 6 tokens
# (balanced: two chunks of 3) cut compression windows (4 every 2), selection blocks and windows (5) apart.
CASES = [
    dict(heads=2, kv_heads=2),
    dict(heads=6, kv_heads=2, compress_block_sliding_stride=4, selection_block_size=8, use_diff_topk=True),
    dict(heads=16, kv_heads=1, selection_block_size=2, interpolated_importance_score=True),
    dict(heads=6, kv_heads=2, query_heads_share_selected_kv=False, sliding_window_size=7),
    dict(heads=3, kv_heads=1, compress_block_size=32, compress_block_sliding_stride=None),  # no block to select
    # the paper options: a key / value projection per branch, forced blocks (causal), summed probabilities;
    # windows of 6 every 3 (shards of 6, balanced chunks of 3: windows reach back into two chunks)
    dict(heads=6, kv_heads=2, independent_kv=True, num_forced_initial_blocks=1, num_forced_local_blocks=1,
         importance_score="summed_probs", compress_block_size=6, compress_block_sliding_stride=3, selection_block_size=3),
    # blocks scored by the selected branch's own block keys: blocks of 4 cut by shards of 6; with
    # use_diff_topk the gradient reaches those keys through the scores; and with a K/V per branch
    dict(heads=6, kv_heads=2, importance_score="selected_keys", selection_block_size=4, use_diff_topk=True),
    dict(heads=3, kv_heads=1, importance_score="selected_keys", independent_kv=True, num_forced_initial_blocks=1,
         compress_block_size=6, compress_block_sliding_stride=3, selection_block_size=3),
    # a slot for the compressed score, one for the block keys (causal only)
    dict(heads=6, kv_heads=2, selected_key_slots=1, independent_kv=True),
]


def _module(case: dict, causal: bool) -> SparseAttention:
    if not causal:  # forced blocks and block-key slots are causal-only
        case = {k: v for k, v in case.items() if not k.startswith("num_forced") and k != "selected_key_slots"}
    torch.manual_seed(0)
    module = SparseAttention(**{**BASE, **case}, causal=causal, backend="torch").double()
    return randomize_(module, std=0.4, seed=1)


def _check_case(group, case: dict, causal: bool, layout: str) -> None:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    module = _module(case, causal)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, SEQ_LEN, BASE["dim"], generator=gen, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    out_full, dx_full, grads_full = forward_backward(module, x, grad_out)

    def mine(t):
        return shard_sequence(t, group, layout)

    xs = mine(x).clone().requires_grad_()
    out = module(xs, sequence_parallel_group=group, sequence_parallel_layout=layout)
    out.backward(mine(grad_out))
    what = f"case {case} causal={causal} {layout} rank {rank}/{world}"
    assert rel_err(out.detach(), mine(out_full)) < TOL, f"output, {what}"
    outs = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(outs, out.detach().contiguous(), group=group)
    assert rel_err(unshard_sequence(outs, layout), out_full) < TOL, f"reassembled output, {what}"
    assert rel_err(xs.grad, mine(dx_full)) < TOL, f"input gradient, {what}"
    for name, p in module.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        dist.all_reduce(grad, group=group)
        expected = torch.zeros_like(p) if grads_full[name] is None else grads_full[name]
        assert rel_err(grad, expected) < TOL or (grad - expected).abs().max() < TOL, f"gradient of {name}, {what}"
    module.zero_grad(set_to_none=True)


def _equivalence(rank: int, world: int, layout: str) -> None:
    groups = [dist.group.WORLD]
    if world == 4:  # two groups of 2 inside the world: group-local ranks and offsets
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        groups.append(pairs[rank // 2])
    for group in groups:
        for causal in (True, False):
            for case in CASES:
                _check_case(group, case, causal, layout)


def _transformer(rank: int, world: int, layout: str) -> None:
    """Logits of the shards, the summed loss shares and gradients equal the whole sequence's."""
    group = dist.group.WORLD
    ids = torch.randint(0, 50, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    sp = dict(sequence_parallel_group=group, sequence_parallel_layout=layout)
    for causal in (True, False):
        torch.manual_seed(0)
        model = Transformer(num_tokens=50, dim=16, depth=2, dim_head=8, heads=4, kv_heads=2, use_sparse_attn=True,
                            causal=causal, sparse_attn_kwargs=SPARSE_KWARGS).double()
        randomize_(model, std=0.3, seed=4)
        logits = model(shard_sequence(ids, group, layout), **sp)
        expected_logits = shard_sequence(model(ids), group, layout)
        assert rel_err(logits.detach(), expected_logits.detach()) < TOL, f"logits, causal={causal} {layout}"
        if not causal:  # the single-process loss drops the last token from the inputs: equal only when causal
            continue
        loss = model(ids, return_loss=True)
        loss.backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        share = model(shard_sequence(ids, group, layout), return_loss=True, **sp)
        share.backward()
        total = share.detach().clone()
        dist.all_reduce(total)
        assert rel_err(total, loss.detach()) < TOL, f"summed loss shares, {layout}"
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)
            assert rel_err(p.grad, expected[name]) < TOL, f"gradient of {name} (Transformer, {layout})"


def _misuse(rank: int, world: int) -> None:
    module = _module(CASES[0], causal=True)
    group = dist.group.WORLD
    # a shard length that differs between ranks: every rank gets the same error, none hangs
    x = torch.randn(1, 6 + rank, BASE["dim"], dtype=torch.float64)
    with pytest.raises(ValueError, match="same batch size and length"):
        module(x, sequence_parallel_group=group)
    with pytest.raises(ValueError, match="serves"):  # a gloo group cannot take meta (or CUDA) tensors
        module.to("meta")(torch.empty(1, 6, BASE["dim"], device="meta", dtype=torch.float64),
                          sequence_parallel_group=group)
    with pytest.raises(TypeError, match="ProcessGroup"):
        _module(CASES[0], causal=True)(x, sequence_parallel_group=0)
    with pytest.raises(ValueError, match="no cache"):
        _module(CASES[0], causal=True)(x, return_cache=True, sequence_parallel_group=group)
    dense = Transformer(num_tokens=50, dim=16, depth=1, dim_head=8, heads=2)
    with pytest.raises(ValueError, match="use_sparse_attn"):
        dense(torch.zeros(1, 6, dtype=torch.long), sequence_parallel_group=group)
    # layouts: an unknown one; balanced shards of an odd length (the same on every rank: none hangs)
    module = _module(CASES[0], causal=True)
    with pytest.raises(ValueError, match=r"sequence_parallel_layout must be one of \('contiguous', 'balanced'\)"):
        module(torch.randn(1, 6, BASE["dim"], dtype=torch.float64), sequence_parallel_group=group,
               sequence_parallel_layout="zigzag")
    with pytest.raises(ValueError, match=f"divisible by 2 x the {world} ranks"):
        module(torch.randn(1, 7, BASE["dim"], dtype=torch.float64), sequence_parallel_group=group,
               sequence_parallel_layout="balanced")
    with pytest.raises(ValueError, match=f"divisible by 2 x the {world} ranks"):
        shard_sequence(torch.zeros(1, 6 * world + 2), group, "balanced")
    with pytest.raises(ValueError, match="sequence_parallel_layout must be one of"):
        dense(torch.zeros(1, 6, dtype=torch.long), sequence_parallel_group=group, sequence_parallel_layout="Balanced")


def _transformer_and_misuse(rank: int, world: int, layout: str) -> None:
    _transformer(rank, world, layout)
    if layout == "contiguous":
        _misuse(rank, world)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_single_process(world, layout):
    run_ranks(_equivalence, world, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformer_shards_and_misuse(layout):
    """The Transformer's shards and loss shares (2 ranks); misuse errors. One spawn per layout."""
    run_ranks(_transformer_and_misuse, 2, layout)


def test_needs_an_initialized_group():
    module = _module(CASES[0], causal=True)
    with pytest.raises(ValueError, match="init_process_group"):
        module(torch.randn(1, 6, BASE["dim"], dtype=torch.float64), sequence_parallel_group=object())


def test_layout_misuse_without_a_group():
    module = _module(CASES[0], causal=True)
    x = torch.randn(1, 6, BASE["dim"], dtype=torch.float64)
    with pytest.raises(ValueError, match="sequence_parallel_layout must be one of"):
        module(x, sequence_parallel_layout="zigzag")
    with pytest.raises(ValueError, match="needs a sequence_parallel_group"):
        module(x, sequence_parallel_layout="balanced")
    model = Transformer(num_tokens=50, dim=16, depth=1, dim_head=8, heads=2, use_sparse_attn=True,
                        sparse_attn_kwargs=SPARSE_KWARGS)
    with pytest.raises(ValueError, match="needs a sequence_parallel_group"):
        model(torch.zeros(1, 6, dtype=torch.long), sequence_parallel_layout="balanced")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_spans_cover_the_sequence_and_unshard_inverts(world):
    """Balanced: rank r holds chunks r and 2P - 1 - r; the shards put back give the sequence."""
    n = 8 * world
    x = torch.arange(n).view(1, n)
    for layout in LAYOUTS:
        spans = [shard_spans(n, world, r, layout) for r in range(world)]
        assert sorted(s for rank_spans in spans for s in rank_spans) == \
            [(i * n // (len(spans[0]) * world), (i + 1) * n // (len(spans[0]) * world)) for i in range(len(spans[0]) * world)]
        shards = [torch.cat([x[:, s:e] for s, e in rank_spans], dim=1) for rank_spans in spans]
        assert torch.equal(unshard_sequence(shards, layout), x)
    assert [shard_spans(n, world, r, "balanced") for r in range(world)][0] == [(0, 4), (n - 4, n)]


@pytest.mark.parametrize("causal", [True, False])
def test_a_causal_piece_reads_only_the_keys_before_its_end(monkeypatch, causal):
    """Balanced rank 0 of 2 holds chunks 0 and 3: causal, its first piece attends the keys up to its
    last query only (k_len 6 of 24; the compressed tokens completed by then), its second piece all;
    not causal, both all 24. What the pieces compute is the gloo tests' (they equal one process)."""
    from nsa_core.model.sequence_parallel import StandInGather, shard_forward, shard_plan

    module = randomize_(SparseAttention(**BASE, heads=2, kv_heads=1, causal=causal)).double()
    seen = []
    attend = SparseAttention.attend
    monkeypatch.setattr(SparseAttention, "attend", lambda self, x, q, keys, seqs: seen.append(
        (seqs.q_offset, seqs.q_len, seqs.k_len, keys.rotated_k.shape[-2], keys.compressed_k.shape[-2]))
        or attend(self, x, q, keys, seqs))
    plan = shard_plan(module, SEQ_LEN, 2, 0, "balanced")
    gather = StandInGather(plan, lambda shape: torch.randn(shape, dtype=torch.float64))
    shard_forward(module, torch.randn(1, SEQ_LEN // 2, 16, dtype=torch.float64), plan, gather)
    mem, stride = BASE["num_compressed_mem_kv"], BASE["compress_block_sliding_stride"]
    if causal:
        assert seen == [(0, 6, 6, 6, mem + 6 // stride), (18, 6, 24, 24, mem + 24 // stride)]
    else:
        assert seen == [(0, 6, 24, 24, mem + 24 // stride), (18, 6, 24, 24, mem + 24 // stride)]
