"""Checkpoints: the nsa safetensors format (atomic writes, header checks) and conversion to and from
native-sparse-attention-pytorch state dicts."""
