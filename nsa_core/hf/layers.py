"""The pieces of the HF NSA decoder: RMSNorm as Llama computes it, the gated MLP, the attention of a
layer (nsa_core's SparseAttention, or the dense attention of nsa_core's Transformer) fitted to the
decoder's config, and the decoder layer.

Fitting an attention to the config (local to the HF model; nsa_core's modules are unchanged): the
decoder layer norms before attention, so the attention's own norm is off (sparse: norm=False; dense:
an Identity); the rotary frequencies are the config's (theta, scaling); q/k/v and output biases
(Qwen2 has q/k/v ones) replace the bias-free projections; "linear" gates drop the sigmoid.

Dimension legend: b batch, n tokens, D hidden size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from nsa_core.hf.configuration import NSALMConfig
from nsa_core.hf.rope import rotary_frequencies
from nsa_core.model.attention import SparseAttention
from nsa_core.model.dense import DenseAttention


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight, as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): Llama's MLP (act SiLU)."""

    def __init__(self, config: NSALMConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _with_bias(linear: nn.Linear, bias: bool) -> nn.Linear:
    return nn.Linear(linear.in_features, linear.out_features, bias=True) if bias else linear


def sparse_attention(config: NSALMConfig) -> SparseAttention:
    attn = SparseAttention.from_config(config.attention_config())
    attn.to_qkv = _with_bias(attn.to_qkv, config.qkv_bias)
    attn.combine_heads = _with_bias(attn.combine_heads, config.attention_out_bias)
    if config.combine_gate == "linear":
        attn.to_strategy_combine[1] = nn.Identity()
    attn.to_strategy_combine[0].is_nsa_gate = True  # _init_weights gives it the config's gate initialisation
    with torch.no_grad():
        attn.rotary_emb.freqs.copy_(rotary_frequencies(config.head_dim, config.rotary_theta, config.rotary_scaling))
    return attn


def dense_attention(config: NSALMConfig) -> DenseAttention:
    attn = DenseAttention(config.hidden_size, dim_head=config.head_dim, heads=config.num_attention_heads,
                          causal=True, kv_heads=config.num_key_value_heads)
    attn.norm = nn.Identity()
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, _with_bias(getattr(attn, name), config.qkv_bias))
    attn.to_out = _with_bias(attn.to_out, config.attention_out_bias)
    with torch.no_grad():
        attn.rotary_embed.freqs.copy_(rotary_frequencies(config.head_dim, config.rotary_theta, config.rotary_scaling))
    return attn


class NSADecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)). The attention: sparse, or dense for the config's dense_layers."""

    def __init__(self, config: NSALMConfig, layer_idx: int):
        super().__init__()
        self.is_dense = layer_idx in config.dense_layers
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = dense_attention(config) if self.is_dense else sparse_attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """The parallel pass over x (b, n, D), or packed documents x (1, total, D) with cu_seqlens."""
        x = x + self.self_attn(self.input_layernorm(x), cu_seqlens=cu_seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x: Tensor, cache, lengths: Tensor | None):
        """With the layer's decoding cache (None: a prefill of rows right-padded to `lengths`, making
        one) -> (x, cache)."""
        out, cache = self.self_attn(self.input_layernorm(x), cache=cache, return_cache=True, lengths=lengths)
        x = x + out
        return x + self.mlp(self.post_attention_layernorm(x)), cache
