"""SparseAttention: NSA's module. Projections, the three branches and their gated combine.

Same constructor, parameter names and numbers as native-sparse-attention-pytorch 0.2.3 (its
pure-PyTorch path), plus the seed-era options it dropped (see reference/selection.py). `attend`
is a straight line of op calls (nsa_core.ops): each op decides once whether its kernels or its
PyTorch reference run, and whether it reads token tensors or a cache's pages. Every pass runs it:
`forward` picks the pass (model/modes.py): the parallel pass here (whole sequences or packed
documents), the cached pass (model/decode.py: a prefill and the decoding steps, whose keys are the
cache's pages, model/cache.py), or the sequence-parallel pass (model/sequence_parallel.py).

Dimension legend: b batch, n queries, s keys, h query heads, hk kv heads, d head dim,
c compressed tokens, m memory tokens.
"""

from __future__ import annotations

import copy

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from nsa_core.config import DEFAULT_GATE_BIASES, NSAConfig
from nsa_core.distributed.sequence_parallel import resolve_layout
from nsa_core.model.branch_keys import BranchKeys, split_branches
from nsa_core.model.compress_networks import default_compress_mlp, default_mlp_layers
from nsa_core.model.cache import NSACache
from nsa_core.model.compression import compress_windows, compression_windows, with_memory
from nsa_core.model.rotary import RotaryEmbedding
from nsa_core.model.decode import run_with_cache
from nsa_core.model.modes import CACHED, SHARDED, forward_mode, packed_seqs
from nsa_core.model.selection_keys import block_mean_keys
from nsa_core.model.sequence_parallel import sequence_parallel_forward
from nsa_core.ops.block_selection import select_blocks
from nsa_core.ops.combine import combine
from nsa_core.ops.combine_gates import CombineGates
from nsa_core.ops.compressed_selection import compressed_selection
from nsa_core.ops.oracle_padding import padded_selected_attention, padded_window_attention
from nsa_core.ops.rotary import rotary, rotary_at_positions
from nsa_core.ops.selected_attention import selected_attention
from nsa_core.ops.selected_window_combine import selected_window_combine_step
from nsa_core.ops.selection_merge import merge_selection_slots
from nsa_core.ops.sliding_window import sliding_window_attention
from nsa_core.ops.window_compression import MLPCompression
from nsa_core.selection import Selection, SelectionRule
from nsa_core.seqs import Seqs


class SparseAttention(nn.Module):
    """NSA attention over x (batch, seq, dim): see the module docstring; the arguments are
    NSAConfig's plus the two pluggable networks (`compress_mlp`, `strategy_combine_mlp`)."""

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
        independent_kv: bool = False,
        gate_biases: tuple[float, float, float] = DEFAULT_GATE_BIASES,
        num_forced_initial_blocks: int = 0,
        num_forced_local_blocks: int = 0,
        importance_score: str = "mean_logits",
        selected_key_slots: int = 0,
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
            independent_kv=independent_kv, gate_biases=gate_biases, num_forced_initial_blocks=num_forced_initial_blocks,
            num_forced_local_blocks=num_forced_local_blocks, importance_score=importance_score,
            selected_key_slots=selected_key_slots,
        )
        for name, module in (("compress_mlp", compress_mlp), ("strategy_combine_mlp", strategy_combine_mlp)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module or None, got {type(module).__name__}")
        self.config = cfg
        kv_heads = cfg.num_kv_heads

        self.norm = nn.RMSNorm(dim) if norm else nn.Identity()
        self.rotary_emb = RotaryEmbedding(dim_head)
        # q, then k and v: one pair, or with independent_kv one pair per branch (compressed, selected, window)
        self.to_qkv = nn.Linear(dim, (heads + 2 * self.kv_branches * kv_heads) * dim_head, bias=False)

        self.compress_mem_kv = nn.Parameter(torch.zeros(2, kv_heads, num_compressed_mem_kv, dim_head))
        self.k_intrablock_positions = nn.Parameter(torch.zeros(kv_heads, compress_block_size, dim_head))
        self.v_intrablock_positions = nn.Parameter(torch.zeros(kv_heads, compress_block_size, dim_head))
        if compress_mlp is None:
            compress_mlp = default_compress_mlp(dim_head, compress_block_size, compress_mlp_expand_factor)
        self.k_compress = copy.deepcopy(compress_mlp)
        self.v_compress = copy.deepcopy(compress_mlp)

        if strategy_combine_mlp is None:
            strategy_combine_mlp = nn.Linear(dim, 3 * heads)
            nn.init.zeros_(strategy_combine_mlp.weight)
            with torch.no_grad():
                strategy_combine_mlp.bias.copy_(torch.tensor(list(cfg.gate_biases) * heads))
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

    # read from the config ----------------------------------------------------------------------

    @property
    def heads(self) -> int:
        return self.config.heads

    @property
    def kv_heads(self) -> int:
        return self.config.num_kv_heads

    @property
    def dim_head(self) -> int:
        return self.config.dim_head

    @property
    def kv_branches(self) -> int:
        """Key / value projections: 3 with independent_kv (one per branch), else 1."""
        return 3 if self.config.independent_kv else 1

    @property
    def stride(self) -> int:
        return self.config.stride

    @property
    def scale(self) -> float:
        return self.config.dim_head ** -0.5

    @property
    def selection_rule(self) -> SelectionRule:
        cfg = self.config
        return SelectionRule(
            num_selected=cfg.num_selected_blocks, selection_block_size=cfg.selection_block_size, stride=cfg.stride,
            group_size=cfg.group_size, share_across_group=cfg.query_heads_share_selected_kv,
            interpolated=cfg.interpolated_importance_score, use_diff_topk=cfg.use_diff_topk, causal=cfg.causal,
            scale=self.scale, forced_initial=cfg.num_forced_initial_blocks, forced_local=cfg.num_forced_local_blocks,
            importance=cfg.importance_score, compress_block=cfg.compress_block_size,
            selected_key_slots=cfg.selected_key_slots,
        )

    # pieces ------------------------------------------------------------------------------------

    def check_input(self, inp: Tensor) -> None:
        dim = self.config.dim
        if not isinstance(inp, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(inp).__name__}")
        if inp.ndim != 3:
            raise ValueError(f"input must have shape (batch, seq, dim={dim}), got {tuple(inp.shape)}")
        if inp.shape[-1] != dim:
            raise ValueError(f"input last dim must be dim={dim}, got {inp.shape[-1]}")
        if not inp.dtype.is_floating_point:
            raise TypeError(f"input must be a floating tensor, got {inp.dtype}")
        if inp.shape[0] < 1:
            raise ValueError(f"input must hold at least one sequence (batch >= 1), got shape {tuple(inp.shape)}")
        if inp.shape[1] < 1:
            raise ValueError("input must hold at least one token (seq >= 1)")

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed input (b, n, dim) -> q (b, h, n, d), k and v (b, branches * hk, n, d): with
        independent_kv the compressed, selected and window branches' heads one after the other
        (split_branches takes them apart)."""
        d, h, hk = self.dim_head, self.heads, self.kv_heads * self.kv_branches
        q, k, v = self.to_qkv(x).split((h * d, hk * d, hk * d), dim=-1)
        return tuple(t.unflatten(-1, (-1, d)).transpose(1, 2) for t in (q, k, v))

    def branch_kv(self, k: Tensor, v: Tensor) -> tuple[tuple[Tensor, Tensor], ...]:
        """project's k, v -> the (k, v) of the compressed, selected and window branches."""
        return split_branches(k, v, self.config.independent_kv)

    def compress_windows(self, windows_k: Tensor, windows_v: Tensor) -> tuple[Tensor, Tensor]:
        """Windows (b, hk, c, compress_block_size, d) -> compressed tokens (b, hk, c, d)."""
        return compress_windows(windows_k, windows_v, k_positions=self.k_intrablock_positions,
                                v_positions=self.v_intrablock_positions, k_net=self.k_compress, v_net=self.v_compress)

    def mlp_compression(self) -> MLPCompression | None:
        """The compression's tensors when both networks are the default MLP (a decoding step's fused
        compression reads them: ops/window_compression.py), else None."""
        k_layers, v_layers = default_mlp_layers(self.k_compress), default_mlp_layers(self.v_compress)
        if k_layers is None or v_layers is None:
            return None
        return MLPCompression(self.k_intrablock_positions, self.v_intrablock_positions, k_layers, v_layers)

    def combine_gates(self, x_normed: Tensor) -> CombineGates:
        """The combine's gates of x_normed (b, n, dim), computed by the op that reads them: with the linear
        layer's weight and bias where the gate network is the default one (nn.Linear, nn.Sigmoid, the head
        split) and no hook watches it (a decoding step's fused combine computes them in its launch)."""
        network = self.to_strategy_combine
        parts = list(network) if isinstance(network, nn.Sequential) else []
        default = (len(parts) == 3 and type(parts[0]) is nn.Linear and type(parts[1]) is nn.Sigmoid
                   and isinstance(parts[2], Rearrange))
        if not default or _hooked(network, *parts):
            return CombineGates(x_normed, network)
        return CombineGates(x_normed, network, parts[0].weight, parts[0].bias)

    def compress(self, k: Tensor, v: Tensor, seqs: Seqs | None = None) -> tuple[Tensor, Tensor]:
        """Unrotated k, v (b, hk, n, d) -> compressed (b, hk, c, d), c = n // stride (packed documents:
        c slots, each document's compressed tokens from its own windows; model/compression.py)."""
        block, stride = self.config.compress_block_size, self.stride
        if k.shape[-2] < stride:
            empty = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[-1])
            return empty, empty.clone()
        return self.compress_windows(compression_windows(k, block, stride, seqs), compression_windows(v, block, stride, seqs))

    def rotate(self, t: Tensor, positions: Tensor) -> Tensor:
        """Rotary embedding of t (..., n, d) whose tokens sit at `positions` (n,), or of t (b, h, n, d)
        whose rows sit at different positions (b, n) (a decoding step)."""
        if positions.ndim == 2:
            return rotary_at_positions(t, positions, self.rotary_emb.freqs, backend=self.config.backend)
        cos, sin = self.rotary_emb.tables(positions, t.dtype)
        return rotary(t, cos, sin, backend=self.config.backend)

    def keys_of(self, k: Tensor, v: Tensor, seqs: Seqs | None = None) -> BranchKeys:
        """The branches' keys for whole sequences (or packed documents, `seqs`): unrotated k, v
        (b, branches * hk, n, d) as project gives them."""
        seqs = Seqs.batch(k.shape[-2]) if seqs is None else seqs
        (kc, vc), (ks, vs), (kw, vw) = self.branch_kv(k, v)
        ck, cv = with_memory(self.compress_mem_kv, *self.compress(kc, vc, seqs))
        positions = seqs.key_positions(k.device)
        rotated = self.rotate(ks, positions)
        window = (self.rotate(kw, positions), vw) if self.config.independent_kv else (None, None)
        return BranchKeys(ck, cv, rotated, vs, *window, selection_keys=self.selection_keys_of(rotated, seqs))

    def selection_keys_of(self, rotated_k: Tensor, seqs: Seqs | None = None) -> Tensor | None:
        """What the selection scores when it is not the compressed keys: with importance "selected_keys"
        (or selected_key_slots) the selected branch's block keys of its rotated keys (b, hk, n, d)
        (model/selection_keys.py); else None. Built without gradient unless use_diff_topk's gates need it."""
        cfg = self.config
        if not cfg.scores_block_keys:
            return None
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.use_diff_topk):
            return block_mean_keys(rotated_k, cfg.selection_block_size, seqs)

    # the branches --------------------------------------------------------------------------------

    def selected_branch(self, q: Tensor, keys: BranchKeys, selection: Selection | None, seqs: Seqs) -> Tensor:
        """Attention over the selected blocks (plus the own block when causal). Rotated q."""
        cfg = self.config
        k, v = keys.rotated_k, keys.v
        common = dict(block_size=cfg.selection_block_size, scale=self.scale, backend=cfg.backend)
        if not cfg.causal:  # the oracle's padding and empty selections, per sequence
            return padded_selected_attention(q, k, v, selection, num_selected=cfg.num_selected_blocks,
                                             stride=self.stride, seqs=seqs, **common)
        if selection is None:
            none = torch.zeros(q.shape[0], self.kv_heads, q.shape[-2], 0, dtype=torch.long, device=q.device)
            return selected_attention(q, k, v, none, causal=True, seqs=seqs, **common)
        return selected_attention(q, k, v, selection.indices, valid=selection.valid, gates=selection.gates,
                                  causal=True, seqs=seqs, **common)

    def window_branch(self, q: Tensor, keys: BranchKeys, seqs: Seqs) -> Tensor:
        """Sliding-window attention. Rotated q."""
        cfg = self.config
        common = dict(window=cfg.sliding_window_size, scale=self.scale, seqs=seqs, backend=cfg.backend)
        if cfg.causal:
            return sliding_window_attention(q, keys.window_k, keys.window_v, causal=True, **common)
        return padded_window_attention(q, keys.window_k, keys.window_v, **common)  # the oracle's padding

    # forward -------------------------------------------------------------------------------------

    def attend(self, x_normed: Tensor, q: Tensor, keys: BranchKeys, seqs: Seqs) -> Tensor:
        """The three branches and their gated combine: q (b, h, n, d) unrotated, at the positions
        `seqs` gives -> (b, n, dim). The same line for every pass: `keys` in tensors (keys_of) or in a
        cache's pages with a decoding-step `seqs` (NSACache.branch_keys); the ops tell them apart."""
        cfg = self.config
        q_rot = self.rotate(q, seqs.query_positions(q.device))
        compressed, selection = compressed_selection(  # selection_keys None: the selection scores the compressed keys
            q, keys.compressed_k, keys.compressed_v, keys.selection_keys, self.selection_rule,
            num_memory=cfg.num_compressed_mem_kv, causal=cfg.causal, scale=self.scale, seqs=seqs, backend=cfg.backend,
            selection_q=q_rot)
        gates = self.combine_gates(x_normed)  # (b, h, n, 3) once computed
        combined = selected_window_combine_step(  # a decoding step over pages: both branches and the combine fused
            q_rot, keys.rotated_k, keys.v, keys.window_k, keys.window_v, selection, compressed, gates,
            block_size=cfg.selection_block_size, window=cfg.sliding_window_size, scale=self.scale, seqs=seqs,
            backend=cfg.backend)
        if combined is None:  # every other pass: the branch ops, then the combine
            fine = self.selected_branch(q_rot, keys, selection, seqs)
            sliding = self.window_branch(q_rot, keys, seqs)
            combined = combine(compressed, fine, sliding, gates.tensor(), backend=cfg.backend)
        return self.combine_heads(combined.flatten(-2))

    def attend_projected(self, x_normed: Tensor, q: Tensor, k: Tensor, v: Tensor, seqs: Seqs | None = None) -> Tensor:
        """Everything after the projections for whole sequences (or the packed documents `seqs`):
        q (b, h, n, d), unrotated k, v."""
        seqs = Seqs.batch(q.shape[-2]) if seqs is None else seqs
        return self.attend(x_normed, q, self.keys_of(k, v, seqs), seqs)

    @torch.no_grad()
    def select(self, inp: Tensor) -> Selection | None:
        """The block selection of every query of inp (b, n, dim): indices / valid (b, H, n, S), or None."""
        self.check_input(inp)
        backend = self.config.backend
        q, k, v = self.project(self.norm(inp))
        (kc, vc), (ks, _), _ = self.branch_kv(k, v)
        positions = torch.arange(inp.shape[1], device=inp.device)
        selection = None
        for rule, by_block_keys in self.selection_rule.scored_parts():
            if by_block_keys:  # the rotated queries score the selected branch's block keys
                part = select_blocks(self.rotate(q, positions), self.selection_keys_of(self.rotate(ks, positions)),
                                     rule, backend=backend)
            else:
                part = select_blocks(q, self.compress(kc, vc)[0], rule, backend=backend)
            selection = merge_selection_slots(selection, part, backend=backend)
        return selection

    def new_cache(self, batch_size: int, max_seq_len: int, *, device=None, dtype=None) -> NSACache:
        """An empty static decoding cache for batch_size sequences of up to max_seq_len tokens
        (default device and dtype: the module's). Fill it with a prompt, then decode."""
        weight = self.to_qkv.weight
        return NSACache.allocate(self.config, batch_size, max_seq_len, device=weight.device if device is None else device,
                                 dtype=weight.dtype if dtype is None else dtype)

    def forward(self, inp: Tensor, cache: NSACache | None = None, return_cache: bool = False, *,
                lengths: Tensor | None = None, cu_seqlens: Tensor | None = None, sequence_parallel_group=None,
                sequence_parallel_layout: str | None = None):
        """inp (batch, seq, dim) -> (batch, seq, dim); with return_cache also the decoding cache.

        cu_seqlens (num_docs + 1,) int32 / int64 on inp's device: inp (1, total, dim) holds documents one
        after the other, document i at tokens cu_seqlens[i] ... cu_seqlens[i + 1] - 1 (0 first, never
        decreasing, total last; empty documents allowed). The output equals running every document
        alone: no branch lets a token see another document (nsa_core/seqs.py).

        With a cache (causal modules only; model/decode.py): an empty cache takes inp as
        the prompt (its rows right-padded to `lengths` valid tokens, if given) through the parallel
        pass; a filled one takes inp as the next tokens of every sequence. return_cache without a
        cache makes one that grows as needed.

        With `sequence_parallel_group` (a torch.distributed ProcessGroup of P ranks), inp is this
        rank's shard of the sequence, (batch, seq / P, dim), and the output is its shard
        (model/sequence_parallel.py). `sequence_parallel_layout`: "balanced" (the default, None),
        the sequence cut into 2P chunks and rank r holding chunk r then chunk 2P - 1 - r (equal work
        on every rank; seq divisible by 2P, a ValueError otherwise); or "contiguous", rank r holding
        tokens r * seq / P ... (any seq divisible by P).
        nsa_core.distributed.shard_sequence / unshard_sequence cut and reassemble shards."""
        self.check_input(inp)
        mode = forward_mode(cache=cache, return_cache=return_cache, lengths=lengths, cu_seqlens=cu_seqlens,
                            causal=self.config.causal, group=sequence_parallel_group, layout=sequence_parallel_layout)
        if mode == SHARDED:
            return sequence_parallel_forward(self, inp, sequence_parallel_group,
                                             resolve_layout(sequence_parallel_layout, sequence_parallel_group))
        if mode == CACHED:
            return run_with_cache(self, inp, cache, return_cache, lengths)
        seqs = packed_seqs(cu_seqlens, inp)
        x = self.norm(inp)
        q, k, v = self.project(x)
        return self.attend_projected(x, q, k, v, seqs)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"heads={c.heads}, kv_heads={c.num_kv_heads}, dim_head={c.dim_head}, causal={c.causal}, "
            f"compress={c.compress_block_size}/{c.stride}, selection={c.selection_block_size}x{c.num_selected_blocks}, "
            f"window={c.sliding_window_size}, backend={c.backend!r}"
        )


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook (the modules' own, or a global one) would see these modules' calls."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
