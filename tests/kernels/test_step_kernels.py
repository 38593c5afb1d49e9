"""The small kernels of the module's kernel path equal their PyTorch twins: rotary (forward and
its inverse in backward) and the gated combine (forward, and the branch and gate gradients)."""

import pytest
import torch

from helpers import rotate
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.model.rotary import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                       reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)"),
    pytest.mark.usefixtures("poisoned_outputs"),
]


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("dim_head, dtype, atol", [(16, torch.float32, 1e-6), (15, torch.float64, 1e-12),
                                                   (24, torch.bfloat16, 2 ** -6)])  # bf16: 1 ulp at |x| < 4
@pytest.mark.parametrize("offset", [0, 300])
def test_rotary_kernel_equals_twin(dim_head, dtype, atol, offset):
    rot = RotaryEmbedding(dim_head).to(DEVICE)
    # a strided view like the module's q: (B, T, H, D) memory seen as (B, H, T, D)
    x = torch.randn(2, 37, 3, dim_head, dtype=dtype, device=DEVICE).transpose(1, 2).requires_grad_()
    want, got = rotate(rot, x, offset=offset), rotate(rot, x, offset=offset, backend="triton")
    assert got.dtype == dtype and got.shape == x.shape
    rtol = 2 ** -7 if dtype == torch.bfloat16 else 0  # 1 ulp above
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if dim_head % 2:
        assert torch.equal(got[..., -1], x[..., -1])  # the unpaired feature passes through
    g = torch.randn_like(want)
    torch.testing.assert_close(grads(got, x, g)[0], grads(want, x, g)[0], atol=atol, rtol=rtol)


def combine_twin(c, f, s, gates):
    out = torch.addcmul(c * gates[..., 0:1], f, gates[..., 1:2])
    return torch.addcmul(out, s, gates[..., 2:3]).transpose(1, 2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("N, D", [(45, 16), (7, 24)])
def test_combine_kernel_equals_twin(dtype, tol, N, D):
    from nsa_core.kernels.combine import combine_triton

    B, H = 2, 3
    gen = torch.Generator().manual_seed(N)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    c = rand(B, H, N, D).requires_grad_()
    f = rand(B, N, H, D).transpose(1, 2).requires_grad_()  # token-major like the compressed branch
    s = rand(B, H, N, D).requires_grad_()
    gates = torch.sigmoid(rand(B, N, 3 * H)).view(B, N, H, 3).transpose(1, 2).detach().requires_grad_()
    want, got = combine_twin(c, f, s, gates), combine_triton(c, f, s, gates)
    assert got.shape == (B, N, H, D) and got.dtype == dtype
    # tolerances: the twin's own rounding at this dtype (bf16 rounds the products before adding)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    g = rand(B, N, H, D)
    for a, b in zip(grads(got, (c, f, s, gates), g), grads(want, (c, f, s, gates), g)):
        torch.testing.assert_close(a.float(), b.float(), atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("shape", [(37, 16), (2, 3, 5, 37, 16)])
def test_rotary_kernel_other_ranks(shape):
    rot = RotaryEmbedding(16).to(DEVICE)
    x = torch.randn(*shape, device=DEVICE).requires_grad_()
    want, got = rotate(rot, x, offset=3), rotate(rot, x, offset=3, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    g = torch.randn_like(want)
    torch.testing.assert_close(grads(got, x, g)[0], grads(want, x, g)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 37, 24), (130, 16), (0, 8)])
def test_row_dot_kernel_equals_twin(dtype, shape):
    from nsa_core.kernels.row_dot import row_dot

    a, b = (torch.randn(shape, device=DEVICE).to(dtype) for _ in range(2))
    got = row_dot(a, b)
    want = (a.double() * b.double()).sum(-1)
    assert got.dtype == torch.float32 and got.shape == shape[:-1]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # inputs exact in float32: only the sum rounds
    torch.testing.assert_close(row_dot(a.transpose(0, -1), b.transpose(0, -1)).double(),
                               (a.double() * b.double()).transpose(0, -1).sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim_head, dtype, atol", [(16, torch.float32, 1e-5), (15, torch.float64, 1e-12),
                                                   (24, torch.bfloat16, 2 ** -6)])
def test_rotary_at_positions_kernel_equals_twin(dim_head, dtype, atol):
    """Rows at their own positions (a decoding step: (B, n) positions up to 70k, the angles computed in
    the kernel) equal the twin's per-row tables, forward and the inverse in backward."""
    from nsa_core.ops import rotary_at_positions

    rot = RotaryEmbedding(dim_head).to(DEVICE)
    gen = torch.Generator().manual_seed(dim_head)
    positions = torch.randint(0, 70000, (3, 5), generator=gen).to(DEVICE)
    x = torch.randn(3, 5, 7, dim_head, generator=gen).to(DEVICE, dtype).transpose(1, 2).requires_grad_()  # strided view
    want = rotary_at_positions(x, positions, rot.freqs, backend="torch")
    got = rotary_at_positions(x, positions, rot.freqs, backend="triton")
    assert got.dtype == dtype and got.shape == x.shape
    rtol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5 if dtype == torch.float32 else 0
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if dim_head % 2:
        assert torch.equal(got[..., -1], x[..., -1])
    g = torch.randn(want.shape, generator=gen).to(DEVICE, dtype)
    torch.testing.assert_close(grads(got, x, g)[0], grads(want, x, g)[0], atol=atol, rtol=rtol)
    # the twin is the module's rotary at each row's positions
    for b in range(3):
        cos, sin = rot.tables(positions[b], dtype)
        from nsa_core.ops import rotary
        torch.testing.assert_close(want[b], rotary(x[b], cos, sin, backend="torch"), atol=0, rtol=0)


def test_rotary_at_positions_rejects_bad_shapes():
    from nsa_core.ops import rotary_at_positions

    with pytest.raises(ValueError, match="positions \\(B, n\\)"):
        rotary_at_positions(torch.randn(2, 3, 4, 8), torch.zeros(2, 5, dtype=torch.int64), torch.ones(4))
    with pytest.raises(TypeError, match="int32 or int64 positions"):
        rotary_at_positions(torch.randn(2, 3, 4, 8), torch.zeros(2, 4), torch.ones(4))
