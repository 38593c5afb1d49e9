"""Compression networks: each maps windows of keys or values (b, h, w, n, d) to one
compressed token per window (b, h, w, d), and can be passed as `compress_mlp`.

Dimension legend: b batch, h kv heads, w windows, n tokens per window (the compression
block size), d head dimension.

The first five are the oracle's (same parameter names, same math). The last four are the
variants the seed documents proposed, made to work: a wider GELU MLP, a bottlenecked grouped
convolution, a temperature-scaled attention pool and a grouped MLP with dropout and a
residual path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import EinMix, Rearrange
from torch import Tensor, nn

from nsa_core.ops.validation import check_positive_int


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        check_positive_int(name, value)


def _check_window(kv: Tensor, expected_n: int | None = None, expected_d: int | None = None) -> None:
    if kv.ndim != 5:
        raise ValueError(f"compression input must have shape (b, h, w, n, d), got {tuple(kv.shape)}")
    if expected_n is not None and kv.shape[-2] != expected_n:
        raise ValueError(f"compression window must hold {expected_n} tokens, got {kv.shape[-2]}")
    if expected_d is not None and kv.shape[-1] != expected_d:
        raise ValueError(f"compression input head dim must be {expected_d}, got {kv.shape[-1]}")


def default_compress_mlp(dim_head: int, compress_block_size: int, expand_factor: float = 1.0) -> nn.Sequential:
    """The module's default: flatten the window, Linear -> ReLU -> Linear to one token."""
    compress_dim = compress_block_size * dim_head
    hidden = int(expand_factor * compress_dim)
    return nn.Sequential(
        Rearrange("b h w n d -> b h w (n d)"),
        nn.Linear(compress_dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, dim_head),
    )


def default_mlp_layers(net: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(W1, b1, W2, b2) when `net` is the default network's structure (flatten the window, Linear ->
    ReLU -> Linear, with biases), else None: what the decoding step's fused compression reads."""
    if not (isinstance(net, nn.Sequential) and len(net) == 4):
        return None
    flatten, first, relu, second = net
    if not (isinstance(flatten, Rearrange) and flatten.pattern == "b h w n d -> b h w (n d)"
            and type(first) is nn.Linear and type(relu) is nn.ReLU and type(second) is nn.Linear
            and first.bias is not None and second.bias is not None):
        return None
    return first.weight, first.bias, second.weight, second.bias


class ConvLinearCompress(nn.Module):
    """A grouped 1-d convolution over each window (kernel = stride = window): one filter bank per head."""

    def __init__(self, heads: int, dim_head: int, compress_block_size: int):
        super().__init__()
        _check_positive(heads=heads, dim_head=dim_head, compress_block_size=compress_block_size)
        self.heads, self.dim_head, self.block = heads, dim_head, compress_block_size
        inner = heads * dim_head
        self.conv = nn.Conv1d(inner, inner, compress_block_size, stride=compress_block_size, groups=heads)

    def forward(self, kv: Tensor) -> Tensor:
        _check_window(kv, self.block, self.dim_head)
        x = rearrange(kv, "b h w n d -> b (h d) (w n)")
        return rearrange(self.conv(x), "b (h d) w -> b h w d", h=self.heads)


class AttentionPool(nn.Module):
    """Softmax pooling over the window, one weight per token and feature (Enformer's attention pool)."""

    def __init__(self, dim_head: int, compress_block_size: int):
        super().__init__()
        _check_positive(dim_head=dim_head, compress_block_size=compress_block_size)
        self.to_attn_logits = nn.Linear(dim_head, dim_head, bias=False)
        with torch.no_grad():
            self.to_attn_logits.weight.copy_(torch.eye(dim_head))

    def forward(self, kv: Tensor) -> Tensor:
        attn = self.to_attn_logits(kv).softmax(dim=-2)
        return (kv * attn).sum(dim=-2)


class GroupedMLP(nn.Module):
    """A two-layer ReLU MLP over the flattened window with separate weights per head."""

    def __init__(self, dim_head: int, compress_block_size: int, heads: int, expand_factor: float = 1.0):
        super().__init__()
        _check_positive(dim_head=dim_head, compress_block_size=compress_block_size, heads=heads)
        dim = dim_head * compress_block_size
        hidden = int(dim * expand_factor)
        if hidden < 1:
            raise ValueError(f"expand_factor must leave at least one hidden unit, got {expand_factor}")
        self.net = nn.Sequential(
            EinMix("b h w i -> b h w o", weight_shape="h i o", bias_shape="h o", h=heads, i=dim, o=hidden),
            nn.ReLU(),
            EinMix("b h w i -> b h w o", weight_shape="h i o", bias_shape="h o", h=heads, i=hidden, o=dim_head),
        )

    def forward(self, kv: Tensor) -> Tensor:
        return self.net(rearrange(kv, "b h w n d -> b h w (n d)"))


class SingleProjection(nn.Module):
    """One linear map of the flattened window (heads=1), or a per-head projection summed over the window."""

    def __init__(self, dim_head: int, compress_block_size: int, heads: int = 1):
        super().__init__()
        _check_positive(dim_head=dim_head, compress_block_size=compress_block_size, heads=heads)
        if heads == 1:
            self.compress = nn.Sequential(
                Rearrange("b h w n d -> b h w (n d)"),
                nn.Linear(dim_head * compress_block_size, dim_head, bias=False),
            )
        else:
            self.compress = EinMix(
                "b h w n i -> b h w o", weight_shape="h i o", h=heads, i=dim_head, o=dim_head
            )

    def forward(self, kv: Tensor) -> Tensor:
        return self.compress(kv)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (rearrange(p(x), "b l (h d) -> b h l d", h=self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act, self.dropout = nn.GELU(), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class _TransformerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ff_hidden_dim: int | None, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = _SelfAttention(dim, num_heads, dropout)
        self.ff = _FeedForward(dim, ff_hidden_dim or dim * 4, dropout)


class CompressTransformer(nn.Module):
    """Transformer layers over each window's tokens (all heads concatenated, dim = heads * dim_head);
    the window's last token after the last layer is the compressed token."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, ff_hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        _check_positive(num_layers=num_layers, dim=dim, num_heads=num_heads)
        self.dim = dim
        self.layers = nn.ModuleList(_TransformerLayer(dim, num_heads, ff_hidden_dim, dropout) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, kv: Tensor) -> Tensor:
        _check_window(kv)
        b, h, w, n, d = kv.shape
        if h * d != self.dim:
            raise ValueError(f"CompressTransformer(dim={self.dim}) needs heads * dim_head == dim, got {h} * {d}")
        x = rearrange(kv, "b h w n d -> (b w) n (h d)")
        for layer in self.layers[:-1]:
            x = x + layer.attn(layer.norm1(x))
            x = x + layer.ff(layer.norm2(x))
        last = self.layers[-1]
        x = x + last.attn(last.norm1(x))
        token = x[:, -1]
        token = token + last.ff(last.norm2(token))
        return rearrange(token, "(b w) (h d) -> b h w d", b=b, h=h)


# --- the seed documents' proposals, made to work ---------------------------------------


class GELUCompressMLP(nn.Module):
    """Seed 001's 'improved' MLP: a wider hidden layer (hidden_factor x the window) with GELU."""

    def __init__(self, dim_head: int, compress_block_size: int, hidden_factor: float = 2.0):
        super().__init__()
        _check_positive(dim_head=dim_head, compress_block_size=compress_block_size)
        dim = dim_head * compress_block_size
        hidden = int(dim * hidden_factor)
        if hidden < 1:
            raise ValueError(f"hidden_factor must leave at least one hidden unit, got {hidden_factor}")
        self.mlp = nn.Sequential(
            Rearrange("b h w n d -> b h w (n d)"),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim_head),
        )

    def forward(self, kv: Tensor) -> Tensor:
        return self.mlp(kv)


class BottleneckConvCompress(nn.Module):
    """Seed 003's bottlenecked grouped convolution: a per-head 1x1 reduction to
    dim_head / reduction_factor channels, the strided window convolution, a 1x1 expansion."""

    def __init__(self, heads: int, dim_head: int, compress_block_size: int, reduction_factor: int = 2):
        super().__init__()
        _check_positive(heads=heads, dim_head=dim_head, compress_block_size=compress_block_size, reduction_factor=reduction_factor)
        if dim_head % reduction_factor != 0:
            raise ValueError(f"reduction_factor ({reduction_factor}) must divide dim_head ({dim_head})")
        self.heads, self.dim_head, self.block = heads, dim_head, compress_block_size
        inner, reduced = heads * dim_head, heads * (dim_head // reduction_factor)
        self.reduce = nn.Conv1d(inner, reduced, 1, groups=heads)
        self.window_conv = nn.Conv1d(reduced, reduced, compress_block_size, stride=compress_block_size, groups=heads)
        self.expand = nn.Conv1d(reduced, inner, 1, groups=heads)

    def forward(self, kv: Tensor) -> Tensor:
        _check_window(kv, self.block, self.dim_head)
        x = rearrange(kv, "b h w n d -> b (h d) (w n)")
        x = self.expand(self.window_conv(self.reduce(x)))
        return rearrange(x, "b (h d) w -> b h w d", h=self.heads)


class ScaledAttentionPool(nn.Module):
    """Seed 003's attention pool with a temperature: logits / temperature (default sqrt(dim_head)),
    optionally learned (as a log-temperature, so it stays positive)."""

    def __init__(self, dim_head: int, compress_block_size: int, temperature: float | None = None, learned_temperature: bool = False):
        super().__init__()
        _check_positive(dim_head=dim_head, compress_block_size=compress_block_size)
        temperature = dim_head ** 0.5 if temperature is None else temperature
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.to_attn_logits = nn.Linear(dim_head, dim_head, bias=False)
        with torch.no_grad():
            self.to_attn_logits.weight.copy_(torch.eye(dim_head))
        log_t = torch.tensor(float(temperature)).log()
        if learned_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def forward(self, kv: Tensor) -> Tensor:
        logits = self.to_attn_logits(kv) / self.log_temperature.exp()
        return (kv * logits.softmax(dim=-2)).sum(dim=-2)


class ResidualGroupedMLP(nn.Module):
    """Seed 003's enhanced grouped MLP, with shapes that work: per-head GELU MLP with dropout over
    the flattened window, added (times a learned scale) to a residual path, the window's mean token."""

    def __init__(self, dim_head: int, compress_block_size: int, heads: int, expand_factor: float = 1.0, dropout: float = 0.0):
        super().__init__()
        _check_positive(dim_head=dim_head, compress_block_size=compress_block_size, heads=heads)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        dim = dim_head * compress_block_size
        hidden = int(dim * expand_factor)
        if hidden < 1:
            raise ValueError(f"expand_factor must leave at least one hidden unit, got {expand_factor}")
        self.net = nn.Sequential(
            EinMix("b h w i -> b h w o", weight_shape="h i o", bias_shape="h o", h=heads, i=dim, o=hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            EinMix("b h w i -> b h w o", weight_shape="h i o", bias_shape="h o", h=heads, i=hidden, o=dim_head),
            nn.Dropout(dropout),
        )
        self.residual_scale = nn.Parameter(torch.ones(1))

    def forward(self, kv: Tensor) -> Tensor:
        _check_window(kv)
        residual = kv.mean(dim=-2)
        return residual + self.residual_scale * self.net(rearrange(kv, "b h w n d -> b h w (n d)"))


__all__ = [
    "default_compress_mlp",
    "ConvLinearCompress",
    "AttentionPool",
    "GroupedMLP",
    "SingleProjection",
    "CompressTransformer",
    "GELUCompressMLP",
    "BottleneckConvCompress",
    "ScaledAttentionPool",
    "ResidualGroupedMLP",
]
