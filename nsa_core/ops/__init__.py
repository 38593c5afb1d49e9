"""Public functional ops of NSA, each dispatching to the reference or the Triton kernels."""

from nsa_core.ops.selected_attention import selected_attention
from nsa_core.ops.sliding_window import sliding_window_attention

__all__ = ["selected_attention", "sliding_window_attention"]
