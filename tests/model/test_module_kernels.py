"""SparseAttention on the Triton selection kernel equals its PyTorch path (interpreter on CPU)."""

import pytest
import torch

from helpers import forward_backward, randomize_, rel_err
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
    ref = randomize_(SparseAttention(backend="torch", **kwargs), std=0.2).to(DEVICE)
    ker = SparseAttention(backend="triton", **kwargs).to(DEVICE)
    ker.load_state_dict(ref.state_dict())
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
