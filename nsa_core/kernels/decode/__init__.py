"""Decode-time kernels. Paged split-K ("flash-decoding") attention over lists of key blocks (the
selected blocks and the own block, the window's blocks; its PyTorch twin is
nsa_core.reference.paged_decode), and a step's compressed branch fused with the block selection
(compressed_selection.py; twin: nsa_core.reference.step_selection). Forward only."""

from nsa_core.kernels.decode.compressed_selection import compressed_selection_step
from nsa_core.kernels.decode.op import paged_decode_attention

__all__ = ["compressed_selection_step", "paged_decode_attention"]
