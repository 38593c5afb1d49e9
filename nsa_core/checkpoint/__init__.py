"""Checkpoints: the nsa safetensors format (complete file checks, save and load), conversion to and
from native-sparse-attention-pytorch state dicts, strict loading that names mismatched tensors,
and the files underneath (checked inputs, atomic writes)."""
