"""Paged split-K decode attention: the reference twin against dense attention over the gathered
pages (float64), the kernel against the twin (TRITON_INTERPRET=1 on CPU, fp32, NaN-poisoned
outputs and partials), the split rule, the op's registration, input errors; bf16, CUDA-graph
capture and torch.compile on a GPU."""

from __future__ import annotations

import pytest
import torch

from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.reference.paged_decode import paged_decode_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                   reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")


def paged_problem(*, B=2, HKV=2, G=3, K=1, D=32, Dv=32, page=16, max_pages=5, S=3, per_head=False, window=None,
                  dtype=torch.float32, device=DEVICE, seed=0):
    """Random pools with a permuted block table (spare physical pages, and garbage entries for the
    logical pages past a sequence's end, as an unallocated paged cache has), sequences of random
    lengths (the last one or two pages partly or wholly empty) whose last K tokens are the queries
    (hi = their positions; lo = hi - window when window is set), lists of S distinct random pages
    with about a quarter of the slots invalid, holding garbage ids (in range or not).
    -> the paged_decode_attention arguments as a dict."""
    gen = torch.Generator().manual_seed(seed)
    HQ = HKV * G
    HI = HQ if per_head else HKV
    P = B * max_pages + 3
    table = torch.randperm(P, generator=gen)[: B * max_pages].view(B, max_pages)
    lengths = torch.randint(max(K, (max_pages - 2) * page + 1), max_pages * page + 1, (B,), generator=gen)
    past_end = torch.arange(max_pages) * page >= lengths[:, None]
    table = torch.where(past_end, torch.randint(-3, 3, table.shape, generator=gen) * P, table).to(torch.int32)
    hi = lengths[:, None] - K + torch.arange(K)  # (B, K): positions of the new tokens
    lo = None if window is None else hi - window
    pages = torch.rand(B, HI, K, max_pages, generator=gen).argsort(-1)[..., :S]  # distinct pages per list
    valid = torch.rand(B, HI, K, S, generator=gen) > 0.25
    far = torch.randint(max_pages, max_pages + 50, (B, HI, K, S), generator=gen)
    garbage = torch.stack((torch.randint(0, max_pages, far.shape, generator=gen), far, -far), -1).gather(
        -1, torch.randint(0, 3, (*far.shape, 1), generator=gen)).squeeze(-1)  # a page in range, past the end, negative
    blocks = torch.where(valid, pages, garbage)
    q = torch.randn(B, HQ, K, D, generator=gen)
    k_pages = torch.randn(P, HKV, page, D, generator=gen)
    v_pages = torch.randn(P, HKV, page, Dv, generator=gen)
    cast = lambda t: t.to(device=device, dtype=dtype)
    return dict(q=cast(q), k_pages=cast(k_pages), v_pages=cast(v_pages), block_table=table.to(device),
                blocks=blocks.to(device), valid=valid.to(device), hi=hi.to(device),
                lo=None if lo is None else lo.to(device), scale=D ** -0.5)


def dense_attention(p) -> torch.Tensor:
    """Brute force in float64 on the CPU: each sequence's keys gathered in logical order, one mask
    over them (listed pages of valid slots, lo <= index <= hi)."""
    p = {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in p.items()}
    q, kp, vp = p["q"].double(), p["k_pages"].double(), p["v_pages"].double()
    B, HQ, K, _ = q.shape
    P, HKV, page, _ = kp.shape
    HI, max_pages = p["blocks"].shape[1], p["block_table"].shape[1]
    table = p["block_table"].long().clamp(0, P - 1)  # garbage entries past the end: their keys lie beyond hi
    keys = kp[table].permute(0, 2, 1, 3, 4).flatten(2, 3)  # (B, HKV, max_pages * page, D)
    values = vp[table].permute(0, 2, 1, 3, 4).flatten(2, 3)
    kv_of_head = torch.arange(HQ) // (HQ // HKV)
    logits = torch.einsum("bhkd,bhnd->bhkn", q, keys[:, kv_of_head]) * p["scale"]  # (B, HQ, K, N)
    blocks = p["blocks"].long()
    ok = p["valid"] & (blocks >= 0) & (blocks < max_pages)
    listed = torch.zeros(B, HI, K, max_pages + 1, dtype=torch.bool)
    listed.scatter_(-1, torch.where(ok, blocks, max_pages), True)  # invalid slots land in a spare column
    listed = listed[..., :max_pages].repeat_interleave(page, -1)[:, torch.arange(HQ) // (HQ // HI)]  # (B, HQ, K, N)
    j = torch.arange(max_pages * page)
    lo = torch.zeros_like(p["hi"]) if p["lo"] is None else p["lo"]
    allowed = listed & (j >= lo[:, None, :, None]) & (j <= p["hi"][:, None, :, None])
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhkn,bhnd->bhkd", weights, values[:, kv_of_head])


def run_kernel(p, **kwargs):
    from nsa_core.kernels.decode import paged_decode_attention

    return paged_decode_attention(*(p[n] for n in ARGS), **kwargs)


def run_reference(p, dtype=None):
    args = [p[n].to(dtype) if dtype is not None and n in ("q", "k_pages", "v_pages") else p[n] for n in ARGS]
    return paged_decode_reference(*args)


ARGS = ("q", "k_pages", "v_pages", "block_table", "blocks", "valid", "hi", "lo", "scale")

CASES = {  # name: paged_problem arguments
    "g1_k1": dict(G=1, K=1),
    "g3_k3_window": dict(G=3, K=3, window=21),
    "g16_dv": dict(HKV=1, G=16, K=1, D=40, Dv=24, page=32, max_pages=4, S=3),
    "per_head_g3": dict(G=3, K=3, per_head=True, D=24, Dv=16, window=37),
    "per_head_g1_page32": dict(G=1, K=1, per_head=True, page=32, max_pages=4, S=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_dense(case):
    p = paged_problem(**CASES[case], dtype=torch.float64, device="cpu", seed=1)
    torch.testing.assert_close(run_reference(p), dense_attention(p), rtol=1e-12, atol=1e-12)


def test_reference_rows_without_keys_are_zero():
    p = paged_problem(G=3, K=3, dtype=torch.float64, device="cpu", seed=2)
    p["valid"][0, 1] = False  # a whole list: its G heads, every token
    p["hi"][1, 0] = -1  # a token before every key
    p["lo"] = torch.zeros_like(p["hi"])
    p["lo"][1, 2] = p["hi"][1, 2] + 1  # an empty window
    out = run_reference(p)
    assert out[0, 3:6].abs().max() == 0 and out[1, :, 0].abs().max() == 0 and out[1, :, 2].abs().max() == 0
    torch.testing.assert_close(out, dense_attention(p), rtol=1e-12, atol=1e-12)


@pytest.fixture
def split_buffers(poisoned_outputs, monkeypatch):
    """The NaN-poisoned allocations, recorded: the shapes of the float32 partial buffers the launcher made."""
    from nsa_core.kernels import outputs

    poisoned, shapes = outputs.new_output, []

    def recording(*shape, device, dtype):
        if dtype == torch.float32 and len(shape) == 5:  # o_part (B, HQ, K, NS, DV)
            shapes.append(shape)
        return poisoned(*shape, device=device, dtype=dtype)

    monkeypatch.setattr(outputs, "new_output", recording)
    return shapes


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_reference(case, num_splits, split_buffers, monkeypatch):
    """One split with the default tiles (several pages per key tile); three splits with 16-key tiles
    (one page per tile at page 16, two tiles per page at 32), so every list has 3 tiles to split."""
    from nsa_core.kernels.decode import launch

    if num_splits > 1:
        monkeypatch.setattr(launch, "KEYS_PER_TILE", 16)
    p = paged_problem(**CASES[case], seed=3)
    got, want = run_kernel(p, num_splits=num_splits), run_reference(p)
    assert got.shape == want.shape and got.dtype == want.dtype
    used = launch.splits_used(p["blocks"].shape[-1], num_splits)  # S = 4 in 3 splits: 2 of 2 slots
    assert [shape[3] for shape in split_buffers] == ([] if num_splits == 1 else [used]) and (num_splits == 1 or used > 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


LIST_RULE_CASES = {  # name: paged_problem arguments, the rule, its window
    "own_g3_k3": (dict(G=3, K=3), "listed_and_own", 0),
    "own_per_head": (dict(G=3, K=1, per_head=True, D=24, Dv=16), "listed_and_own", 0),
    "own_nothing_listed": (dict(G=2, K=2, S=0), "listed_and_own", 0),
    "window_g3_k3": (dict(G=3, K=3), "window", 21),
    "window_g5_page32": (dict(HKV=1, G=5, K=2, page=32, max_pages=4), "window", 40),
    "window_wider_than_the_rows": (dict(G=2, K=1, max_pages=3), "window", 100),
}


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("case", list(LIST_RULE_CASES))
def test_kernel_list_rules_equal_the_expanded_lists(case, num_splits, poisoned_outputs, monkeypatch):
    """The kernel forming a query's pages itself (its own page after the listed ones; the window's
    pages) equals the reference over the lists expand_lists writes out, and dense attention."""
    from nsa_core.kernels.decode import launch
    from nsa_core.reference.paged_decode import expand_lists

    if num_splits > 1:
        monkeypatch.setattr(launch, "KEYS_PER_TILE", 16)
    problem, lists, window = LIST_RULE_CASES[case]
    p = paged_problem(**problem, seed=12)
    if lists == "window":
        p.update(blocks=None, valid=None, lo=None)
    else:  # a list must not name a page twice: the own page is not among the listed ones (as a selection)
        own = (p["hi"] // p["k_pages"].shape[2])[:, None, :, None]
        p["valid"] = p["valid"] & (p["blocks"] != own)
    got = run_kernel(p, num_splits=num_splits, lists=lists, window=window)
    blocks, valid, lo = expand_lists(lists, p["blocks"], p["valid"], p["hi"], p["lo"], window=window,
                                     page_size=p["k_pages"].shape[2], kv_heads=p["k_pages"].shape[1])
    expanded = {**p, "blocks": blocks, "valid": valid, "lo": lo}
    torch.testing.assert_close(got, run_reference(expanded), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), dense_attention(expanded).to(got.device), rtol=1e-5, atol=1e-5)


def test_list_rule_errors_name_the_argument():
    from nsa_core.ops.decode_attention import decode_attention

    p = paged_problem(seed=13, device="cpu")
    args = [p[n] for n in ARGS[:8]]
    with pytest.raises(ValueError, match="lists must be"):
        decode_attention(*args, scale=1.0, lists="pages")
    with pytest.raises(ValueError, match="blocks, valid and lo must be None"):
        decode_attention(*args, scale=1.0, lists="window", window=16)
    with pytest.raises(ValueError, match="needs window"):
        decode_attention(*args[:4], None, None, args[6], None, scale=1.0, lists="window", window=0)
    with pytest.raises(ValueError, match="needs blocks and valid"):
        decode_attention(*args[:4], None, None, args[6], None, scale=1.0, lists="listed_and_own")


@needs_kernels
def test_kernel_rows_without_keys_are_zero(split_buffers, monkeypatch):
    from nsa_core.kernels.decode import launch

    monkeypatch.setattr(launch, "KEYS_PER_TILE", 16)  # a page per tile: 3 tiles to split
    p = paged_problem(G=3, K=3, window=40, seed=4)
    p["valid"][0, 1] = False  # a whole list: its G heads, every token
    p["hi"][1, 0] = -1  # a token before every key
    p["lo"][1, 2] = p["hi"][1, 2] + 1  # an empty window
    p.update(block_table=p["block_table"].long(), blocks=p["blocks"].int(), hi=p["hi"].int(), lo=p["lo"].int())
    for num_splits in (1, 2):
        out = run_kernel(p, num_splits=num_splits)
        assert out[0, 3:6].abs().max() == 0 and out[1, :, 0].abs().max() == 0 and out[1, :, 2].abs().max() == 0
        torch.testing.assert_close(out, run_reference(p), rtol=1e-5, atol=1e-5)
    assert [shape[3] for shape in split_buffers] == [2]


@needs_kernels
def test_kernel_head_tiles_and_page_chunks(split_buffers, monkeypatch):
    """G = 20 in two tiles of 16 heads (the second mostly padding); 32-key pages in two 16-key tiles."""
    from nsa_core.kernels.decode import launch

    monkeypatch.setattr(launch, "MAX_ROWS", 16)
    monkeypatch.setattr(launch, "KEYS_PER_TILE", 16)
    p = paged_problem(B=1, HKV=1, G=20, K=1, D=16, Dv=16, page=32, max_pages=4, S=3, window=45, seed=5)
    for num_splits in (1, 2):
        torch.testing.assert_close(run_kernel(p, num_splits=num_splits), run_reference(p), rtol=1e-5, atol=1e-5)
    assert [shape[3] for shape in split_buffers] == [2]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584)"))])
def test_kernel_half_precision(dtype, poisoned_outputs):
    """16-bit inputs: the output in that dtype, within 2x PyTorch's own error at that dtype."""
    p = paged_problem(G=3, K=1, D=24, Dv=40, window=30, seed=10)
    ours, torch_err, out = half_errors(p, dtype)
    assert out.dtype == dtype and ours <= 2 * torch_err + 1e-6, (ours, torch_err)


def test_split_rule():
    from nsa_core.kernels.decode.launch import choose_num_splits, splits_used

    assert choose_num_splits(programs=1024, slot_groups=64, chunks=1, sms=132) == 1  # a full wave already
    assert choose_num_splits(programs=4, slot_groups=1, chunks=1, sms=132) == 1  # one tile group
    assert choose_num_splits(programs=4, slot_groups=64, chunks=1, sms=132) == 32  # 2 tiles per split
    assert choose_num_splits(programs=64, slot_groups=17, chunks=1, sms=132) == 4  # 256 of 264 program slots
    assert choose_num_splits(programs=4, slot_groups=8, chunks=2, sms=132) == 8  # 2 chunks: 1 group per split
    assert choose_num_splits(programs=4, slot_groups=0, chunks=1, sms=132) == 1
    # the compressed selection's rule: a wave of 4 programs per SM, at least 4 tiles per split
    wide = dict(programs_per_sm=4, min_tiles=4)
    assert choose_num_splits(programs=64, slot_groups=65, chunks=1, sms=132, **wide) == 7  # 448 of 528 slots
    assert choose_num_splits(programs=4, slot_groups=129, chunks=1, sms=132, **wide) == 26  # capped: 4+ tiles each
    assert choose_num_splits(programs=4, slot_groups=8, chunks=1, sms=132, **wide) == 2
    assert [splits_used(17, n) for n in (1, 2, 9, 16, 17, 100)] == [1, 2, 9, 9, 17, 17]


@needs_kernels
def test_opcheck_and_compile():
    from nsa_core.kernels.decode import paged_decode_attention
    from nsa_core.kernels.decode.op import _paged_decode

    p = paged_problem(G=2, K=1, S=2, window=20, seed=6)
    args = tuple(p[n] for n in ARGS) + (2, "listed", 0)
    torch.library.opcheck(_paged_decode, args, test_utils=("test_schema", "test_faketensor"))
    window_args = (*args[:4], None, None, args[6], None, args[8], 2, "window", 20)
    torch.library.opcheck(_paged_decode, window_args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(paged_decode_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*(p[n] for n in ARGS)), run_kernel(p))


def test_errors_name_the_argument(monkeypatch):
    from nsa_core.kernels.decode import paged_decode_attention

    p = paged_problem(seed=7)

    def call(**changes):
        return paged_decode_attention(*({**p, **changes}[n] for n in ARGS))

    with pytest.raises(TypeError, match="q must have dtype"):
        call(q=p["q"].double())
    with pytest.raises(TypeError, match="v_pages must have dtype"):
        call(v_pages=p["v_pages"].half())
    with pytest.raises(ValueError, match="page_size"):
        call(k_pages=p["k_pages"][:, :, :12], v_pages=p["v_pages"][:, :, :12])
    with pytest.raises(ValueError, match="blocks must be"):
        call(blocks=p["blocks"][:, :1].expand(-1, 5, -1, -1), valid=p["valid"][:, :1].expand(-1, 5, -1, -1))
    with pytest.raises(ValueError, match="valid must have"):
        call(valid=p["valid"][..., :1])
    with pytest.raises(TypeError, match="valid must have dtype"):
        call(valid=p["valid"].int())
    with pytest.raises(ValueError, match="hi must be"):
        call(hi=p["hi"][:1])
    with pytest.raises(TypeError, match="scale must be a float"):
        call(scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(*(p[n] for n in ARGS), num_splits=0)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA tensors"):
            call()


def half_errors(p, dtype=torch.bfloat16):
    """(kernel, PyTorch) errors at a 16-bit dtype against the float64 reference (max-abs error over
    max |reference|), and the kernel's output."""
    exact = run_reference(p, torch.float64)
    low = {n: t.to(dtype) if n in ("q", "k_pages", "v_pages") else t for n, t in p.items()}
    err = lambda t: ((t.double() - exact).abs().max() / exact.abs().max()).item()
    out = run_kernel(low)
    return err(out), err(run_reference(low)), out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G, per_head, D, page, S", [(16, False, 128, 64, 17), (64, False, 128, 64, 17),
                                                      (4, True, 128, 64, 64), (4, False, 256, 128, 9),
                                                      (3, False, 40, 16, 33)])
@pytest.mark.parametrize("K", [1, 3])
def test_kernel_gpu_bf16(G, per_head, D, page, S, K):
    """bf16 on CUDA within 2x PyTorch's own bf16 error of the reference; bit-equal reruns."""
    p = paged_problem(B=3, HKV=4, G=G, K=K, D=D, Dv=D, page=page, max_pages=80, S=S, per_head=per_head,
                      window=page * 5 + 7 if S == 9 else None, device="cuda", seed=G + K)
    ours, torch_err, out = half_errors(p)
    assert ours <= 2 * torch_err + 1e-6, (ours, torch_err)
    assert torch.equal(out, half_errors(p)[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_gpu_cuda_graph_replays_new_inputs():
    """Captured once, replayed with new queries and positions written in place: equals eager calls."""
    p = paged_problem(B=2, HKV=4, G=16, K=1, D=128, Dv=128, page=64, max_pages=40, S=17, dtype=torch.bfloat16,
                      device="cuda", seed=8)
    static = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in p.items()}
    run_kernel(static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_kernel(static)
    for seed in range(3):
        new = paged_problem(B=2, HKV=4, G=16, K=1, D=128, Dv=128, page=64, max_pages=40, S=17, dtype=torch.bfloat16,
                            device="cuda", seed=20 + seed)
        changed = ("q", "block_table", "blocks", "valid", "hi")
        for n in changed:
            static[n].copy_(new[n])
        graph.replay()
        want = run_kernel({**p, **{n: new[n] for n in changed}})
        assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_gpu_compile_fullgraph():
    from nsa_core.kernels.decode import paged_decode_attention

    p = paged_problem(B=2, HKV=4, G=16, K=2, D=128, Dv=128, page=64, max_pages=40, S=17, window=300,
                      dtype=torch.bfloat16, device="cuda", seed=9)

    def step(q, k_pages, v_pages, block_table, blocks, valid, hi, lo):
        return paged_decode_attention(q * 2, k_pages, v_pages, block_table, blocks, valid, hi, lo, p["scale"]) + 1

    compiled = torch.compile(step, fullgraph=True)
    args = [p[n] for n in ARGS[:-1]]
    torch.testing.assert_close(compiled(*args), step(*args), rtol=0, atol=0)
