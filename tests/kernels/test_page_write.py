"""The decode step's page writes (kernels/decode/page_write.py) equal their twin: keys (rotated at
their positions, or as given) and values land in the slots the block table names, and nothing else
in the pages changes; the page means of the pages written to are refreshed, no other mean."""

import pytest
import torch

from nsa_core.model.rotary import RotaryEmbedding
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.ops.page_write import refresh_page_means, write_pages

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")


def case(dtype, D, Dv, K, seed, page=8, B=3, HKV=3, pages_per_row=5):
    gen = torch.Generator().manual_seed(seed)
    pool = B * pages_per_row + 2
    table = torch.randperm(pool, generator=gen)[: B * pages_per_row].view(B, pages_per_row).int()  # not the identity
    # K distinct positions per row within its pages
    positions = torch.stack([torch.randperm(page * pages_per_row, generator=gen)[:K] for _ in range(B)])
    k = torch.randn(B, K, HKV, D, generator=gen).to(dtype).transpose(1, 2)  # a projection's strided view
    v = torch.randn(B, HKV, K, Dv, generator=gen).to(dtype)
    k_pages = torch.randn(pool, HKV, page, D, generator=gen).to(dtype)
    v_pages = torch.randn(pool, HKV, page, Dv, generator=gen).to(dtype)
    return [t.to(DEVICE) for t in (k_pages, v_pages, table, positions, k, v)]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2 ** -6)])
@pytest.mark.parametrize("D, Dv, K", [(16, 16, 1), (15, 6, 3), (24, 40, 2)])
@pytest.mark.parametrize("rotate", [True, False])
def test_page_write_kernel_equals_twin(dtype, atol, D, Dv, K, rotate):
    k_pages, v_pages, table, positions, k, v = case(dtype, D, Dv, K, seed=D * 10 + K)
    freqs = RotaryEmbedding(D).freqs.to(DEVICE) if rotate else None
    want_k, want_v, got_k, got_v = k_pages.clone(), v_pages.clone(), k_pages.clone(), v_pages.clone()
    write_pages(want_k, want_v, table, positions, k, v, rotary_freqs=freqs, backend="torch")
    write_pages(got_k, got_v, table, positions, k, v, rotary_freqs=freqs, backend="triton")
    assert torch.equal(got_v, want_v)
    if rotate:
        rtol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5 if dtype == torch.float32 else 0
        torch.testing.assert_close(got_k, want_k, atol=atol, rtol=rtol)
    else:
        assert torch.equal(got_k, want_k)
    # the written slots changed, every other slot kept its value
    written = torch.zeros(k_pages.shape[0], k_pages.shape[2], dtype=torch.bool, device=DEVICE)
    written[table.long().gather(1, positions // k_pages.shape[2]), positions % k_pages.shape[2]] = True
    for got, before in ((got_k, k_pages), (got_v, v_pages)):  # slots first: (pages, PAGE, HKV, D)
        assert torch.equal(got.transpose(1, 2)[~written], before.transpose(1, 2)[~written])
    page, slot = table[0, positions[0, 0] // k_pages.shape[2]].item(), positions[0, 0].item() % k_pages.shape[2]
    assert torch.equal(got_v[page, :, slot], v[0, :, 0])


def test_write_pages_rejects_bad_inputs():
    k_pages, v_pages, table, positions, k, v = case(torch.float32, 16, 16, 2, seed=0)
    with pytest.raises(ValueError, match="positions \\(B, K\\)"):
        write_pages(k_pages, v_pages, table, positions[:, :1], k, v)
    with pytest.raises(TypeError, match="as the pages hold them"):
        write_pages(k_pages, v_pages, table, positions, k.double(), v)
    with pytest.raises(TypeError, match="int32 or int64 positions"):
        write_pages(k_pages, v_pages, table, positions.float(), k, v)
    with pytest.raises(ValueError, match="rotary_freqs must be"):
        write_pages(k_pages, v_pages, table, positions, k, v, rotary_freqs=torch.ones(9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page, D, K, starts", [(8, 16, 1, (0, 7, 30)), (8, 24, 5, (3, 8, 14)), (16, 20, 19, (0, 13, 40))])
def test_page_means_kernel_equals_twin(dtype, page, D, K, starts):
    """Consecutive positions per row (a step of K tokens, or a prompt): every page they reach gets its mean
    key, pages of other rows and untouched pages keep their (NaN) means; a table that is not the identity."""
    gen = torch.Generator().manual_seed(page + D + K)
    B, HKV, pages_per_row = len(starts), 3, 5
    pool = B * pages_per_row + 2
    table = torch.randperm(pool, generator=gen)[: B * pages_per_row].view(B, pages_per_row).int().to(DEVICE)
    positions = (torch.tensor(starts)[:, None] + torch.arange(K)).to(DEVICE)
    k_pages = torch.randn(pool, HKV, page, D, generator=gen).to(dtype).to(DEVICE)
    poisoned = torch.full((pool, HKV, D), float("nan"), dtype=dtype, device=DEVICE)
    want, got = poisoned.clone(), poisoned.clone()
    refresh_page_means(want, k_pages, table, positions, backend="torch")
    refresh_page_means(got, k_pages, table, positions, backend="triton")
    assert torch.equal(got.isnan(), want.isnan())
    touched = table.long().gather(1, positions // page).unique()
    assert (~want.isnan().any(-1).any(-1)).nonzero().flatten().tolist() == touched.sort().values.tolist()
    exact = k_pages.double().mean(dim=2)[touched]
    own = (want[touched].double() - exact).abs().max().item()
    eps = torch.finfo(dtype).eps * exact.abs().max().item()  # one rounding (the interpreter truncates)
    assert (got[touched].double() - exact).abs().max().item() <= 2 * own + eps


def test_page_means_reject_bad_inputs():
    k_pages, _, table, positions, _, _ = case(torch.float32, 16, 16, 2, seed=0)
    means = torch.zeros(k_pages.shape[0], k_pages.shape[1], 16, device=DEVICE)
    with pytest.raises(ValueError, match="means \\(NP, HKV, D\\)"):
        refresh_page_means(means[:, :, :8], k_pages, table, positions)
    with pytest.raises(TypeError, match="pages' dtype"):
        refresh_page_means(means.double(), k_pages, table, positions)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("K", [1, 4])
def test_page_means_kernel_gpu_paper_layer(K):
    """Pages of 64 keys, 4 kv heads of 128, bf16, 16 rows at ragged positions (some at a page's end)."""
    gen = torch.Generator().manual_seed(K)
    B, HKV, page, D, pages_per_row = 16, 4, 64, 128, 8
    table = torch.randperm(B * pages_per_row, generator=gen).view(B, pages_per_row).int().cuda()
    positions = (torch.arange(B)[:, None] * 29 + 60 + torch.arange(K)).cuda()
    k_pages = torch.randn(B * pages_per_row, HKV, page, D, generator=gen).bfloat16().cuda()
    want = torch.full((B * pages_per_row, HKV, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    got = want.clone()
    refresh_page_means(want, k_pages, table, positions, backend="torch")
    refresh_page_means(got, k_pages, table, positions, backend="triton")
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=2 ** -8, rtol=2 ** -7)
