"""The fused selected + window branches with the gated combine of a decoding step
(kernels/decode/fine_window.py, op ops/selected_window_combine.py) against its twin: decode_attention
for each branch (the PyTorch path) then combine. Random pools behind a permuted table, ragged rows,
G not a power of two, per-head lists, several tokens per row, forced splits, NaN-poisoned outputs
and partials; bf16 with the twin's own error as the tolerance; the whole module's decoding step on
the kernels equals the PyTorch path; the calls the op leaves to the branch ops."""

from __future__ import annotations

import pytest
import torch

from helpers import KERNEL_DEVICE, needs_kernels
from nsa_core.ops.combine_gates import CombineGates
from nsa_core.ops.decode_attention import decode_attention
from nsa_core.ops.paged import Pages
from nsa_core.ops.selected_window_combine import selected_window_combine_step
from nsa_core.reference.combine import combine_reference
from nsa_core.selection import Selection
from nsa_core.seqs import Seqs
from test_paged_decode_kernel import paged_problem

CASES = {  # name: paged_problem arguments, window
    "g3_k1": (dict(G=3, K=1), 21),
    "g3_k3_page32": (dict(G=3, K=3, page=32, max_pages=4, D=24, Dv=16), 40),
    "per_head_g5": (dict(HKV=1, G=5, K=2, per_head=True), 17),
    "nothing_listed": (dict(G=2, K=2, S=0), 30),
    "window_wider_than_rows": (dict(G=2, K=1, max_pages=3), 100),
}


def problem(case, dtype=torch.float32, seed=5):
    return problem_of(*CASES[case], dtype=dtype, seed=seed)


def problem_of(args, window, dtype=torch.float32, seed=5):
    """The op's arguments over paged_problem(**args)'s pools, with a window pool of its own."""
    p = paged_problem(**args, dtype=dtype, device=KERNEL_DEVICE, seed=seed)
    own = (p["hi"] // p["k_pages"].shape[2])[:, None, :, None]
    p["valid"] = p["valid"] & (p["blocks"] != own)  # a selection never lists the own block
    gen = torch.Generator().manual_seed(seed + 1)
    B, HQ, K, _ = p["q"].shape
    Dv = p["v_pages"].shape[-1]
    cast = lambda t: t.to(device=KERNEL_DEVICE, dtype=dtype)
    win_k, win_v = cast(torch.randn(p["k_pages"].shape, generator=gen)), cast(torch.randn(p["v_pages"].shape, generator=gen))
    compressed = cast(torch.randn(B, HQ, K, Dv + 3, generator=gen))[..., 1 : Dv + 1]  # a strided view
    gates = cast(torch.rand(B, HQ, K * 3, generator=gen)).view(B, HQ, 3, K).transpose(-1, -2)  # a strided view
    table = p["block_table"]
    seqs = Seqs.step(p["hi"][:, 0], K, table.shape[1] * p["k_pages"].shape[2])
    selection = Selection(p["blocks"], p["valid"], torch.zeros_like(p["blocks"], dtype=dtype), None)
    return dict(q=p["q"], k=Pages(p["k_pages"], table), v=Pages(p["v_pages"], table), window_k=Pages(win_k, table),
                window_v=Pages(win_v, table), selection=selection, compressed=compressed, gates=gates,
                block_size=p["k_pages"].shape[2], window=window, scale=p["scale"], seqs=seqs)


def twin(a, backend="torch"):
    """The branch ops' path: each branch through decode_attention, then the combine."""
    hi = a["seqs"].query_positions(a["q"].device)
    fine = decode_attention(a["q"], a["k"].pool, a["v"].pool, a["k"].table, a["selection"].indices,
                            a["selection"].valid, hi, scale=a["scale"], backend=backend, lists="listed_and_own")
    sliding = decode_attention(a["q"], a["window_k"].pool, a["window_v"].pool, a["k"].table, None, None, hi,
                               scale=a["scale"], backend=backend, lists="window", window=a["window"])
    return combine_reference(a["compressed"], fine, sliding, a["gates"])


@needs_kernels
@pytest.mark.parametrize("tile", [64, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_the_branch_ops(case, tile, poisoned_outputs, monkeypatch):
    """Default tiles, and 16-key tiles with the split rule forced to split (several partials per
    branch, a different count for each)."""
    from nsa_core.kernels.decode import launch

    if tile != 64:
        monkeypatch.setattr(launch, "KEYS_PER_TILE", tile)
        monkeypatch.setattr(launch, "choose_num_splits", lambda programs, groups, chunks, sms: groups)
    a = problem(case)
    got = selected_window_combine_step(**a, backend="triton")
    want = twin(a)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def linear_gates(a, dim=37, bias=True, seed=3):
    """A gate layer's input (B, K, dim) as a strided view, weight (3 HQ, dim) and bias, in q's dtype."""
    gen = torch.Generator().manual_seed(seed)
    B, HQ, K, _ = a["q"].shape
    cast = lambda t: t.to(device=KERNEL_DEVICE, dtype=a["q"].dtype)
    x = cast(torch.randn(B, K, dim + 2, generator=gen))[..., 1 : dim + 1]
    w = cast(torch.randn(3 * HQ, dim, generator=gen) * dim ** -0.5)
    b = cast(torch.randn(3 * HQ, generator=gen)) if bias else None
    return x, w, b


def gate_network(w, b):
    """The module's default gate network (nn.Linear, nn.Sigmoid, the head split) with these weights."""
    from einops.layers.torch import Rearrange

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(w.device, w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        if b is not None:
            linear.bias.copy_(b)
    return torch.nn.Sequential(linear, torch.nn.Sigmoid(), Rearrange("b n (h s) -> b h n s", s=3))


@needs_kernels
@pytest.mark.parametrize("case, dim, bias", [("g3_k1", 37, True), ("per_head_g5", 600, False),
                                             ("g3_k3_page32", 1030, True)])
def test_gates_computed_in_the_combine_launch_equal_the_network(case, dim, bias, poisoned_outputs):
    """CombineGates with the linear layer: the combine launch's own gates (inputs of 37, 600 and 1030: one, two
    and three loop steps of 512) equal the network's gates through the same launch and through the twin."""
    a = problem(case)
    x, w, b = linear_gates(a, dim=dim, bias=bias)
    network = gate_network(w, b)
    got = selected_window_combine_step(**{**a, "gates": CombineGates(x, network, w, b)}, backend="triton")
    with torch.no_grad():
        gates = network(x)
    torch.testing.assert_close(got, selected_window_combine_step(**{**a, "gates": gates}, backend="triton"),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, twin({**a, "gates": gates}), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    KERNEL_DEVICE == "cpu", reason="Triton's interpreter multiplies bfloat16 bit patterns in tl.dot"))])
def test_gates_computed_in_the_combine_launch_half_precision(dtype, poisoned_outputs):
    """16-bit gate layers: the launch rounds the logits and the sigmoid to the dtype as nn.Linear and
    torch.sigmoid do; within one rounding of a gate (times the branches' outputs) of the network's gates."""
    a = problem("g3_k3_page32", dtype=dtype)
    x, w, b = linear_gates(a, dim=300)
    network = gate_network(w, b)
    got = selected_window_combine_step(**{**a, "gates": CombineGates(x, network, w, b)}, backend="triton")
    with torch.no_grad():
        want = selected_window_combine_step(**{**a, "gates": network(x)}, backend="triton")
    assert got.dtype == dtype
    scale = want.abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 4 * torch.finfo(dtype).eps * scale


@needs_kernels
def test_gates_without_a_linear_layer_come_from_the_network():
    """No weight (another network), or a gradient through the weight: the network computes the gates."""
    a = problem("g3_k1")
    x, w, b = linear_gates(a)
    calls = []
    network = gate_network(w, b)
    counted = lambda t: calls.append(1) or network(t)
    got = selected_window_combine_step(**{**a, "gates": CombineGates(x, counted)}, backend="triton")
    assert calls == [1]
    with torch.no_grad():
        want = twin({**a, "gates": network(x)})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w_grad = w.clone().requires_grad_(True)
    with torch.enable_grad():
        selected_window_combine_step(**{**a, "gates": CombineGates(x, counted, w_grad, b)}, backend="triton")
    assert calls == [1, 1]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    KERNEL_DEVICE == "cpu", reason="Triton's interpreter multiplies bfloat16 bit patterns in tl.dot"))])
def test_fused_half_precision_within_the_twins_own_error(dtype, poisoned_outputs):
    """16-bit inputs: the output in that dtype, within 2x the twin's own error against float64."""
    a = problem("g3_k3_page32", dtype=dtype)
    exact = twin({n: (t.double() if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t)
                  for n, t in _upcast(a).items()})
    got = selected_window_combine_step(**a, backend="triton")
    assert got.dtype == dtype
    got = got.double()
    own = (twin(a).double() - exact).norm() / exact.norm()
    assert (got - exact).norm() / exact.norm() <= 2 * own + 1e-3


def _upcast(a):
    up = dict(a)
    for name in ("k", "v", "window_k", "window_v"):
        up[name] = Pages(a[name].pool.double(), a[name].table)
    for name in ("q", "compressed", "gates"):
        up[name] = a[name].double()
    return up


def test_other_calls_go_to_the_branch_ops():
    a = problem("g3_k1")
    assert selected_window_combine_step(**a, backend="torch") is None  # the PyTorch path: the branch ops
    tensors = {**a, "k": a["k"].pool, "v": a["v"].pool, "window_k": a["window_k"].pool, "window_v": a["window_v"].pool,
               "seqs": Seqs.batch(a["q"].shape[2])}
    assert selected_window_combine_step(**tensors) is None  # not a decoding step over pages
    gated = {**a, "selection": Selection(a["selection"].indices, a["selection"].valid, a["selection"].probs,
                                         torch.ones_like(a["selection"].probs))}
    assert selected_window_combine_step(**gated, backend="triton") is None  # selection gates: the branch ops' error
    other_table = {**a, "window_k": Pages(a["window_k"].pool, a["k"].table.clone())}
    assert selected_window_combine_step(**other_table, backend="triton") is None  # two tables: the branch ops
    with pytest.raises(ValueError, match="compressed must be"):
        selected_window_combine_step(**{**a, "compressed": a["compressed"][..., :-1]}, backend="triton")


@needs_kernels
@pytest.mark.parametrize("independent_kv", [False, True])
def test_module_decoding_on_the_fused_step_equals_the_pytorch_path(independent_kv, monkeypatch):
    """A module's prefill then steps of 1 and 3 tokens on the kernels (the fused step among them) equals
    the same module on the PyTorch path; the fused op runs on every step."""
    from helpers import randomize_
    from nsa_core import SparseAttention

    from nsa_core.kernels.decode import fine_window

    calls = []

    real = fine_window.fine_window_fwd
    monkeypatch.setattr(fine_window, "fine_window_fwd", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    kwargs = dict(dim=32, dim_head=16, heads=6, kv_heads=2, sliding_window_size=20, compress_block_size=16,
                  compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=2, causal=True,
                  independent_kv=independent_kv)
    ref = randomize_(SparseAttention(**kwargs, backend="torch"), std=0.3, seed=1).to(KERNEL_DEVICE)
    ker = randomize_(SparseAttention(**kwargs, backend="triton"), std=0.3, seed=1).to(KERNEL_DEVICE)
    x = torch.randn(3, 45, 32, device=KERNEL_DEVICE)
    outs = []
    for mod in (ref, ker):
        cache = mod.new_cache(3, 64)
        with torch.no_grad():
            outs.append(torch.cat([mod(x[:, :41], cache=cache), mod(x[:, 41:42], cache=cache),
                                   mod(x[:, 42:45], cache=cache)], dim=1))
    assert len(calls) == 2  # the two steps; the prefill ran the branch ops
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@needs_kernels
def test_a_hook_on_the_gates_sees_every_decoding_step():
    """A forward hook on the gate network (probes read the gates that way): the step's combine launch then
    takes the network's gates instead of computing its own, and the output is the same."""
    from helpers import randomize_
    from nsa_core import SparseAttention

    kwargs = dict(dim=32, dim_head=16, heads=6, kv_heads=2, sliding_window_size=20, compress_block_size=16,
                  compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=2, causal=True,
                  backend="triton")
    attn = randomize_(SparseAttention(**kwargs), std=0.3, seed=2).to(KERNEL_DEVICE)
    x = torch.randn(2, 42, 32, device=KERNEL_DEVICE)
    outs, seen = [], []
    for hooked in (False, True):
        handle = attn.to_strategy_combine.register_forward_hook(lambda m, i, o: seen.append(o.shape)) if hooked else None
        cache = attn.new_cache(2, 64)
        with torch.no_grad():
            outs.append(torch.cat([attn(x[:, :41], cache=cache), attn(x[:, 41:42], cache=cache)], dim=1))
        if handle is not None:
            handle.remove()
    assert seen == [(2, 6, 41, 3), (2, 6, 1, 3)]  # the prefill and the step
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("per_head", [False, True])
def test_fused_gpu_paper_layer_bf16(per_head):
    """The paper layer's step (64 q / 4 kv heads of 128, pages of 64, window 512, 16 rows) in bf16."""
    a = problem_of(dict(B=16, HKV=4, G=16, K=1, D=128, Dv=128, page=64, max_pages=40, S=15, per_head=per_head), 512,
                   dtype=torch.bfloat16)
    got = selected_window_combine_step(**a, backend="triton").float()
    want = twin(a, backend="triton").float()
    assert (got - want).norm() / want.norm() < 1e-2
    x, w, b = linear_gates(a, dim=2048)  # the gates in the combine launch, the paper layer's dim
    network = gate_network(w, b)
    got = selected_window_combine_step(**{**a, "gates": CombineGates(x, network, w, b)}, backend="triton").float()
    with torch.no_grad():
        want = twin({**a, "gates": network(x)}, backend="triton").float()
    assert (got - want).norm() / want.norm() < 1e-2


@needs_kernels
def test_opcheck():
    from nsa_core.kernels.decode.fine_window import _fine_window_op

    a = problem("g3_k3_page32")
    args = (a["q"], a["k"].pool, a["v"].pool, a["window_k"].pool, a["window_v"].pool, a["k"].table,
            a["selection"].indices, a["selection"].valid, a["seqs"].query_positions(a["q"].device), a["compressed"],
            a["gates"], None, None, None, float(a["scale"]), a["window"])
    torch.library.opcheck(_fine_window_op, args, test_utils=("test_schema", "test_faketensor"))
    x, w, b = linear_gates(a)
    args = args[:10] + (None, x, w, b) + args[14:]
    torch.library.opcheck(_fine_window_op, args, test_utils=("test_schema", "test_faketensor"))
