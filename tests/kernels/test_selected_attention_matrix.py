"""The selected-attention kernels over the documented support (head dims up to 256, blocks up to
128, fp32 / fp16 / bf16) on the GPU, forward and backward against the float64 reference
at small sequences: no promised shape may fail to launch (shared memory: tiles.py's rules, checked
ahead of time by tests/kernels/test_smem.py), and each is as accurate as PyTorch at its dtype.

Head dims cover each padded tile size (16 ... 256, non-powers of two included, and the widest with
the narrowest), blocks each padded key tile (16 ... 128, and 48 -> 64); G 4 runs the by-block
schemes where the tiles allow them, G 16 by query; deterministic mode the dq partials. Many
compiled variants: run a part with -k (e.g. -k "bf16 and 256"). With pytest-xdist, at most -n 6 on
one 80 GB GPU: 14 workers ran it out of memory (fp32 at head dim 256 takes up to 12 GB a worker)."""

import pytest
import torch

from kernel_cases import check_against_reference, random_problem

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HEAD_DIMS = [(16, 16), (24, 24), (80, 80), (128, 128), (192, 192), (256, 256), (256, 16), (16, 256)]
BLOCKS = [16, 48, 128]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# times PyTorch's own error at the dtype (the other gpu tests'); fp32's own max error is tiny and its
# order-of-summation noise large beside it: dgates at D 256, block 48, G 4 measured 4.05x on the H100
FACTOR = {"fp32": 5, "fp16": 3, "bf16": 3}


def problem(D, Dv, block, G, seed):
    return random_problem(G=G, HKV=2, T=3 * block + 5, D=D, Dv=Dv, S=2, block=block, with_gates=True, seed=seed,
                          device="cuda")


@pytest.fixture
def deterministic_algorithms():
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("G", [4, 16])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("D, Dv", HEAD_DIMS, ids=lambda d: str(d))
@pytest.mark.parametrize("dtype", DTYPES)
def test_support_matrix_gpu(dtype, D, Dv, block, G):
    check_against_reference(problem(D, Dv, block, G, seed=D + block + G), DTYPES[dtype], factor=FACTOR[dtype])


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("D", [128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_support_matrix_gpu_deterministic(dtype, D, block, deterministic_algorithms):
    """The deterministic backward (dq partials, by block up to 4 rows) at the widest tiles."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    check_against_reference(problem(D, D, block, 4, seed=D + block), DTYPES[dtype], factor=FACTOR[dtype])
