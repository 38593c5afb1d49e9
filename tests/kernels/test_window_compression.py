"""A decoding step's fused compression (kernels/decode/window_compression.py through
ops/window_compression.py) equals the PyTorch path: the windows the new tokens complete land in
their compressed slots (through a table that is not the identity), no other slot is written (pages
poisoned with NaN), the ring moves on by the step's tokens; ragged rows, K > 1, several windows
completed in one step, GQA groups of 3, head dims that are not powers of two, windows of 12."""

import math

import pytest
import torch

from helpers import randomize_
from nsa_core import SparseAttention
from nsa_core.kernels.decode import window_compression
from nsa_core.kernels.decode.window_compression import MLPTiles
from nsa_core.model.compress_networks import ConvLinearCompress
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.ops.window_compression import append_compressed_windows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")

CPAGE = 8


def module(D, R, stride, HKV, dtype, device=DEVICE, **kwargs):
    attn = SparseAttention(dim=32, dim_head=D, heads=2 * HKV, kv_heads=HKV, sliding_window_size=16,
                           compress_block_size=R, compress_block_sliding_stride=stride, selection_block_size=R,
                           num_selected_blocks=2, causal=True, **kwargs)
    return randomize_(attn, std=0.3).to(device, dtype)


def problem(attn, lengths, K, dtype, num_memory=1, capacity=96, seed=0, device=DEVICE):
    """Rings, the step's tokens (strided views, as branch_kv gives them), positions, the slot rule,
    NaN-poisoned compressed pages behind a permuted table."""
    cfg = attn.config
    gen = torch.Generator().manual_seed(seed)
    B, HKV, D, R, stride = len(lengths), cfg.num_kv_heads, cfg.dim_head, cfg.compress_block_size, cfg.stride
    slots = num_memory + capacity // stride + 1
    scratch = slots - 1
    pages_per_row = math.ceil(slots / CPAGE)
    pool = B * pages_per_row + 3
    table = torch.randperm(pool, generator=gen)[: B * pages_per_row].view(B, pages_per_row).int()
    ends = torch.arange(1, capacity + 1)
    slot_of = torch.where(ends % stride == 0, ends // stride + num_memory - 1, scratch)
    positions = torch.tensor(lengths)[:, None] + torch.arange(K)
    ring_k, ring_v = (torch.randn(B, HKV, R, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, K, HKV, D, generator=gen).transpose(1, 2) for _ in range(2))
    pages = torch.full((pool, HKV, CPAGE, D), float("nan"))
    t = dict(ring_k=ring_k, ring_v=ring_v, k=k, v=v, positions=positions, slot_of=slot_of, ck_pages=pages,
             cv_pages=pages.clone(), table=table)
    t = {name: x.to(device, dtype) if x.is_floating_point() else x.to(device) for name, x in t.items()}
    return t, scratch


def run(attn, t, scratch, backend):
    t = {name: x.clone() for name, x in t.items()}
    with torch.no_grad():
        append_compressed_windows(t["ring_k"], t["ring_v"], t["k"], t["v"], t["positions"], slot_of=t["slot_of"],
                                  scratch=scratch, ck_pages=t["ck_pages"], cv_pages=t["cv_pages"], table=t["table"],
                                  compress=attn.compress_windows, mlp=attn.mlp_compression(), backend=backend)
    return t


def logical_slots(pages, table):
    """pages (NP, HKV, CPAGE, D) -> (B, HKV, slots, D) through table (B, pages per row)."""
    rows = pages[table.long()]  # (B, pages, HKV, CPAGE, D)
    return rows.permute(0, 2, 1, 3, 4).flatten(2, 3)


def compare(attn, t, scratch, dtype):
    got = run(attn, t, scratch, "triton")
    want = run(attn, t, scratch, "torch")
    exact = run(attn.double(), {n: x.double() if x.is_floating_point() else x for n, x in t.items()}, scratch, "torch")
    attn.to(dtype)
    for name in ("ring_k", "ring_v"):
        assert torch.equal(got[name], want[name]), name
    for name in ("ck_pages", "cv_pages"):
        g, w, e = (logical_slots(x[name], t["table"])[:, :, :scratch] for x in (got, want, exact))
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: the kernel wrote other slots than the completed windows'"
        written = ~w.isnan()
        assert written.any()
        own_err = (w[written].double() - e[written]).abs().max().item()
        err = (g[written].double() - e[written]).abs().max().item()
        # twice the reference's own error, plus one rounding (Triton's interpreter truncates its casts)
        one_rounding = torch.finfo(dtype).eps * e[written].abs().max().item()
        assert err <= 2 * own_err + one_rounding, (name, err, own_err)
        # pages outside the table untouched
        outside = torch.ones(got[name].shape[0], dtype=torch.bool, device=got[name].device)
        outside[t["table"].long().flatten()] = False
        assert got[name][outside].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D, R, stride, lengths, K", [
    (16, 16, 8, (7, 20, 31), 1),        # row 0 completes a window, row 1 none, row 2 one
    (24, 12, 4, (3, 14, 40), 3),        # windows of 12 every 4: several rows complete one mid-step
    (16, 8, 4, (0, 9, 50), 9),          # K = 9: two or three windows completed in one step
    (20, 16, 16, (15, 16, 47), 2),      # stride = window: non-overlapping windows
])
def test_kernel_equals_pytorch_path(dtype, D, R, stride, lengths, K):
    attn = module(D, R, stride, HKV=3, dtype=dtype)
    t, scratch = problem(attn, lengths, K, dtype, seed=D + K)
    compare(attn, t, scratch, dtype)


@pytest.mark.parametrize("tiles", [MLPTiles(block_n=16, k_width=16), MLPTiles(block_n=64, k_width=64),
                                   MLPTiles(block_n=32, k_width=512, num_warps=8, num_stages=2)])
def test_every_tiling_equals_pytorch_path(tiles, monkeypatch):
    """One window token per loop step (k_width = the head dim), several, more than the window holds (the
    loop's last step masked), hidden tiles that do not divide the hidden units (D 24 x R 12 = 288)."""
    monkeypatch.setattr(window_compression, "TILES", tiles)
    attn = module(24, 12, 4, HKV=3, dtype=torch.float32)
    t, scratch = problem(attn, (3, 14, 40), 3, torch.float32, seed=5)
    compare(attn, t, scratch, torch.float32)


def test_steps_that_complete_no_window_write_only_the_ring():
    attn = module(16, 16, 8, HKV=3, dtype=torch.float32)
    t, scratch = problem(attn, (1, 10, 20), 1, torch.float32)
    got = run(attn, t, scratch, "triton")
    assert got["ck_pages"].isnan().all() and got["cv_pages"].isnan().all()
    assert torch.equal(got["ring_k"][:, :, :-1], t["ring_k"][:, :, 1:])
    assert torch.equal(got["ring_k"][:, :, -1], t["k"][:, :, 0])


def test_other_networks_and_long_chunks_take_the_pytorch_path():
    """A network other than the default MLP has no kernel tensors (mlp_compression() is None); a chunk of
    more than 16 tokens runs as one batched compression: both write every window, the scratch slot too."""
    conv = module(16, 8, 4, HKV=3, dtype=torch.float32, compress_mlp=ConvLinearCompress(3, 16, 8))
    assert conv.mlp_compression() is None
    t, scratch = problem(conv, (1, 2, 3), 2, torch.float32)
    got = run(conv, t, scratch, "triton")
    assert not logical_slots(got["ck_pages"], t["table"])[:, :, scratch].isnan().any()
    attn = module(16, 8, 4, HKV=3, dtype=torch.float32)
    t, scratch = problem(attn, (1, 2, 3), 17, torch.float32)
    got, want = run(attn, t, scratch, "triton"), run(attn, t, scratch, "torch")
    for name in ("ck_pages", "cv_pages", "ring_k"):
        assert torch.equal(got[name].nan_to_num(), want[name].nan_to_num())


def test_rejects_mismatched_inputs():
    attn = module(16, 16, 8, HKV=3, dtype=torch.float32)
    t, scratch = problem(attn, (1, 2), 1, torch.float32)
    with pytest.raises(ValueError, match="positions"):
        t2 = dict(t, positions=t["positions"][:1])
        run(attn, t2, scratch, "torch")
    with pytest.raises(TypeError, match="ring holds"):
        run(attn, dict(t, k=t["k"].double(), v=t["v"].double()), scratch, "torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("K", [1, 4])
def test_kernel_gpu_paper_layer(K):
    """The paper layer's compression (4 kv heads of 128, windows of 32 every 16, 4096 hidden units),
    bf16, 16 ragged rows, half of them completing a window; and under CUDA-graph replay."""
    attn = module(128, 32, 16, HKV=4, dtype=torch.bfloat16, device="cuda")
    lengths = tuple(16 * i + (15 if i % 2 else 3) - (K - 1) for i in range(1, 17))
    t, scratch = problem(attn, lengths, K, torch.bfloat16, capacity=512, device="cuda")
    compare(attn, t, scratch, torch.bfloat16)
    state = {n: x.clone() for n, x in t.items()}
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        append_compressed_windows(state["ring_k"], state["ring_v"], state["k"], state["v"], state["positions"],
                                  slot_of=state["slot_of"], scratch=scratch, ck_pages=state["ck_pages"],
                                  cv_pages=state["cv_pages"], table=state["table"], compress=attn.compress_windows,
                                  mlp=attn.mlp_compression(), backend="triton")
    for name in ("ring_k", "ring_v", "ck_pages", "cv_pages"):
        state[name].copy_(t[name])
    graph.replay()
    eager = run(attn, t, scratch, "triton")
    for name in ("ring_k", "ring_v", "ck_pages", "cv_pages"):
        assert torch.equal(state[name].nan_to_num(), eager[name].nan_to_num())
