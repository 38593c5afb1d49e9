"""nn.Modules of NSA speaking only to the ops, and the passes beside the module they run: SparseAttention
(a straight line of op calls), its cached and sequence-parallel passes, the key and value compression,
the decoding caches, rotary tables, compression networks, DenseAttention, the Transformer and its
generation."""
