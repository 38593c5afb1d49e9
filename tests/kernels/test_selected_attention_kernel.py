"""The Triton selected-attention kernels against the reference.

On CPU they run through TRITON_INTERPRET=1 (set in conftest.py) at small shapes; tests marked
gpu run on CUDA at real sizes. Errors are measured against a float64 reference, and the kernel's
must stay within a small multiple of PyTorch's own error at the same dtype."""

import pytest
import torch

from kernel_cases import check_against_reference, offset_problem, random_problem, run
from nsa_core import selected_attention
from nsa_core.ops.dispatch import kernel_unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")


@pytest.fixture(params=["by_query", "by_block", "by_block_atomic", "by_tile"])
def scheme(request, monkeypatch):
    """Run the test under each kernel scheme: by query; by block, with the backward's dq summed
    from partials (deterministic) or added atomically (by_block_atomic); the forward by tile (the
    backward then by query)."""
    from nsa_core.kernels.selected_attention import launch

    name = request.param.removesuffix("_atomic")
    monkeypatch.setattr(launch, "choose_scheme", lambda *args, **kwargs: name)
    monkeypatch.setattr(launch, "deterministic", lambda: not request.param.endswith("_atomic"))
    return request.param


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("G", [1, 3, 4, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_reference(scheme, G, causal, poisoned_outputs):
    problem = random_problem(G=G, HKV=2 if G < 16 else 1, T=37, causal=causal, with_gates=G in (3, 16), seed=G, device=DEVICE)
    check_against_reference(problem, torch.float32, factor=4)


@pytest.mark.parametrize("G", [1, 3])
def test_kernel_per_head_selection(scheme, G, poisoned_outputs):
    problem = random_problem(G=G, T=29, per_head=True, with_gates=True, seed=10 + G, device=DEVICE)
    check_against_reference(problem, torch.float32, factor=4)


@pytest.mark.parametrize("block, D, Dv", [(32, 24, 40), (8, 16, 16), (48, 64, 32)])
def test_kernel_block_and_head_dims(scheme, block, D, Dv, poisoned_outputs):
    """Block sizes that are not powers of two or below 16, head dims that are not powers of two."""
    problem = random_problem(G=2, T=70, D=D, Dv=Dv, block=block, S=2, seed=block, device=DEVICE)
    check_against_reference(problem, torch.float32, factor=4)


@pytest.mark.parametrize("block, sub", [(48, 16), (64, 32)])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_split_blocks(scheme, block, sub, causal, monkeypatch, poisoned_outputs):
    """Blocks whose key tile does not fit shared memory run as sub-blocks (split_blocks.py): each
    slot becomes block / sub slots with its gate, the own block's earlier sub-blocks extra slots."""
    from nsa_core.kernels.selected_attention import tiles

    monkeypatch.setattr(tiles, "kernel_block", lambda D, DV, block_size, dtype: sub)
    problem = random_problem(G=3, HKV=1, T=131, block=block, S=2, causal=causal, with_gates=True, seed=block, device=DEVICE)
    check_against_reference(problem, torch.float32, factor=4)


def test_kernel_split_blocks_with_query_offset(monkeypatch, poisoned_outputs):
    """Sub-blocks of a shard: the own block's earlier sub-blocks are counted from the key position."""
    from nsa_core.kernels.selected_attention import tiles

    monkeypatch.setattr(tiles, "kernel_block", lambda D, DV, block_size, dtype: 16)
    problem = offset_problem(T=101, q_offset=53, q_len=29, G=3, block=32, S=2, with_gates=True, seed=5, device=DEVICE)
    check_against_reference(problem, torch.float32, factor=4)


def test_kernel_short_sequences(scheme, poisoned_outputs):
    for T in (1, 2, 17):
        problem = random_problem(G=2, T=T, S=2, seed=T, device=DEVICE)
        check_against_reference(problem, torch.float32, factor=4)


# queries after other keys: (keys, first query, queries) and the rest of the problem
OFFSET_CASES = {
    "shard": dict(T=35, q_offset=19, q_len=16, G=3, with_gates=True),  # the offset cuts a block of 16
    "keys_after": dict(T=45, q_offset=21, q_len=9, G=2, per_head=True, causal=False, window=7),
    "group16_window": dict(T=37, q_offset=33, q_len=4, G=16, HKV=1, window=6, block=8, S=2),
    "decode_step": dict(T=37, q_offset=36, q_len=1, G=3, S=2),  # one query after 36 cached keys
}


@pytest.mark.parametrize("scheme, case", [
    *((scheme, "shard") for scheme in ("by_query", "by_block", "by_block_atomic")),
    ("by_query", "keys_after"), ("by_block", "keys_after"), ("by_query", "group16_window"),
    ("by_block_atomic", "group16_window"), ("by_query", "decode_step"), ("by_block", "decode_step"),
], indirect=["scheme"])
def test_kernel_query_offset(scheme, case, poisoned_outputs):
    """Query i at key position q_offset + i (causal limit, window, own block); dK / dV over every key."""
    problem = offset_problem(seed=len(case), device=DEVICE, **OFFSET_CASES[case])
    check_against_reference(problem, torch.float32, factor=4)


def test_kernel_query_without_keys_is_zero(scheme, poisoned_outputs):
    problem = random_problem(G=2, T=20, causal=False, seed=3, device=DEVICE)
    problem["valid"] = torch.zeros_like(problem["valid"])
    out = run(problem, "triton")[0]
    assert torch.equal(out, torch.zeros_like(out))


def test_kernel_is_deterministic(scheme):
    if scheme.endswith("_atomic") and DEVICE == "cuda":
        pytest.skip("atomic dq: the order of additions varies between runs on a GPU")
    problem = random_problem(G=3, T=45, with_gates=True, seed=7, device=DEVICE)
    first = run(problem, "triton")
    for _ in range(2):
        again = run(problem, "triton")
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_opcheck():
    from nsa_core.kernels.selected_attention.autograd import _fwd

    p = random_problem(G=2, T=20, S=2, with_gates=True, seed=5, device=DEVICE)
    idx = torch.where(p["valid"], p["indices"], -1).to(torch.int32)
    args = (p["q"].requires_grad_(), p["k"].requires_grad_(), p["v"].requires_grad_(), idx, p["gates"].requires_grad_(), 16, True, 0.25, 0)
    torch.library.opcheck(_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_fullgraph():
    p = random_problem(G=2, T=20, S=2, seed=6, device=DEVICE)

    def f(q, k, v):
        return selected_attention(q, k, v, p["indices"], block_size=16, valid=p["valid"], backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(p["q"], p["k"], p["v"]), f(p["q"], p["k"], p["v"]))


def test_triton_backend_refuses_unsupported():
    p = random_problem(G=1, T=8, S=1, seed=0, device=DEVICE)
    with pytest.raises(ValueError, match="block_size up to 128"):
        selected_attention(p["q"], p["k"], p["v"], p["indices"], block_size=256, valid=p["valid"], backend="triton")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        selected_attention(p["q"].double(), p["k"].double(), p["v"].double(), p["indices"], block_size=16, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_gpu_real_sizes(G, dtype):
    problem = random_problem(G=G, HKV=4, T=2048 + 77, D=128, Dv=128, S=16, block=64, with_gates=True, seed=G, device="cuda")
    check_against_reference(problem, dtype, factor=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G", [1, 4, 16])
def test_kernel_gpu_query_offset(G):
    """The last of 4 shards of 4172 tokens (its offset 3129 cuts a block of 64), the scheme the launcher picks."""
    problem = offset_problem(T=4172, q_offset=3129, q_len=1043, G=G, HKV=4, D=128, Dv=128, S=16, block=64,
                             with_gates=True, seed=G, device="cuda")
    check_against_reference(problem, torch.bfloat16, factor=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("deterministic", [False, True])
def test_kernel_gpu_wide_heads_fit(G, deterministic, deterministic_algorithms):
    """Head dims of 256 on the by-block schemes: the tiles must fit the GPU's shared memory."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # the fixture restores the setting
    problem = random_problem(G=G, HKV=2, T=1000, D=256, Dv=256, S=8, block=64, with_gates=True, seed=G, device="cuda")
    check_against_reference(problem, torch.bfloat16, factor=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G", [1, 4, 16])
def test_kernel_gpu_race(G, deterministic_algorithms):
    """Under torch.use_deterministic_algorithms(True), reruns are bit-identical."""
    problem = random_problem(G=G, HKV=4, T=4096, D=128, Dv=128, S=16, block=64, device="cuda", dtype=torch.bfloat16,
                             with_gates=True, seed=1)
    first = run(problem, "triton")
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(first, run(problem, "triton")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G", [1, 4])
def test_kernel_gpu_atomic_dq_equals_deterministic(G, deterministic_algorithms):
    """The default (atomic dq) backward differs from the deterministic one only by the order of
    float32 additions: far below the bf16 rounding of dq."""
    from nsa_core.kernels.selected_attention import launch

    problem = random_problem(G=G, HKV=4, T=4096, D=128, Dv=128, S=16, block=64, device="cuda", dtype=torch.bfloat16,
                             with_gates=True, seed=2)
    exact = run(problem, "triton")
    torch.use_deterministic_algorithms(False)
    assert launch.choose_scheme(problem["q"], problem["k"], problem["indices"], backward=True) == "by_block"
    for a, b in zip(run(problem, "triton"), exact):
        # 1 bf16 ulp apart, or (entries near zero, where the sum cancels) float32 rounding of the largest term
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-20 * b.abs().max().item())


def test_by_block_forward_split_entries(monkeypatch, poisoned_outputs, deterministic_algorithms):
    """Dealing a block's entries to several programs changes nothing (deterministic backward, so
    that reruns can be compared bit for bit)."""
    from nsa_core.kernels.selected_attention import launch

    monkeypatch.setattr(launch, "choose_scheme", lambda *a, **k: "by_block")
    problem = random_problem(G=2, T=61, S=3, with_gates=True, seed=21, device=DEVICE)
    one = run(problem, "triton")
    monkeypatch.setattr(launch, "BY_BLOCK_FWD_SPLITS", 3)
    three = run(problem, "triton")
    assert all(torch.equal(a, b) for a, b in zip(one, three))


def test_build_csr_groups_entries_by_block():
    from nsa_core.kernels.selected_attention.launch import build_csr

    gen = torch.Generator().manual_seed(3)
    B, HKV, G, T, S, NB = 2, 3, 2, 11, 4, 5
    idx = torch.randint(-1, NB, (B, HKV * G, T, S), generator=gen, dtype=torch.int32)  # per-query-head selection
    entries, offsets = build_csr(idx, HKV, NB, 1)
    flat = idx.flatten()
    for g in range(B * HKV * NB):
        b, hk, blk = g // (HKV * NB), (g // NB) % HKV, g % NB
        want = [i for i in range(flat.numel()) if flat[i] == blk
                and i // (HKV * G * T * S) == b and (i // (T * S)) % (HKV * G) // G == hk]
        assert entries[offsets[g]:offsets[g + 1]].tolist() == want
    assert offsets[-1].item() == int((flat >= 0).sum())


def test_scheme_follows_group_size_and_determinism(deterministic_algorithms):
    """By block for small groups, by query for large ones; a deterministic backward uses partials
    (bit-identical) and so stops at 4 rows and at the memory budget."""
    from nsa_core.kernels.selected_attention import launch

    def scheme(G, T=1024, backward=True):
        q, k = torch.empty(1, 4 * G, T, 128, device="meta"), torch.empty(1, 4, T, 128, device="meta")
        return launch.choose_scheme(q, k, torch.empty(1, 4, T, 16, device="meta"), backward=backward)

    assert [scheme(G, backward=False) for G in (1, 4, 8, 16)] == ["by_block", "by_block", "by_query", "by_query"]
    assert [scheme(G) for G in (1, 4, 8, 16)] == ["by_block", "by_block", "by_query", "by_query"]
    assert scheme(4, T=2**17) == "by_query"  # 16 heads x 128k x 17 slots x 128 x 4 bytes of partials: over budget
    torch.use_deterministic_algorithms(False)
    assert [scheme(G) for G in (1, 4, 8, 16)] == ["by_block", "by_block", "by_block", "by_query"]
    assert scheme(4, T=2**17) == "by_block"
