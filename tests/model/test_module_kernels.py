"""SparseAttention on the Triton selection kernel equals its PyTorch path (interpreter on CPU)."""

import pytest
import torch

from helpers import forward_backward, randomize_, reference_and_kernel_modules, rel_err
from nsa_core import SparseAttention
from nsa_core.ops.dispatch import kernel_unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("share, diff", [(True, False), (False, True)])
def test_module_triton_equals_torch(causal, share, diff):
    kwargs = dict(dim=32, dim_head=16, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=16,
                  compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=2, causal=causal,
                  query_heads_share_selected_kv=share, use_diff_topk=diff)
    ref, ker = reference_and_kernel_modules(0.2, DEVICE, **kwargs)
    x = torch.randn(2, 53, 32, device=DEVICE)
    g = torch.randn_like(x)  # the output has the input's shape
    out_r, xr_grad, grads_r = forward_backward(ref, x, g)
    out_k, xk_grad, grads_k = forward_backward(ker, x, g)
    assert rel_err(out_k, out_r) < 1e-5
    assert rel_err(xk_grad, xr_grad) < 1e-4
    for name, grad in grads_r.items():
        if grad is not None and grad.abs().max() > 0:
            assert rel_err(grads_k[name], grad) < 1e-4, name


def test_triton_backend_raises_where_kernels_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("kernels can run here")
    attn = SparseAttention(dim=32, dim_head=16, heads=2, sliding_window_size=2, compress_block_size=16,
                           selection_block_size=16, num_selected_blocks=1, causal=True, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        attn(torch.randn(1, 40, 32))


@pytest.mark.parametrize("layout, world, rank", [("contiguous", 3, 2), ("balanced", 3, 1)])
def test_shard_triton_equals_torch(layout, world, rank):
    """A sequence-parallel shard on the kernels (every branch takes the offset) equals its PyTorch
    path: output and gradients of the shard, of the other ranks' halo, compressed tokens, keys and
    values (the stand-in's leaves), and of the parameters. Contiguous: the last of 3 (offset 36); balanced: rank 1 of 3, chunks 1 and 4 (offsets
    9 and 36, not multiples of any block), attend once per chunk on slices of q; batch 2."""
    from nsa_core.model.sequence_parallel import StandInGather, shard_forward, shard_plan

    kwargs = dict(dim=32, dim_head=16, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=16,
                  compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=2, causal=True)
    ref, ker = reference_and_kernel_modules(0.2, DEVICE, **kwargs)
    n = 54
    plan = shard_plan(ref, n, world, rank, layout)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, n // world, 32, generator=gen).to(DEVICE)
    grad = torch.randn(x.shape, generator=gen).to(DEVICE)

    def run(module):
        others = torch.Generator().manual_seed(1)  # the same other ranks' rows in both runs
        gather = StandInGather(plan, lambda shape: torch.randn(shape, generator=others).to(DEVICE).requires_grad_())
        xs = x.clone().requires_grad_()
        out = shard_forward(module, xs, plan, gather)
        out.backward(grad)
        grads = {name: p.grad for name, p in module.named_parameters()}
        module.zero_grad(set_to_none=True)
        kv = torch.cat([(torch.zeros_like(t) if t.grad is None else t.grad).flatten() for t in gather.leaves])
        return out.detach(), xs.grad, kv, grads

    out_r, x_r, kv_r, grads_r = run(ref)
    out_k, x_k, kv_k, grads_k = run(ker)
    assert rel_err(out_k, out_r) < 1e-5
    assert rel_err(x_k, x_r) < 1e-4 and rel_err(kv_k, kv_r) < 1e-4
    for name, grad in grads_r.items():
        if grad is not None and grad.abs().max() > 0:
            assert rel_err(grads_k[name], grad) < 1e-4, name


def test_module_compiles_fullgraph_on_the_kernels():
    """torch.compile(fullgraph=True) traces the whole module with the kernels' custom ops (no graph
    break: no host sync, no data-dependent Python), forward and backward equal to eager."""
    kwargs = dict(dim=32, dim_head=16, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=16,
                  compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=2)
    attn = randomize_(SparseAttention(backend="triton", **kwargs), std=0.2).to(DEVICE)
    x = torch.randn(1, 53, 32, device=DEVICE)
    g = torch.randn_like(x)
    out_e, x_grad_e, grads_e = forward_backward(attn, x, g)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    out_c, x_grad_c, grads_c = forward_backward(compiled, x, g)
    torch._dynamo.reset()
    grads_c = {name.removeprefix("_orig_mod."): grad for name, grad in grads_c.items()}
    assert torch.equal(out_c, out_e)
    assert torch.equal(x_grad_c, x_grad_e)
    for name, grad in grads_e.items():
        assert (grad is None) == (grads_c[name] is None) and (grad is None or torch.equal(grads_c[name], grad)), name
