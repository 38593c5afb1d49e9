"""nsa_core: Native Sparse Attention for PyTorch, with Triton kernels.

Public names only. The tree reads as the architecture (see the README's "How the code is laid out"):
config -> model (nn.Modules) -> ops (validate, decide kernels or reference once) -> kernels | reference;
checkpoint (safetensors, lucidrains conversion); the model's passes (cached, sequence-parallel,
generation) sit beside its modules; serving holds the paged cache a batching loop drives; distributed holds the shard layouts and collectives.
"""

from nsa_core.checkpoint.lucidrains import from_lucidrains, to_lucidrains
from nsa_core.checkpoint.safetensors import load_safetensors, save_safetensors
from nsa_core.config import PRESETS, NSAConfig, get_preset
from nsa_core.kernels.precompile import precompile
from nsa_core.model import compress_networks
from nsa_core.model.attention import SparseAttention
from nsa_core.model.cache import NSACache
from nsa_core.model.compress_networks import *  # noqa: F401,F403  (the networks; their names: compress_networks.__all__)
from nsa_core.model.optimizer_groups import RECOMMENDED_COMPRESSION_LR_SCALE, compression_parameters, param_groups
from nsa_core.model.transformer import Transformer
from nsa_core.ops import selected_attention, sliding_window_attention
from nsa_core.serving.paged_cache import PagedCache

from nsa_core.version import __version__

__all__ = [
    "SparseAttention",
    "NSAConfig",
    "NSACache",
    "PagedCache",
    "PRESETS",
    "get_preset",
    "selected_attention",
    "sliding_window_attention",
    "Transformer",
    "param_groups",
    "compression_parameters",
    "RECOMMENDED_COMPRESSION_LR_SCALE",
    "save_safetensors",
    "load_safetensors",
    "from_lucidrains",
    "to_lucidrains",
    "precompile",
    "compress_networks",
    *compress_networks.__all__,
    "__version__",
]
