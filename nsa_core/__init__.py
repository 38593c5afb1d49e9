"""nsa_core: Native Sparse Attention for PyTorch, with Triton kernels.

Public names: SparseAttention, NSAConfig, NSACache, the functional ops selected_attention and
sliding_window_attention, and the modules compress_networks, transformer, io, convert.
"""

from nsa_core.cache import NSACache
from nsa_core.config import PRESETS, NSAConfig, get_preset
from nsa_core.ops import selected_attention, sliding_window_attention
from nsa_core.sparse_attention import SparseAttention
from nsa_core.transformer import Transformer

__version__ = "0.1.0"

__all__ = [
    "SparseAttention",
    "NSAConfig",
    "NSACache",
    "PRESETS",
    "get_preset",
    "selected_attention",
    "sliding_window_attention",
    "Transformer",
    "__version__",
]
