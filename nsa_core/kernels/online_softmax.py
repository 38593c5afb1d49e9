"""The online-softmax step every attention kernel here shares: fold one key tile's scores into a
row's running max, sum and weighted values (flash attention's recurrence, float32 state).

Naming: b_ tiles (shape in the comment); R rows, N keys of the tile, DV value dim.
"""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(b_m, b_l, b_acc, b_s, b_v, PRECISION: tl.constexpr):
    """Running max b_m [R], sum b_l [R], accumulator b_acc [R, DV]; scores b_s [R, N] (-inf where a
    row does not see the key) and values b_v [N, DV] -> the updated (b_m, b_l, b_acc). A row that has
    seen no key yet keeps max -inf, sum 0 and a zero accumulator."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_base = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_p = tl.exp(b_s - b_base[:, None])
    b_alpha = tl.exp(b_m - b_base)
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return b_m_new, b_l, b_acc
