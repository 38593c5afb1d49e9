"""Pure-PyTorch semantics of every NSA branch: the oracle the kernels are tested against.

Runs on any device, never imports triton, and keeps memory linear in the sequence length by
working over chunks of queries (re-computed in the backward pass).
"""

from nsa_core.reference.compressed_attention import compressed_attention_reference
from nsa_core.reference.selected_attention import selected_attention_reference
from nsa_core.reference.sliding_window import sliding_window_reference

__all__ = ["compressed_attention_reference", "selected_attention_reference", "sliding_window_reference"]
