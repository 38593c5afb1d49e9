"""Paged split-K ("flash-decoding") attention over lists of key blocks: one kernel for the three
NSA branches at decode time (selected blocks and the own block, the window's blocks, the
compressed-key pool). Forward only; its PyTorch twin is nsa_core.reference.paged_decode."""

from nsa_core.kernels.decode.op import paged_decode_attention

__all__ = ["paged_decode_attention"]
