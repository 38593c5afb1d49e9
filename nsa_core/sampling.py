"""The library's one sampler: next tokens from last-position logits, greedy at temperature 0, else a
draw from softmax(logits / temperature) restricted to the top_k likeliest tokens and to the
smallest set whose probability reaches top_p (nucleus). Transformer.generate, Transformer.sample and
the decode timing all draw through `sample`; `check_sampling` validates their arguments once, before
any work.

The draw is the exponential race (equivalent to Gumbel-max): argmax(logits - log(E)) with
E ~ Exp(1) per token, no host synchronisation, so it can follow a CUDA-graphed decoding step.

Dimension legend: B rows (batch), V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab: int) -> None:
    """ValueError naming the argument when temperature, top_k or top_p is outside what `sample` takes."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or an int in 1..{vocab} (the vocabulary), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """logits (B, V) float -> the same with -inf outside the top_k likeliest tokens and outside the
    smallest set of likeliest tokens whose probability reaches top_p (the likeliest always stays;
    ties at the k-th logit are all kept)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the probability of the tokens likelier than each
        drop_sorted = before >= top_p  # the set already reached top_p without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, *,
           generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> next tokens (B, 1) int64: argmax at temperature 0, else one draw per row from
    softmax(logits / temperature) within top_k / top_p (filter_logits). Arguments as check_sampling."""
    check_sampling(temperature, top_k, top_p, logits.shape[-1])
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    race = torch.empty_like(logits).exponential_(generator=generator)
    race = race.clamp_(min=torch.finfo(race.dtype).tiny)  # E > 0: the noise below stays finite
    return (logits - race.log()).argmax(dim=-1, keepdim=True)
