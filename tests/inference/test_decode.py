"""Prefill + decoding on the static cache equals the parallel pass, with random weights: one token
at a time, several at once, ragged prompt batches, the kernel path; and the cache's errors."""

import pytest
import torch

from helpers import randomize_, reference_and_kernel_modules
from nsa_core import NSACache, SparseAttention
from nsa_core.ops.dispatch import kernel_unavailable_reason

# (heads, kv_heads, compress_block, stride, selection_block, selected, memory, window, share, interpolated, diff)
CONFIGS = [
    (4, 2, 4, 4, 4, 2, 1, 2, True, False, False),
    (6, 2, 8, 4, 8, 3, 2, 5, False, False, True),
    (6, 3, 4, 2, 8, 2, 1, 3, True, False, False),
    (4, 1, 8, 4, 2, 3, 2, 4, True, True, True),
    (6, 2, 4, 4, 1, 2, 1, 2, False, True, False),
    (8, 8, 5, 3, 6, 2, 1, 3, True, False, False),
]


def make(config, seed=0, **extra):
    heads, kv_heads, block, stride, sel, selected, mem, window, share, interp, diff = config
    attn = SparseAttention(
        dim=32, dim_head=8, heads=heads, kv_heads=kv_heads, sliding_window_size=window, compress_block_size=block,
        compress_block_sliding_stride=stride, selection_block_size=sel, num_selected_blocks=selected,
        num_compressed_mem_kv=mem, causal=True, query_heads_share_selected_kv=share,
        interpolated_importance_score=interp, use_diff_topk=diff, **extra,
    )
    return randomize_(attn, std=0.2, seed=seed)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("prefill", [1, 6])
def test_decoding_equals_parallel(config, prefill):
    attn = make(config, seed=prefill)
    x = torch.randn(2, 41, 32)
    with torch.no_grad():
        parallel = attn(x)
        out, cache = attn(x[:, :prefill], return_cache=True)
        outs = [out]
        for t in range(prefill, x.shape[1]):
            out, cache = attn(x[:, t : t + 1], cache=cache, return_cache=True)
            outs.append(out)
    decoded = torch.cat(outs, dim=1)
    assert rel(decoded, parallel) <= 2e-5
    assert isinstance(cache, NSACache) and cache.filled == x.shape[1]
    assert cache.lengths.tolist() == [x.shape[1]] * 2


@pytest.mark.parametrize("config", CONFIGS[:3])
def test_several_tokens_at_once_equal_one_at_a_time(config):
    attn = make(config)
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        parallel = attn(x)
        cache = attn.new_cache(2, 64)
        first = attn(x[:, :7], cache=cache)
        chunks = [first] + [attn(x[:, t : t + 3], cache=cache) for t in range(7, 28, 3)] + [attn(x[:, 28:], cache=cache)]
    assert rel(torch.cat(chunks, dim=1), parallel) <= 2e-5


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[3]])
def test_ragged_prompts_equal_each_sequence_alone(config):
    attn = make(config, seed=3)
    lengths = [5, 17, 11]
    prompts = [torch.randn(1, n, 32) for n in lengths]
    new = [torch.randn(1, 4, 32) for _ in lengths]
    padded = torch.zeros(3, max(lengths), 32)
    for i, p in enumerate(prompts):
        padded[i, : p.shape[1]] = p
    with torch.no_grad():
        cache = attn.new_cache(3, 32)
        out = attn(padded, cache=cache, lengths=torch.tensor(lengths))
        steps = [attn(torch.cat([n[:, t : t + 1] for n in new]), cache=cache) for t in range(4)]
        for i, p in enumerate(prompts):
            alone = attn(torch.cat((p, new[i]), dim=1))
            assert rel(out[i : i + 1, : lengths[i]], alone[:, : lengths[i]]) <= 2e-5
            assert rel(torch.cat([s[i : i + 1] for s in steps], dim=1), alone[:, lengths[i] :]) <= 2e-5


def test_fixed_capacity_raises_growable_grows():
    attn = make(CONFIGS[0])
    x = torch.randn(1, 12, 32)
    with torch.no_grad():
        cache = attn.new_cache(1, 10)
        attn(x[:, :8], cache=cache)
        attn(x[:, 8:10], cache=cache)
        with pytest.raises(ValueError, match="max_seq_len=10"):
            attn(x[:, 10:11], cache=cache)
        out, grown = attn(x[:, :2], return_cache=True)  # made by return_cache=True: grows when full
        outs = [out] + [attn(x[:, t : t + 1], cache=grown) for t in range(2, 12)]
    assert grown.growable and rel(torch.cat(outs, dim=1), attn(x)) <= 2e-5


def test_growth_keeps_every_token():
    attn = make(CONFIGS[1])
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        small = NSACache.allocate(attn.config, 2, 8, device="cpu", dtype=torch.float32, growable=True)
        first = attn(x[:, :5], cache=small)
        rest = [attn(x[:, t : t + 1], cache=small) for t in range(5, 40)]  # grows 8 -> 16 -> 32 -> 64
    assert small.capacity >= 40
    assert rel(torch.cat([first, *rest], dim=1), attn(x)) <= 2e-5


@pytest.mark.parametrize("stride, mem", [(4, 1), (3, 2), (8, 3)])
def test_compressed_slot_rule(stride, mem):
    """The slot a new token's window goes to: after the memory tokens, window (p + 1) // stride - 1 when
    p + 1 is a multiple of the stride, else the scratch slot; at every capacity a growable cache passes."""
    attn = make((4, 2, 2 * stride, stride, stride, 2, mem, 2, True, False, False))
    for capacity in (9, 18, 37):
        cache = NSACache.allocate(attn.config, 2, capacity, device="cpu", dtype=torch.float32)
        positions = torch.tensor([[0, capacity - 1], [stride - 1, min(2 * stride, capacity) - 1]])
        want = torch.where((positions + 1) % stride == 0, mem + (positions + 1) // stride - 1, cache.scratch_slot)
        rule = cache.compressed_slot_rule()
        assert rule.shape == (capacity,) and rule.dtype == torch.int64
        assert torch.equal(rule[positions], want)


def test_cache_errors():
    attn = make(CONFIGS[0])
    with pytest.raises(ValueError, match="causal"):
        SparseAttention(dim=32, dim_head=8, heads=4, sliding_window_size=2, compress_block_size=4,
                        selection_block_size=4, num_selected_blocks=2, causal=False)(torch.randn(1, 4, 32), return_cache=True)
    cache = attn.new_cache(1, 16)
    attn(torch.randn(1, 4, 32), cache=cache)
    with pytest.raises(ValueError, match="batch size 1"):
        attn(torch.randn(2, 1, 32), cache=cache)
    other = make(CONFIGS[2])
    with pytest.raises(ValueError, match="another module configuration"):
        other(torch.randn(1, 1, 32), cache=cache)
    with pytest.raises(ValueError, match="cache holds torch.float64"):
        attn(torch.randn(1, 4, 32), cache=attn.new_cache(1, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="NSACache"):
        attn(torch.randn(1, 1, 32), cache=("not", "a cache"))
    with pytest.raises(ValueError, match="lengths"):
        attn(torch.randn(1, 1, 32), cache=cache, lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        attn(torch.randn(1, 4, 32), cache=attn.new_cache(1, 16), lengths=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        attn.new_cache(1, 0)


@pytest.mark.skipif(kernel_unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None,
                    reason="kernels cannot run here")
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("changes", [
    dict(query_heads_share_selected_kv=True), dict(query_heads_share_selected_kv=False),
    dict(importance_score="summed_probs", num_forced_initial_blocks=1, num_forced_local_blocks=1, independent_kv=True),
    dict(importance_score="selected_keys", num_forced_initial_blocks=1, num_forced_local_blocks=1, independent_kv=True),
    dict(importance_score="selected_keys", query_heads_share_selected_kv=False),
    dict(compress_block_size=32, compress_block_sliding_stride=32, interpolated_importance_score=True),
])
def test_decoding_on_kernels_equals_parallel_reference(changes):
    """The step's kernels (the fused compressed branch and selection among them) equal the parallel
    pass on the reference, for each importance score, forced blocks and interpolated scores."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(dim=48, dim_head=16, heads=6, kv_heads=2, sliding_window_size=20, compress_block_size=16,
                  compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=2, causal=True)
    ref, ker = reference_and_kernel_modules(0.2, device, **{**kwargs, **changes})
    x = torch.randn(2, 80, 48, device=device)
    with torch.no_grad():
        parallel = ref(x)
        cache = ker.new_cache(2, 88)
        # at stride 8: single steps over compressed windows' completions (positions 55, 63; 63 also ends a
        # selection block), then one multi-token step that completes two more inside it (71, 79)
        outs = [ker(x[:, :50], cache=cache), ker(x[:, 50:53], cache=cache)]
        outs += [ker(x[:, t : t + 1], cache=cache) for t in range(53, 65)]
        outs.append(ker(x[:, 65:80], cache=cache))
    assert rel(torch.cat(outs, dim=1), parallel) <= 2e-5


def test_prefill_and_steps_run_the_one_attend(monkeypatch):
    """Prefill and every step (one or several tokens) run SparseAttention.attend: the step with a
    decoding-step descriptor at the rows' device-side positions and the cache's pages as its keys."""
    from nsa_core.ops.paged import Pages

    attn = make(CONFIGS[1])
    calls, attend = [], attn.attend

    def spy(x, q, keys, seqs):
        positions = seqs.query_positions("cpu").tolist() if seqs.is_step else None  # before the cache advances
        calls.append((seqs, keys, positions))
        return attend(x, q, keys, seqs)

    monkeypatch.setattr(attn, "attend", spy)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        cache = attn.new_cache(2, 16)
        attn(x[:, :7], cache=cache, lengths=torch.tensor([7, 4]))
        attn(x[:, 7:8], cache=cache)
        attn(x[:, 8:11], cache=cache)
    (prefill, prefill_keys, _), (one, one_keys, at_one), (three, three_keys, at_three) = calls
    assert prefill.is_plain and not isinstance(prefill_keys.rotated_k, Pages)
    assert one.is_step and at_one == [[7], [4]]
    assert three.is_step and at_three == [[8, 9, 10], [5, 6, 7]]
    assert all(isinstance(t, Pages) for keys in (one_keys, three_keys)
               for t in (keys.compressed_k, keys.compressed_v, keys.rotated_k, keys.v, keys.window_k, keys.window_v))


@pytest.mark.skipif(kernel_unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None,
                    reason="kernels cannot run here")
@pytest.mark.parametrize("changes", [{}, dict(selected_key_slots=1)])
def test_decoding_step_compiles_fullgraph_on_the_kernels(changes):
    """torch.compile(fullgraph=True) traces a whole decoding step (the cache writes, a window's compression,
    then attend over the cache's pages, with the cache's block keys: no graph break, no host sync) and
    equals the eager step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = randomize_(SparseAttention(dim=48, dim_head=16, heads=6, kv_heads=2, sliding_window_size=20,
                                      compress_block_size=16, compress_block_sliding_stride=8, selection_block_size=16,
                                      num_selected_blocks=3, causal=True, backend="triton", **changes),
                      std=0.2).to(device)
    x = torch.randn(2, 41, 48, device=device)
    with torch.no_grad():
        cache = attn.new_cache(2, 48)
        attn(x[:, :39], cache=cache, lengths=torch.tensor([39, 30], device=device))
        state = cache.snapshot()
        eager = attn(x[:, 39:41], cache=cache)
        cache.restore(state)
        compiled = torch.compile(lambda t: attn(t, cache=cache), fullgraph=True, backend="aot_eager")(x[:, 39:41])
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)
