"""Launch grids that hold any batch: CUDA caps a grid's second and third axes at 65,535 programs,
so a (tiles, batch x heads) grid fails at batch x heads >= 65,536 (e.g. 2,048 rows of 32 heads).
Kernels take the product on the first axis (up to 2**31 - 1) and split it back with `split_pid`."""

import triton
import triton.language as tl


@triton.jit
def split_pid(num_inner):
    """(inner, outer) program indices of a flattened (num_inner, outer) grid: inner varies fastest,
    so programs run in the order the two-axis grid ran them."""
    pid = tl.program_id(0)
    return pid % num_inner, pid // num_inner
