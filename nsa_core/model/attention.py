"""SparseAttention: NSA's module. Projections, the three branches and their gated combine.

Same constructor, parameter names and numbers as native-sparse-attention-pytorch 0.2.3
(its pure-PyTorch path), plus the seed-era options it dropped (see selection.py) and a
cached one-token decoding that equals the parallel pass (see cache.py).

Dimension legend: b batch, n sequence, h query heads, hk kv heads, d head dim,
c compressed blocks, m memory tokens, w window tokens, s the three strategies.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nsa_core.model.compress_networks import default_compress_mlp
from nsa_core.config import NSAConfig
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.ops.selected_attention import selected_attention
from nsa_core.ops.sliding_window import sliding_window_attention
from nsa_core.reference.compressed_attention import compressed_attention_reference
from nsa_core.model.rotary import RotaryEmbedding
from nsa_core.reference.masked_softmax import query_chunk_size
from nsa_core.reference.selection import Selection, block_importance, select_top_blocks

KERNEL_STEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _selection_tuple(out, selection) -> tuple:
    """(output,) or (output, indices, valid, probs, gates): what checkpoint can carry."""
    if selection is None:
        return (out,)
    gates = selection.gates if selection.gates is not None else selection.probs
    return out, selection.indices, selection.valid, selection.probs, gates


def _pad_seq(t: Tensor, multiple: int) -> Tensor:
    """Zero-pad dim -2 up to a multiple (the oracle's padding, whose zero keys it attends)."""
    remainder = -t.shape[-2] % multiple
    return F.pad(t, (0, 0, 0, remainder)) if remainder else t


class SparseAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        dim_head: int,
        heads: int,
        sliding_window_size: int,
        compress_block_size: int,
        selection_block_size: int,
        num_selected_blocks: int,
        kv_heads: int | None = None,
        num_compressed_mem_kv: int = 1,
        causal: bool = False,
        norm: bool = True,
        use_diff_topk: bool = False,
        use_triton_kernel: bool = False,
        query_heads_share_selected_kv: bool = True,
        interpolated_importance_score: bool = False,
        compress_mlp: nn.Module | None = None,
        compress_mlp_expand_factor: float = 1.0,
        strategy_combine_mlp: nn.Module | None = None,
        compress_block_sliding_stride: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(use_triton_kernel, bool):
            raise TypeError(f"use_triton_kernel must be a bool, got {use_triton_kernel!r}")
        if use_triton_kernel:
            if backend == "torch":
                raise ValueError("use_triton_kernel=True contradicts backend='torch'; pass one of them")
            backend = "triton"
        cfg = NSAConfig(
            dim=dim, dim_head=dim_head, heads=heads, sliding_window_size=sliding_window_size,
            compress_block_size=compress_block_size, selection_block_size=selection_block_size,
            num_selected_blocks=num_selected_blocks, kv_heads=kv_heads,
            num_compressed_mem_kv=num_compressed_mem_kv, causal=causal, norm=norm,
            use_diff_topk=use_diff_topk, query_heads_share_selected_kv=query_heads_share_selected_kv,
            interpolated_importance_score=interpolated_importance_score,
            compress_mlp_expand_factor=compress_mlp_expand_factor,
            compress_block_sliding_stride=compress_block_sliding_stride, backend=backend,
        )
        for name, module in (("compress_mlp", compress_mlp), ("strategy_combine_mlp", strategy_combine_mlp)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module or None, got {type(module).__name__}")
        self.config = cfg
        self.heads, self.kv_heads, self.dim_head = heads, cfg.num_kv_heads, dim_head
        self.num_grouped_queries = cfg.group_size
        self.scale = dim_head ** -0.5
        self.causal = causal
        self.stride = cfg.stride
        self.compress_block_size = compress_block_size
        self.selection_block_size = selection_block_size
        self.sliding_window_size = sliding_window_size
        self.num_selected_blocks = num_selected_blocks
        self.num_mem_compress_kv = num_compressed_mem_kv

        self.norm = nn.RMSNorm(dim) if norm else nn.Identity()
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.qkv_split = (heads * dim_head, self.kv_heads * dim_head, self.kv_heads * dim_head)
        self.to_qkv = nn.Linear(dim, sum(self.qkv_split), bias=False)

        self.compress_mem_kv = nn.Parameter(torch.zeros(2, self.kv_heads, num_compressed_mem_kv, dim_head))
        self.k_intrablock_positions = nn.Parameter(torch.zeros(self.kv_heads, compress_block_size, dim_head))
        self.v_intrablock_positions = nn.Parameter(torch.zeros(self.kv_heads, compress_block_size, dim_head))
        if compress_mlp is None:
            compress_mlp = default_compress_mlp(dim_head, compress_block_size, compress_mlp_expand_factor)
        self.k_compress = copy.deepcopy(compress_mlp)
        self.v_compress = copy.deepcopy(compress_mlp)

        if strategy_combine_mlp is None:
            strategy_combine_mlp = nn.Linear(dim, 3 * heads)
            nn.init.zeros_(strategy_combine_mlp.weight)
            with torch.no_grad():
                strategy_combine_mlp.bias.copy_(torch.tensor([-2.0, -2.0, 2.0] * heads))
        self.to_strategy_combine = nn.Sequential(
            strategy_combine_mlp, nn.Sigmoid(), Rearrange("b n (h s) -> b h n s", h=heads)
        )
        self.combine_heads = nn.Linear(heads * dim_head, dim, bias=False)

    # construction from data ----------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: NSAConfig, **modules: nn.Module) -> "SparseAttention":
        """Build from an NSAConfig; `compress_mlp` / `strategy_combine_mlp` may be passed as modules."""
        if not isinstance(cfg, NSAConfig):
            raise TypeError(f"cfg must be an NSAConfig, got {type(cfg).__name__}")
        allowed = {"compress_mlp", "strategy_combine_mlp"}
        if set(modules) - allowed:
            raise TypeError(f"from_config takes only {sorted(allowed)} as extra modules, got {sorted(modules)}")
        return cls(**cfg.to_dict(), **modules)

    # pieces --------------------------------------------------------------------------------

    def check_input(self, inp: Tensor) -> None:
        if not isinstance(inp, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(inp).__name__}")
        if inp.ndim != 3:
            raise ValueError(f"input must have shape (batch, seq, dim={self.config.dim}), got {tuple(inp.shape)}")
        if inp.shape[-1] != self.config.dim:
            raise ValueError(f"input last dim must be dim={self.config.dim}, got {inp.shape[-1]}")
        if not inp.dtype.is_floating_point:
            raise TypeError(f"input must be a floating tensor, got {inp.dtype}")
        if inp.shape[1] < 1:
            raise ValueError("input must hold at least one token (seq >= 1)")

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed input (b, n, dim) -> q (b, h, n, d), k and v (b, hk, n, d)."""
        q, k, v = self.to_qkv(x).split(self.qkv_split, dim=-1)
        return tuple(t.unflatten(-1, (-1, self.dim_head)).transpose(1, 2) for t in (q, k, v))

    def compress_windows(self, windows_k: Tensor, windows_v: Tensor) -> tuple[Tensor, Tensor]:
        """Windows (b, hk, c, compress_block_size, d) -> compressed tokens (b, hk, c, d)."""
        wk = windows_k + self.k_intrablock_positions[:, None]
        wv = windows_v + self.v_intrablock_positions[:, None]
        ck, cv = self.k_compress(wk), self.v_compress(wv)
        expected = (*windows_k.shape[:3], self.dim_head)
        for name, t in (("keys", ck), ("values", cv)):
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"compress_mlp must map (b, h, w, n, d) windows to (b, h, w, d) = {expected}; "
                    f"for {name} it returned {tuple(t.shape)}"
                )
        return ck, cv

    def compress(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Unrotated k, v (b, hk, n, d) -> compressed (b, hk, c, d), c = n // stride.

        Window c covers tokens c*stride - (block - stride) ... (c+1)*stride - 1 (zeros before 0)."""
        b, hk, n, d = k.shape
        c = n // self.stride
        if c == 0:
            empty = k.new_zeros(b, hk, 0, d)
            return empty, empty.clone()
        overlap = self.compress_block_size - self.stride

        def windows(t: Tensor) -> Tensor:
            t = F.pad(t[:, :, : c * self.stride], (0, 0, overlap, 0))
            return t.unfold(2, self.compress_block_size, self.stride).transpose(-1, -2)

        return self.compress_windows(windows(k), windows(v))

    def with_memory(self, ck: Tensor, cv: Tensor) -> tuple[Tensor, Tensor]:
        mem_k, mem_v = (m.expand(ck.shape[0], -1, -1, -1) for m in self.compress_mem_kv)
        return torch.cat((mem_k, ck), dim=-2), torch.cat((mem_v, cv), dim=-2)

    def select(self, compressed_scores: Tensor, query_pos: Tensor):
        """Compressed logits (b, h, n, c) -> Selection (or None when nothing can be selected)."""
        cfg = self.config
        block_logits = block_importance(
            compressed_scores,
            group_size=self.num_grouped_queries,
            share_across_group=cfg.query_heads_share_selected_kv,
            stride=self.stride,
            selection_block_size=self.selection_block_size,
            interpolated=cfg.interpolated_importance_score,
            causal=self.causal,
            query_pos=query_pos,
        )
        return select_top_blocks(block_logits, self.num_selected_blocks, cfg.use_diff_topk)

    def kernel_backend(self) -> str:
        return self.config.backend

    def on_kernels(self, t: Tensor) -> bool:
        """Whether the kernel-only steps (rotary, block top-k, gated combine) take their Triton
        kernels for tensors like t: backend "triton", or "auto" on CUDA, where kernels can run,
        in half or single precision, for tensors their 32-bit offsets reach. Otherwise their
        PyTorch twins run."""
        from nsa_core.kernels.outputs import too_large_reason

        backend = self.kernel_backend()
        wanted = backend == "triton" or (backend == "auto" and t.is_cuda)
        return (wanted and t.dtype in KERNEL_STEP_DTYPES and kernel_unavailable_reason(t.device) is None
                and too_large_reason(t=t) is None)

    def uses_fast_compressed_path(self, q: Tensor) -> bool:
        """On the kernel path (CUDA, or backend='triton'), compressed attention runs as one SDPA
        call and block scores are pooled before the dot product (fast_compressed.py)."""
        backend = self.kernel_backend()
        on_kernels = backend == "triton" or (backend == "auto" and q.is_cuda)
        return on_kernels and self.selection_block_size % self.stride == 0

    def compressed_and_select(self, q: Tensor, ck_all: Tensor, cv_all: Tensor, query_offset: int = 0):
        """Compressed attention and block selection, over chunks of queries so the (n x c) logits
        exist one chunk at a time (re-computed in the backward pass): memory linear in n.
        q holds the queries at positions query_offset ... (decoding passes one).
        Returns (compressed output (b, h, n, d), Selection or None)."""
        b, h, n, _ = q.shape
        if query_offset == 0 and self.uses_fast_compressed_path(q):
            return self.fast_compressed_and_select(q, ck_all, cv_all)
        chunk = query_chunk_size(n, ck_all.shape[-2], h, b, budget=1 << 26)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or ck_all.requires_grad or cv_all.requires_grad)

        def part(start: int, end: int):
            out, scores = compressed_attention_reference(
                q[:, :, start:end], ck_all, cv_all, self.num_mem_compress_kv, self.stride, self.causal, self.scale,
                query_offset=query_offset + start,
            )
            selection = self.select(scores, torch.arange(query_offset + start, query_offset + end, device=q.device))
            return _selection_tuple(out, selection)

        return self._chunked(part, n, chunk, needs_grad)

    def fast_compressed_and_select(self, q: Tensor, ck_all: Tensor, cv_all: Tensor):
        from nsa_core.fast_compressed import compressed_attention_sdpa, pooled_block_logits, pooled_block_scores

        b, h, n, _ = q.shape
        out = compressed_attention_sdpa(q, ck_all, cv_all, self.num_mem_compress_kv, self.stride, self.causal, self.scale)
        ck = ck_all[:, :, self.num_mem_compress_kv :]
        cfg = self.config
        heads = self.kv_heads if cfg.query_heads_share_selected_kv else self.heads
        chunk = query_chunk_size(n, max(1, ck.shape[-2]), heads, b, budget=1 << 27)
        needs_grad = cfg.use_diff_topk and torch.is_grad_enabled() and (q.requires_grad or ck.requires_grad)
        pooling = dict(group_size=self.num_grouped_queries, share_across_group=cfg.query_heads_share_selected_kv,
                       stride=self.stride, selection_block_size=self.selection_block_size)
        num_blocks = ck.shape[-2] // (self.selection_block_size // self.stride)
        k = min(self.num_selected_blocks, num_blocks)
        if k > 0 and not cfg.use_diff_topk and self.uses_topk_kernel(q, num_blocks):
            from nsa_core.kernels.block_topk import block_topk

            def part(start: int, end: int):
                scores = pooled_block_scores(q[:, :, start:end], ck, **pooling)
                indices, valid, probs = block_topk(scores, k, scale=self.scale, first_pos=start, causal=self.causal,
                                                   selection_block_size=self.selection_block_size,
                                                   mask_own=self.selection_block_size != self.stride)
                return None, indices, valid, probs, probs
        else:
            def part(start: int, end: int):
                pos = torch.arange(start, end, device=q.device)
                logits = pooled_block_logits(q[:, :, start:end], ck, causal=self.causal, scale=self.scale,
                                             query_pos=pos, **pooling)
                return _selection_tuple(None, select_top_blocks(logits, self.num_selected_blocks, cfg.use_diff_topk))

        with torch.set_grad_enabled(needs_grad):
            _, selection = self._chunked(part, n, chunk, needs_grad)
        return out, selection

    def uses_topk_kernel(self, q: Tensor, num_blocks: int) -> bool:
        """Scoring's mask + softmax + top-k as one kernel (kernels/block_topk.py), up to
        MAX_BLOCKS selection blocks."""
        if not self.on_kernels(q):
            return False
        from nsa_core.kernels.block_topk import MAX_BLOCKS

        return num_blocks <= MAX_BLOCKS

    def _chunked(self, part, n: int, chunk: int, needs_grad: bool):
        """Run part(start, end) over query chunks (checkpointed when gradients are needed) and
        join the (output, Selection) pieces along the sequence."""
        parts = []
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            parts.append(checkpoint(part, start, end, use_reentrant=False) if needs_grad and chunk < n else part(start, end))
        out = None if parts[0][0] is None else torch.cat([p[0] for p in parts], dim=-2)
        if len(parts[0]) == 1:
            return out, None
        indices, valid, probs, gates = (torch.cat([p[i] for p in parts], dim=-2) for i in range(1, 5))
        return out, Selection(indices, valid, probs, gates if self.config.use_diff_topk else None)

    def fine_branch(self, q: Tensor, k: Tensor, v: Tensor, selection) -> Tensor:
        """Attention over the selected blocks (plus the own block when causal). Rotated q, k."""
        b, h, n, _ = q.shape
        sel_size = self.selection_block_size
        kwargs = dict(block_size=sel_size, scale=self.scale, backend=self.kernel_backend())
        if selection is None:
            if self.causal:
                none = torch.zeros(b, self.kv_heads, n, 0, dtype=torch.long, device=q.device)
                return selected_attention(q, k, v, none, causal=True, **kwargs)
            # the oracle attends each query's whole own block, zero padding included
            qp, kp, vp = (_pad_seq(t, sel_size) for t in (q, k, v))
            own = (torch.arange(qp.shape[-2], device=q.device) // sel_size).view(1, 1, -1, 1)
            own = own.expand(b, self.kv_heads, -1, 1)
            return selected_attention(qp, kp, vp, own, causal=False, **kwargs)[..., :n, :]
        valid, gates = selection.valid, selection.gates
        if not self.causal:
            # a query none of whose slots is valid: the oracle averages the selected blocks' values
            any_valid = valid.any(dim=-1, keepdim=True)
            ones = torch.ones_like(selection.probs)
            gates = torch.where(any_valid, ones if gates is None else gates, torch.zeros_like(ones))
            valid = valid | ~any_valid
        return selected_attention(q, k, v, selection.indices, valid=valid, gates=gates, causal=self.causal, **kwargs)

    def sliding_branch(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        window, n = self.sliding_window_size, q.shape[-2]
        if self.causal:
            return sliding_window_attention(q, k, v, window=window, causal=True, scale=self.scale, backend=self.kernel_backend())
        # the oracle pads to a multiple of the window and attends the zero keys within reach
        qp, kp, vp = (_pad_seq(t, window) for t in (q, k, v))
        return sliding_window_attention(qp, kp, vp, window=window, causal=False, scale=self.scale)[..., :n, :]

    def combine(self, x_normed: Tensor, compressed: Tensor, fine: Tensor, sliding: Tensor) -> Tensor:
        """Gated sum of the branches (b, h, n, d) and the output projection -> (b, n, dim).
        On kernel backends one Triton pass each way (kernels/combine.py), written token-major."""
        gates = self.to_strategy_combine(x_normed)  # (b, h, n, 3)
        branches = (compressed, fine, sliding)
        if all(t.dtype == gates.dtype for t in branches) and all(self.on_kernels(t) for t in branches):
            from nsa_core.kernels.combine import combine_triton

            return self.combine_heads(combine_triton(*branches, gates).flatten(-2))
        out = torch.addcmul(compressed * gates[..., 0:1], fine, gates[..., 1:2])  # fused multiply-adds:
        out = torch.addcmul(out, sliding, gates[..., 2:3])  # no full-size product temporaries
        return self.combine_heads(out.transpose(1, 2).flatten(-2))

    # forward -------------------------------------------------------------------------------

    def attend(self, x_normed: Tensor, q: Tensor, k: Tensor, v: Tensor, keep_for_cache: bool = False):
        """The three branches and their gated combine: q (b, h, n, d), unrotated k, v (b, hk, n, d)
        -> (b, n, dim). With keep_for_cache also (compressed k, compressed v, rotated k)."""
        ck, cv = self.compress(k, v)
        ck_all, cv_all = self.with_memory(ck, cv)
        compressed_out, selection = self.compressed_and_select(q, ck_all, cv_all)
        rotary_backend = "triton" if self.on_kernels(q) else "torch"
        q_rot, k_rot = (self.rotary_emb.rotate(t, backend=rotary_backend) for t in (q, k))
        fine_out = self.fine_branch(q_rot, k_rot, v, selection)
        sliding_out = self.sliding_branch(q_rot, k_rot, v)
        out = self.combine(x_normed, compressed_out, fine_out, sliding_out)
        return (out, (ck, cv, k_rot)) if keep_for_cache else out

    def forward(self, inp: Tensor, cache=None, return_cache: bool = False):
        """inp (batch, seq, dim) -> (batch, seq, dim); with return_cache also the decoding cache.

        With `cache` (from an earlier call with return_cache=True), inp holds the next tokens
        and is decoded one token at a time against the cache (causal modules only)."""
        self.check_input(inp)
        if cache is not None or return_cache:
            if not self.causal:
                raise ValueError("cache / return_cache need a causal module (causal=True)")
        if cache is not None:
            from nsa_core.model.cache import decode

            return decode(self, inp, cache, return_cache)

        x = self.norm(inp)
        q, k, v = self.project(x)
        if not return_cache:
            return self.attend(x, q, k, v)
        out, (ck, cv, k_rot) = self.attend(x, q, k, v, keep_for_cache=True)
        from nsa_core.model.cache import NSACache

        return out, NSACache.from_prefill(self, k, k_rot, v, ck, cv)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"heads={c.heads}, kv_heads={c.num_kv_heads}, dim_head={c.dim_head}, causal={c.causal}, "
            f"compress={c.compress_block_size}/{c.stride}, selection={c.selection_block_size}x{c.num_selected_blocks}, "
            f"window={c.sliding_window_size}, backend={c.backend!r}"
        )
