"""PagedCache at the SparseAttention level, float64 and random weights: sequences of ragged lengths
joining and leaving a running batch decode as each alone (the parallel pass), a prompt prefilled in
chunks equals it prefilled in one call, pages go back to the pool, and the errors (an exhausted
pool, a full sequence, mixed prefill and step rows, a closed slot)."""

import pytest
import torch

from helpers import randomize_
from nsa_core import SparseAttention
from nsa_core.serving.paged_cache import PagedCache

DIM = 32
# (heads, kv_heads, compress_block, stride, selection_block, selected, memory, window, extra)
CONFIGS = [
    (6, 2, 8, 4, 8, 3, 2, 5, {}),  # pooled block scores
    (4, 1, 8, 4, 2, 3, 2, 4, dict(interpolated_importance_score=True)),  # scored exactly (blocks < stride)
    (6, 3, 4, 2, 4, 2, 1, 3, dict(independent_kv=True)),  # the window branch's own pages
    (6, 2, 8, 4, 4, 3, 2, 5, dict(importance_score="selected_keys", num_forced_initial_blocks=1)),  # page means
    (6, 2, 8, 4, 8, 3, 2, 5, dict(selected_key_slots=1, num_forced_initial_blocks=1)),  # both scores
]
TOL = 1e-10  # float64: the decode path's error against the parallel pass measured ~1e-15


def make(config, seed=0):
    heads, kv_heads, block, stride, sel, selected, mem, window, extra = config
    attn = SparseAttention(dim=DIM, dim_head=8, heads=heads, kv_heads=kv_heads, sliding_window_size=window,
                           compress_block_size=block, compress_block_sliding_stride=stride, selection_block_size=sel,
                           num_selected_blocks=selected, num_compressed_mem_kv=mem, causal=True, **extra)
    return randomize_(attn, std=0.2, seed=seed).double()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("config", CONFIGS)
def test_joining_and_leaving_decode_as_each_alone(config):
    """Three sequences over two slots: A and B decode together, A leaves, C is prefilled while B keeps
    decoding, then B and C decode together; every output equals that sequence's parallel pass."""
    attn = make(config, seed=1)
    torch.manual_seed(2)
    total = {"A": 13, "B": 30, "C": 25}
    prompt = {"A": 5, "B": 11, "C": 9}
    xs = {name: torch.randn(1, n, DIM, dtype=torch.float64) for name, n in total.items()}
    cache = PagedCache.for_model(attn, slots=2, max_seq_len=32, num_pages=40)
    outs = {name: [] for name in total}
    slot, pos = {}, {}
    with torch.no_grad():
        def join(name):
            slot[name], pos[name] = cache.open(), prompt[name]
            outs[name].append(cache.run(attn, xs[name][:, : prompt[name]], [slot[name]]))

        def step(names):
            x = torch.cat([xs[n][:, pos[n] : pos[n] + 1] for n in names])
            out = cache.run(attn, x, [slot[n] for n in names])
            for i, n in enumerate(names):
                outs[n].append(out[i : i + 1])
                pos[n] += 1

        join("A")
        join("B")
        while pos["A"] < total["A"]:
            step(["B", "A"])  # rows in any order of slots
        cache.close(slot["A"])
        step(["B"])
        join("C")  # reuses A's slot and pages
        step(["B"])
        while pos["B"] < total["B"]:
            step(["C", "B"])
        while pos["C"] < total["C"]:
            step(["C"])
        for name in ("B", "C"):
            cache.close(slot[name])
        for name, x in xs.items():
            assert rel(torch.cat(outs[name], dim=1), attn(x)) <= TOL, name
    assert cache.token_pool.used_pages == 0 and cache.compressed_pool.used_pages == 0
    assert cache.token_pool.free_pages == 39 and cache.free_slots == [0, 1]


@pytest.mark.parametrize("config", CONFIGS)
def test_chunked_prefill_equals_one_shot(config):
    """A prompt of 23 tokens prefilled as 7 + 5 + 1 + 10 equals it prefilled at once (outputs, then
    the decoding steps after it), with a ragged partner row prefilled right-padded."""
    attn = make(config, seed=4)
    torch.manual_seed(5)
    x = torch.randn(1, 27, DIM, dtype=torch.float64)
    with torch.no_grad():
        one = PagedCache.for_model(attn, slots=1, max_seq_len=40, num_pages=30)
        s = one.open()
        whole = [one.run(attn, x[:, :23], [s])] + [one.run(attn, x[:, t : t + 1], [s]) for t in range(23, 27)]
        chunked = PagedCache.for_model(attn, slots=2, max_seq_len=40, num_pages=30)
        s, other = chunked.open(), chunked.open()
        partner = torch.randn(2, 9, DIM, dtype=torch.float64)
        partner[1] = x[0, :9]
        first = chunked.run(attn, partner, [other, s], lengths=[4, 7])  # s: 7 valid tokens of 9
        parts = [first[1:, :7]]
        for a, b in ((7, 12), (12, 13)):
            parts.append(chunked.run(attn, x[:, a:b], [s]))
        parts.append(chunked.run(attn, torch.cat((torch.randn(1, 10, DIM, dtype=torch.float64), x[:, 13:23])),
                                 [other, s])[1:])
        parts += [chunked.run(attn, x[:, t : t + 1], [s]) for t in range(23, 27)]
    assert chunked.length(s) == 27 and chunked.length(other) == 14
    assert rel(torch.cat(parts, dim=1), torch.cat(whole, dim=1)) <= TOL
    assert rel(torch.cat(whole, dim=1), attn(x)) <= TOL


def test_pages_on_demand_and_errors():
    attn = make(CONFIGS[0])
    page = attn.config.selection_block_size  # 8
    cache = PagedCache.for_model(attn, slots=2, max_seq_len=32, num_pages=5)  # 4 usable pages
    x = torch.randn(2, 20, DIM, dtype=torch.float64)
    with torch.no_grad():
        a = cache.open()
        cache.run(attn, x[:1, :9], [a])  # 9 tokens: 2 pages
        assert cache.token_pool.used_pages == 2 and cache.block_table[a, :3].tolist() == [1, 2, 0]
        b = cache.open()
        with pytest.raises(ValueError, match="every one of slots=2"):
            cache.open()
        with pytest.raises(ValueError, match="slots mixes empty slots"):
            cache.run(attn, x[:, :1], [a, b])
        with pytest.raises(ValueError, match=r"page pool exhausted: 3 more pages needed, 2 free of num_pages=5"):
            cache.run(attn, x[1:, : 2 * page + 1], [b])
        assert cache.token_pool.used_pages == 2 and cache.length(b) == 0  # nothing taken, nothing written
        cache.run(attn, x[1:, :page], [b])
        with pytest.raises(ValueError, match="page pool exhausted"):
            for t in range(9, 20):  # a's third page is the last free one; b's second does not fit
                cache.run(attn, x[:, t : t + 1], [a, b])
        cache.close(b)
        with pytest.raises(ValueError, match="slot must be an open slot"):
            cache.run(attn, x[:1, :1], [b])
        with pytest.raises(ValueError, match="max_seq_len=32"):
            cache.run(attn, x[:1, :20].repeat(1, 2, 1)[:, :24], [a])
        cache.close(a)
    assert cache.token_pool.free_pages == 4 and cache.block_table.eq(0).all()
    with pytest.raises(ValueError, match="num_pages must be an int >= 2"):
        PagedCache.for_model(attn, slots=1, max_seq_len=8, num_pages=1)


def test_state_grows_with_pages_not_with_max_seq_len():
    """Per layer, what a PagedCache holds besides its tables is the pools (pages) and a ring of R
    tokens per slot: the same bytes for a 64-token and a 4096-token max_seq_len."""
    attn = make(CONFIGS[0])

    def state_bytes(max_seq_len):
        cache = PagedCache.for_model(attn, slots=3, max_seq_len=max_seq_len, num_pages=9, num_compressed_pages=4)
        layer = cache.layers[0]
        return sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))

    assert state_bytes(64) == state_bytes(4096)
