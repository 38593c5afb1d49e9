"""The fast paged decode attention (reference/fast_decode.py) against the reference it is the twin
of (reference/paged_decode.py): random pools with a permuted block table and garbage entries, GQA
groups 1 and 3, lists per kv head and per query head, windows, several new tokens; non-finite
values in listed-but-masked keys (must not reach the row), in allowed keys (NaN rows), in unlisted
pages; and the op's PyTorch side runs it."""

import importlib

import pytest
import torch

from nsa_core.ops.decode_attention import decode_attention
from nsa_core.reference.fast_decode import paged_decode_fast
from nsa_core.reference.paged_decode import paged_decode_reference


def problem(B=2, HKV=2, G=3, K=1, D=8, Dv=6, page=4, max_pages=7, S=3, per_head=False, window=None, seed=0,
            dtype=torch.float64):
    """paged_decode_reference's arguments: sequences of random lengths ending at the K new tokens,
    lists of S distinct pages (a quarter of the slots invalid, with ids in range or not)."""
    gen = torch.Generator().manual_seed(seed)
    HI = HKV * G if per_head else HKV
    P = B * max_pages + 2
    table = torch.randperm(P, generator=gen)[: B * max_pages].view(B, max_pages)
    lengths = torch.randint(max(K, (max_pages - 2) * page + 1), max_pages * page + 1, (B,), generator=gen)
    table = torch.where(torch.arange(max_pages) * page >= lengths[:, None], -1, table).to(torch.int32)
    hi = lengths[:, None] - K + torch.arange(K)
    pages = torch.rand(B, HI, K, max_pages, generator=gen).argsort(-1)[..., :S]
    valid = torch.rand(B, HI, K, S, generator=gen) > 0.25
    blocks = torch.where(valid, pages, torch.randint(-2, 2 * max_pages, (B, HI, K, S), generator=gen))
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return dict(q=make(B, HKV * G, K, D), k_pages=make(P, HKV, page, D), v_pages=make(P, HKV, page, Dv),
                block_table=table, blocks=blocks, valid=valid, hi=hi, lo=None if window is None else hi - window,
                scale=D ** -0.5)


def both(p):
    return paged_decode_fast(**p), paged_decode_reference(**p)


@pytest.mark.parametrize("case", [dict(), dict(G=1), dict(K=3, window=9), dict(per_head=True, K=2, S=5),
                                  dict(HKV=1, G=3, S=1, dtype=torch.float32)])
def test_fast_decode_equals_reference(case):
    got, want = both(problem(**case))
    torch.testing.assert_close(got, want, rtol=1e-12 if got.dtype == torch.float64 else 1e-6, atol=1e-12)


def test_non_finite_values():
    """A NaN value of a listed key past hi (weight 0) leaves the row as the reference leaves it; a
    NaN value of an allowed key makes the row NaN; an inf in an unlisted page changes nothing."""
    p = problem(B=1, HKV=1, G=3, K=1, S=2, max_pages=6)
    page = p["k_pages"].shape[2]
    p["blocks"][:] = torch.tensor([0, 1])
    p["valid"][:] = True
    p["hi"][:] = page + 1  # keys 0 ... page + 1: the second page's last keys are masked
    clean = paged_decode_reference(**p)
    second = int(p["block_table"][0, 1])
    p["v_pages"][second, 0, page - 1] = float("nan")  # masked
    spare = sorted(set(range(p["v_pages"].shape[0])) - set(p["block_table"].flatten().tolist()))[0]
    p["v_pages"][spare, 0, 0] = float("inf")  # a physical page no table entry names
    got, want = both(p)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, clean, rtol=1e-12, atol=1e-12)
    p["v_pages"][second, 0, 0] = float("nan")  # allowed
    got, want = both(p)
    assert torch.isnan(got).all() and torch.isnan(want).all()


def test_no_slots_give_zeros():
    p = problem()
    p["blocks"], p["valid"] = p["blocks"][..., :0], p["valid"][..., :0]
    got, want = both(p)
    assert torch.equal(got, want) and not got.any()


def test_the_ops_pytorch_side_runs_the_fast_decode(monkeypatch):
    fast = importlib.import_module("nsa_core.reference.fast_decode")
    calls = []
    original = fast.paged_decode_fast
    monkeypatch.setattr(fast, "paged_decode_fast", lambda *a, **k: calls.append(1) or original(*a, **k))
    p = problem()
    scale = p.pop("scale")
    got = decode_attention(*p.values(), scale=scale, backend="torch")
    torch.testing.assert_close(got, paged_decode_reference(*p.values(), scale), rtol=1e-12, atol=1e-12)
    assert calls == [1]
