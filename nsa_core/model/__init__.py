"""nn.Modules of NSA with no path decisions: SparseAttention (a straight line of op calls), the key
and value compression, the decoding cache, rotary tables, compression networks, the Transformer."""
