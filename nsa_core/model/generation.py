"""The Transformer's generation pass (Transformer.generate): prefill the prompt into static caches,
then one decoding step per new token, each drawn by the sampler (nsa_core/sampling.py); on CUDA the
step is captured once in a CUDA graph (nsa_core/cuda_graph.py) and replayed (static input buffer,
caches written in place, positions read from the caches' device-side lengths). The caches are moved
only through their API (model/cache.py's StepCache).

Dimension legend: B batch, n prompt tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.cuda_graph import capture
from nsa_core.model.lengths import prompt_lengths
from nsa_core.sampling import check_sampling, sample


def _check(prompt: Tensor, max_new_tokens: int) -> None:
    if not isinstance(prompt, Tensor) or prompt.ndim != 2 or prompt.dtype not in (torch.int32, torch.int64):
        raise ValueError("prompt must be an integer tensor of shape (batch, seq)")
    if prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must hold at least one row and one token, got shape {tuple(prompt.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


class GraphedStep:
    """model(ids (B, 1), cache=caches) -> last logits (B, V), replayed from one CUDA graph capture.
    A replay runs device work only, so the caches' host-side counts move here."""

    def __init__(self, model, caches: list, example: Tensor):
        self.model, self.caches = model, caches
        self.ids = example.clone()
        saved = [cache.snapshot() for cache in caches]

        def restore() -> None:  # the warm-up wrote one token (the first replay rewrites it) and the
            for cache, state in zip(caches, saved):  # capture counted one on the host: take them back
                cache.restore(state)

        self.graph, self.logits = capture(lambda: model(self.ids, cache=caches)[:, -1], after_warmup=restore)
        restore()

    def __call__(self, ids: Tensor) -> Tensor:
        for cache in self.caches:
            cache.reserve(1)
        self.ids.copy_(ids)
        self.graph.replay()
        for cache in self.caches:
            cache.count_replayed(1)
        return self.logits


@torch.no_grad()
def generate(model, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, lengths: Tensor | None = None, cuda_graph: bool | None = None) -> Tensor:
    """See Transformer.generate."""
    _check(prompt, max_new_tokens)
    check_sampling(temperature, top_k, top_p, model.to_logits.out_features)
    B, n = prompt.shape
    lengths = prompt_lengths(lengths, B, n, prompt.device)  # checked here, before the caches are allocated
    caches = model.new_cache(B, n + max_new_tokens, device=prompt.device)
    logits = model(prompt, cache=caches, lengths=lengths)
    token = sample(logits[torch.arange(B, device=prompt.device), lengths - 1], temperature, top_k, top_p)
    tokens = [token]
    use_graph = prompt.is_cuda if cuda_graph is None else cuda_graph
    if use_graph and max_new_tokens > 1:
        if not prompt.is_cuda:
            raise ValueError("cuda_graph=True needs the model and the prompt on a CUDA device")
        step = GraphedStep(model, caches, token)
    else:
        def step(ids: Tensor) -> Tensor:
            return model(ids, cache=caches)[:, -1]
    for _ in range(max_new_tokens - 1):
        token = sample(step(token), temperature, top_k, top_p)
        tokens.append(token)
    return torch.cat(tokens, dim=1)
