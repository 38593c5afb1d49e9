"""NSA's functional ops. Each validates its inputs, decides once whether its Triton kernels or its
PyTorch reference run (dispatch.py: one rule), and takes the sequence descriptor (nsa_core/seqs.py);
the branch ops take their keys as tensors or, for a decoding step, in a cache's pages (paged.py)."""

from nsa_core.ops.block_selection import select_blocks
from nsa_core.ops.combine import combine
from nsa_core.ops.compressed_attention import compressed_attention
from nsa_core.ops.compressed_selection import compressed_selection
from nsa_core.ops.document_attention import document_attention
from nsa_core.ops.paged import Pages, PooledBlockKeys
from nsa_core.ops.rotary import rotary, rotary_at_positions
from nsa_core.ops.selected_attention import selected_attention
from nsa_core.seqs import Seqs
from nsa_core.ops.sliding_window import sliding_window_attention

__all__ = ["Seqs", "Pages", "PooledBlockKeys", "compressed_attention", "compressed_selection", "document_attention",
           "select_blocks", "selected_attention", "sliding_window_attention", "rotary", "rotary_at_positions",
           "combine"]
