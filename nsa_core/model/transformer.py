"""A small language model built from SparseAttention (examples and end-to-end tests).

Same layout as native-sparse-attention-pytorch's Transformer: token embedding, `depth` blocks of
(pre-normed attention + residual, pre-normed GELU feed-forward + residual), final RMSNorm, logits.

Packed documents (`cu_seqlens`, ids of batch 1): every layer keeps each document to itself (sparse
layers through their ops, dense layers through ops/document_attention.py, one FlexAttention call on
CUDA; rotary positions restart at each document), and the loss never predicts a document's first
token from the previous document.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nsa_core.distributed.sequence_parallel import DEFAULT_LAYOUT, resolve_layout, shard_spans, unshard_sequence
from nsa_core.model.attention import SparseAttention
from nsa_core.model.dense import DenseAttention
from nsa_core.model.generation import generate
from nsa_core.model.modes import CACHED, SHARDED, forward_mode, packed_seqs
from nsa_core.ops.validation import check_positive_int
from nsa_core.sampling import sample

DEFAULT_SPARSE_KWARGS = dict(
    sliding_window_size=32, compress_block_size=4, selection_block_size=4, num_selected_blocks=4
)


def FeedForward(dim: int, expansion_factor: float = 4.0) -> nn.Sequential:
    hidden = int(dim * expansion_factor)
    return nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Transformer(nn.Module):
    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        kv_heads: int | None = None,
        ff_expansion_factor: float = 4.0,
        use_sparse_attn: bool = False,
        causal: bool = True,
        sparse_attn_kwargs: dict | None = None,
    ):
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth)):
            check_positive_int(name, value)
        sparse_attn_kwargs = dict(DEFAULT_SPARSE_KWARGS if sparse_attn_kwargs is None else sparse_attn_kwargs)
        self.causal, self.use_sparse_attn = causal, use_sparse_attn
        self.token_emb = nn.Embedding(num_tokens, dim)
        layers = []
        for _ in range(depth):
            if use_sparse_attn:
                attn = SparseAttention(dim=dim, dim_head=dim_head, heads=heads, kv_heads=kv_heads, causal=causal, **sparse_attn_kwargs)
            else:
                attn = DenseAttention(dim, dim_head=dim_head, heads=heads, causal=causal, kv_heads=kv_heads)
            layers.append(nn.ModuleList([attn, FeedForward(dim, ff_expansion_factor)]))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def new_cache(self, batch_size: int, max_seq_len: int, *, device=None, dtype=None) -> list:
        """One empty static cache per layer (NSACache for sparse layers, DenseCache for dense ones)."""
        return [attn.new_cache(batch_size, max_seq_len, device=device, dtype=dtype) for attn, _ in self.layers]

    def forward(self, ids: Tensor, return_loss: bool = False, cache: list | None = None, return_cache: bool = False,
                *, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None, sequence_parallel_group=None,
                sequence_parallel_layout: str | None = None):
        """ids (b, n) -> logits (b, n, num_tokens); with return_loss the next-token cross entropy.

        With `cache` (a list from new_cache or return_cache=True; causal models), an empty cache takes
        ids as the prompt (rows right-padded to `lengths`), a filled one as the next tokens.
        With `cu_seqlens` (num_docs + 1,), ids (1, total) holds packed documents (SparseAttention.forward
        gives the rule): the logits equal each document's alone, and with return_loss the mean is
        over the next-token terms within documents (the last token of one document does not
        predict the first of the next).
        With `sequence_parallel_group` (sparse attention only), ids is this rank's shard of the
        sequence (b, n / P) in `sequence_parallel_layout` ("balanced", the default: chunks r and
        2P - 1 - r of 2P; "contiguous": rank r holding tokens r * n / P ...; SparseAttention.forward and
        nsa_core.distributed.shard_sequence): the logits are the shard's; with return_loss the shard's
        inputs are all its tokens, the target of each contiguous piece's last token is the first
        token of the next piece in sequence order, and the loss returned is this rank's share (its
        summed cross entropy over the b * (n - 1) targets of the whole sequence): summed over the
        ranks it is the mean loss of the whole sequence, and so are the gradients (FSDP / DDP
        average them: scale by P)."""
        if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be an integer tensor of shape (batch, seq), got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[0] < 1:
            raise ValueError(f"ids must hold at least one sequence (batch >= 1), got shape {tuple(ids.shape)}")
        mode = forward_mode(cache=cache, return_cache=return_cache, lengths=lengths, cu_seqlens=cu_seqlens,
                            causal=self.causal, group=sequence_parallel_group, layout=sequence_parallel_layout)
        cached = mode == CACHED
        if cache is not None and (not isinstance(cache, list) or len(cache) != len(self.layers)):
            raise ValueError(f"cache must be a list of {len(self.layers)} layer caches (from new_cache or return_cache=True)")
        if mode == SHARDED:
            if not self.use_sparse_attn:
                raise ValueError("sequence_parallel_group needs use_sparse_attn=True (dense layers take no shards)")
            return self._forward_shard(ids, return_loss, sequence_parallel_group,
                                       resolve_layout(sequence_parallel_layout, sequence_parallel_group))
        packed = {}
        if cu_seqlens is not None:
            packed_seqs(cu_seqlens, ids[..., None])  # validates once, with the argument's name
            packed = dict(cu_seqlens=cu_seqlens)
        if return_loss:
            if cu_seqlens is not None:
                labels = _labels_within_documents(ids, cu_seqlens)
                packed = dict(cu_seqlens=cu_seqlens.clamp(max=ids.shape[1] - 1))  # the last token is a label only
            else:
                labels = ids[:, 1:]
            ids = ids[:, :-1]
        x = self.token_emb(ids)
        next_cache = []
        for i, (attn, ff) in enumerate(self.layers):
            if cached:
                out, layer_cache = attn(x, cache=None if cache is None else cache[i], return_cache=True, lengths=lengths)
                next_cache.append(layer_cache)
            else:
                out = attn(x, **packed)
            x = x + out
            x = x + ff(x)
        logits = self.to_logits(self.norm(x))
        if return_loss:
            return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE)
        return (logits, next_cache) if return_cache else logits

    def _forward_shard(self, ids: Tensor, return_loss: bool, group, layout: str) -> Tensor:
        """forward for this rank's shard ids (b, nl) of a sequence split over `group` in `layout`."""
        x = self.token_emb(ids)
        for attn, ff in self.layers:
            x = x + attn(x, sequence_parallel_group=group, sequence_parallel_layout=layout)
            x = x + ff(x)
        logits = self.to_logits(self.norm(x))
        if not return_loss:
            return logits
        labels, num_targets = shard_targets(ids, group, layout)
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum")
        return loss / num_targets

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, lengths: Tensor | None = None, cuda_graph: bool | None = None) -> Tensor:
        """Continue every row of prompt (b, n) by max_new_tokens tokens -> (b, max_new_tokens).
        temperature 0: greedy; else each token is drawn from softmax(logits / temperature) within the
        top_k likeliest and the smallest set reaching probability top_p (nsa_core/sampling.py).
        `lengths`: each row's valid prompt tokens, 1..n (right-padded rows). On the static cache; on
        CUDA the decoding step runs as a CUDA graph (cuda_graph=None: on CUDA): model/generation.py."""
        return generate(self, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        lengths=lengths, cuda_graph=cuda_graph)

    @torch.no_grad()
    def sample(self, prompt: Tensor, seq_len: int, temperature: float = 1.0, filter_thres: float = 0.9, use_cache_kv: bool = False) -> Tensor:
        """Continue `prompt` (b, n) up to `seq_len` tokens in all; returns the new tokens only (the
        native-sparse-attention-pytorch API). temperature <= 0 is greedy; else a draw among the
        ceil((1 - filter_thres) * num_tokens) likeliest tokens. use_cache_kv decodes one token at a
        time against the cache."""
        if use_cache_kv and not self.causal:
            raise ValueError("use_cache_kv needs causal=True")
        if isinstance(filter_thres, bool) or not isinstance(filter_thres, (int, float)) or not 0 <= filter_thres < 1:
            raise ValueError(f"filter_thres must be a number in [0, 1), got {filter_thres!r}")
        vocab = self.to_logits.out_features
        top_k = min(vocab, max(1, math.ceil((1 - filter_thres) * vocab)))
        temperature = 0.0 if isinstance(temperature, (int, float)) and temperature <= 0 else temperature  # greedy
        out = prompt.clone()
        cache = None
        for _ in range(max(0, seq_len - prompt.shape[-1])):
            if use_cache_kv:
                step_ids = out if cache is None else out[:, -1:]
                logits, cache = self.forward(step_ids, cache=cache, return_cache=True)
            else:
                logits = self.forward(out)
            out = torch.cat((out, sample(logits[:, -1], temperature, top_k)), dim=-1)
        return out[:, prompt.shape[-1]:]


IGNORE = -100  # cross-entropy label of a term that does not count


def shard_targets(ids: Tensor, group, layout: str = DEFAULT_LAYOUT) -> tuple[Tensor, int]:
    """Next-token targets of this rank's shard ids (b, nl): each contiguous piece of the shard (one,
    balanced two) shifted by one, then the first token of the piece that follows it in sequence
    order (IGNORE after the sequence's last token); and the number of targets of the whole
    sequence, b * (n - 1). One tiny all-gather of every piece's first token."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = ids.shape[1] * world
    spans = shard_spans(n, world, rank, layout)
    piece = spans[0][1] - spans[0][0]
    firsts = [torch.empty_like(ids[:, ::piece]) for _ in range(world)]  # (b, pieces) per rank
    dist.all_gather(firsts, ids[:, ::piece].contiguous(), group=group)
    heads = unshard_sequence(firsts, layout, dim=1)  # (b, 2P or P): every piece's first token, in sequence order
    labels = []
    for i, (start, _) in enumerate(spans):
        following = start // piece + 1  # the piece after this one in sequence order
        after = heads[:, following : following + 1] if following < heads.shape[1] else torch.full_like(ids[:, :1], IGNORE)
        labels += [ids[:, i * piece + 1 : (i + 1) * piece], after]
    return torch.cat(labels, dim=1), ids.shape[0] * (n - 1)


def _labels_within_documents(ids: Tensor, cu_seqlens: Tensor) -> Tensor:
    """ids (1, total) packed -> next-token labels (1, total - 1), IGNORE where the next token starts a document."""
    total = ids.shape[1]
    starts = torch.zeros(total + 1, dtype=torch.bool, device=ids.device)
    starts[cu_seqlens.long()] = True  # a document of length 0 may start at total: the extra slot takes it
    return torch.where(starts[1:total], torch.full_like(ids[:, 1:], IGNORE), ids[:, 1:])
