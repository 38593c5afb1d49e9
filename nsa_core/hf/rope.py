"""Rotary frequencies of the HF NSA model: theta and the scalings that only move frequencies
("linear", Llama 3's "llama3"), computed as transformers computes them; the scalings that also
scale the attention (dynamic, yarn, longrope) are refused by the configuration.

Pair i of a head turns by `position * freqs[i]`; nsa_core rotates interleaved pairs (2i, 2i + 1),
HF Llama-family models rotate halves (i, i + d/2) with the same frequencies (convert_dense.py
permutes the q / k projections between the two).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rotary_frequencies(head_dim: int, theta: float, rope_scaling: dict | None) -> Tensor:
    """(head_dim // 2,) float32 frequencies."""
    from nsa_core.hf.configuration import rope_type_of

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope_type_of(rope_scaling)
    if kind == "default":
        return freqs
    factor = float(rope_scaling["factor"])
    if kind == "linear":
        return freqs / factor
    if kind == "llama3":
        low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
        old_len = float(rope_scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported")
