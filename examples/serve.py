"""A small serving loop over PagedCache (nsa_core/serving): continuous batching of greedy requests.

N requests of different prompt and output lengths share a fixed number of batch slots: a request
waits until a slot is free and the page pool can hold its whole sequence (prompt + new tokens), is
prefilled alone (in chunks of --prefill-chunk tokens when given), then joins the batch that takes one
decoding step per round; it leaves when its last token is drawn, and its pages go back to the pool.
Every request gets exactly the tokens `Transformer.generate(prompt, n, temperature=0)` gives it alone.

    python examples/serve.py --requests 8 --slots 3 --check

Dimension legend: B running requests, n prompt tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nsa_core import Transformer
from nsa_core.sampling import sample
from nsa_core.serving.paged_cache import PagedCache


@dataclass(eq=False)
class Request:
    prompt: Tensor  # (n,) token ids
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)  # drawn so far
    slot: int | None = None


class Engine:
    """Serves requests greedily over `slots` batch slots and a pool of `num_pages` token pages."""

    def __init__(self, model: Transformer, *, slots: int, max_seq_len: int, num_pages: int,
                 prefill_chunk: int | None = None):
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive int or None, got {prefill_chunk!r}")
        self.model, self.prefill_chunk = model, prefill_chunk
        self.cache = PagedCache.for_model(model, slots=slots, max_seq_len=max_seq_len, num_pages=num_pages)
        self.steps = 0  # decoding rounds taken

    def _budget(self, request: Request) -> int:
        return self.cache.pages_for(request.prompt.numel() + request.max_new_tokens)

    def _check(self, request: Request) -> None:
        total = request.prompt.numel() + request.max_new_tokens
        if request.prompt.ndim != 1 or request.prompt.numel() < 1 or request.max_new_tokens < 1:
            raise ValueError("a request needs a prompt of shape (n,), n >= 1, and max_new_tokens >= 1")
        if total > self.cache.max_seq_len:
            raise ValueError(f"a request of {total} tokens does not fit max_seq_len={self.cache.max_seq_len}")
        if self._budget(request) > self.cache.token_pool.num_pages - 1:
            raise ValueError(f"a request of {total} tokens needs {self._budget(request)} pages, more than the pool "
                             f"of num_pages={self.cache.token_pool.num_pages} holds (one is the null page)")

    def _prefill(self, request: Request) -> None:
        slot = request.slot = self.cache.open()
        prompt = request.prompt.to(self.cache.device)[None]
        chunk = self.prefill_chunk or prompt.shape[1]
        for start in range(0, prompt.shape[1], chunk):
            logits = self.cache.run(self.model, prompt[:, start : start + chunk], [slot])
        request.tokens.append(int(sample(logits[:, -1], 0.0)))

    @torch.no_grad()
    def serve(self, requests: list[Request]) -> list[list[int]]:
        """The new tokens of every request, in the order given."""
        for r in requests:
            self._check(r)
        waiting, running = deque(requests), []
        budgeted = 0  # pages the running requests may still take up to
        while waiting or running:
            while waiting and self.cache.free_slots and budgeted + self._budget(waiting[0]) <= self.cache.token_pool.num_pages - 1:
                request = waiting.popleft()
                budgeted += self._budget(request)
                self._prefill(request)
                running.append(request)
            for r in [r for r in running if len(r.tokens) == r.max_new_tokens]:  # done: leave, free the pages
                running.remove(r)
                self.cache.close(r.slot)
                budgeted -= self._budget(r)
            if not running:
                continue
            ids = torch.tensor([[r.tokens[-1]] for r in running], device=self.cache.device)
            logits = self.cache.run(self.model, ids, [r.slot for r in running])
            for r, token in zip(running, sample(logits[:, -1], 0.0)[:, 0].tolist()):
                r.tokens.append(token)
            self.steps += 1
        return [r.tokens for r in requests]


def random_requests(count: int, vocab: int, *, max_prompt: int, max_new: int, seed: int) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_prompt + 1, (count,), generator=g).tolist()
    news = torch.randint(1, max_new + 1, (count,), generator=g).tolist()
    return [Request(torch.randint(0, vocab, (n,), generator=g), m) for n, m in zip(lengths, news)]


def tiny_model(vocab: int = 64, *, seed: int = 0, dtype=torch.float32, device="cpu") -> Transformer:
    """A random-weight Transformer of sparse layers (6 query heads over 2 kv heads)."""
    torch.manual_seed(seed)
    model = Transformer(num_tokens=vocab, dim=32, depth=2, heads=6, kv_heads=2, dim_head=8, use_sparse_attn=True,
                        sparse_attn_kwargs=dict(sliding_window_size=5, compress_block_size=8,
                                                compress_block_sliding_stride=4, selection_block_size=8,
                                                num_selected_blocks=2))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval().to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--pages", type=int, default=64, help="token pages in the pool")
    parser.add_argument("--max-prompt", type=int, default=40)
    parser.add_argument("--max-new", type=int, default=24)
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=False,
                        help="compare every request with generate alone")
    args = parser.parse_args()
    model = tiny_model(device=args.device)
    requests = random_requests(args.requests, model.to_logits.out_features, max_prompt=args.max_prompt,
                               max_new=args.max_new, seed=args.seed)
    engine = Engine(model, slots=args.slots, max_seq_len=args.max_prompt + args.max_new, num_pages=args.pages,
                    prefill_chunk=args.prefill_chunk)
    start = time.perf_counter()
    outputs = engine.serve(requests)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = sum(len(o) for o in outputs)
    print(f"{len(requests)} requests over {args.slots} slots: {generated} tokens in {engine.steps} decoding rounds, "
          f"{seconds:.3f} s, {generated / seconds:.1f} tokens/s (prefill included)")
    if args.check:
        for i, (r, out) in enumerate(zip(requests, outputs)):
            alone = model.generate(r.prompt[None].to(args.device), r.max_new_tokens, temperature=0)[0].tolist()
            print(f"request {i}: prompt {r.prompt.numel():3d}, new {r.max_new_tokens:3d}: "
                  f"{'equal' if alone == out else 'DIFFERENT'} to generate alone")
            if alone != out:
                raise SystemExit(1)


if __name__ == "__main__":
    main()
