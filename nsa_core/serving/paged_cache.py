"""PagedCache: the decoding caches of a model's sparse layers over shared page pools, for a serving
loop (continuous batching): a fixed number of sequence slots that sequences take and give back
between steps, each slot with its own row of the block tables; the pages of a sequence are
allocated as it grows and returned to the pool when it leaves.

What is shared and what stays per slot (S slots, P token pages, CP compressed pages, HKV kv heads,
D head dim, NP = ceil(max_seq_len / page) logical pages, NCP logical compressed pages):
- token pages: per layer the k / v pools (P, HKV, page, D) (and independent_kv's window k / v,
  importance "selected_keys"' block key per page (P, HKV, D)),
  one block table (S, NP) for all layers (they grow in step); page 0 is the null page every
  unallocated entry points at (page_pool.py);
- compressed pages: per layer the ck / cv pools (CP, HKV, 64, D), one compressed table
  (S, NCP + 1) whose last column is always the null page: it takes a step's scratch-slot writes;
- per slot: lengths (S,) and the compression ring (S, HKV, R, D), R = compress_block_size tokens.
A forward's rows gather their ring into an NSACache view before it and put it back after it.

`run(module, inp, slots)` drives a forward of the module (the Transformer or one SparseAttention)
over some slots: empty slots are prefilled (inp their prompts), filled ones take a step of K tokens
each (decoding, or the next chunk of a prompt: chunked prefill). Pages for every token it writes are
allocated first, so an exhausted pool raises a ValueError before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nsa_core.config import NSAConfig
from nsa_core.model.attention import SparseAttention
from nsa_core.model.cache import COMPRESSED_PAGE, NSACache
from nsa_core.serving.page_pool import NULL_PAGE, PagePool


@dataclass
class _LayerStore:
    """One layer's pools and per-slot state."""

    k_pages: Tensor
    v_pages: Tensor
    ck_pages: Tensor
    cv_pages: Tensor
    ring_keys: Tensor
    ring_values: Tensor
    window_k_pages: Tensor | None
    window_v_pages: Tensor | None
    block_key_pages: Tensor | None  # one mean key per page, with importance "selected_keys"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def sparse_layers(module: nn.Module) -> list[SparseAttention]:
    """The SparseAttention layers a PagedCache serves: the module itself, or a Transformer's layers
    (every one sparse and causal, one configuration)."""
    if isinstance(module, SparseAttention):
        return [module]
    layers = getattr(module, "layers", None)
    if layers is None:
        raise TypeError(f"module must be a SparseAttention or a Transformer, got {type(module).__name__}")
    attns = [layer[0] for layer in layers]
    if not all(isinstance(a, SparseAttention) for a in attns):
        raise ValueError("a paged cache serves sparse layers only: build the Transformer with use_sparse_attn=True")
    if any(a.config != attns[0].config for a in attns):
        raise ValueError("a paged cache needs every layer to share one SparseAttention configuration")
    return attns


class PagedCache:
    def __init__(self, config: NSAConfig, num_layers: int, *, slots: int, max_seq_len: int, num_pages: int,
                 num_compressed_pages: int | None = None, device=None, dtype=torch.float32):
        _positive_int("num_layers", num_layers)
        _positive_int("slots", slots)
        _positive_int("max_seq_len", max_seq_len)
        if not config.causal:
            raise ValueError("a cache needs a causal module (causal=True)")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.config, self.slots, self.max_seq_len = config, slots, max_seq_len
        self.page_size = page = config.selection_block_size
        logical_cpages = -(-(config.num_compressed_mem_kv + max_seq_len // config.stride) // COMPRESSED_PAGE)
        if num_compressed_pages is None:  # enough for every slot at max_seq_len: compressed tokens are few
            num_compressed_pages = slots * logical_cpages + 1
        self.token_pool = PagePool(num_pages, name="num_pages")
        self.compressed_pool = PagePool(num_compressed_pages, name="num_compressed_pages")
        hk, d, ring = config.num_kv_heads, config.dim_head, config.compress_block_size
        z = dict(device=device, dtype=dtype)

        def store() -> _LayerStore:
            window, block_keys = config.independent_kv, config.scores_block_keys
            return _LayerStore(
                k_pages=torch.zeros(num_pages, hk, page, d, **z), v_pages=torch.zeros(num_pages, hk, page, d, **z),
                ck_pages=torch.zeros(num_compressed_pages, hk, COMPRESSED_PAGE, d, **z),
                cv_pages=torch.zeros(num_compressed_pages, hk, COMPRESSED_PAGE, d, **z),
                ring_keys=torch.zeros(slots, hk, ring, d, **z), ring_values=torch.zeros(slots, hk, ring, d, **z),
                window_k_pages=torch.zeros(num_pages, hk, page, d, **z) if window else None,
                window_v_pages=torch.zeros(num_pages, hk, page, d, **z) if window else None,
                block_key_pages=torch.zeros(num_pages, hk, d, **z) if block_keys else None)

        self.layers = [store() for _ in range(num_layers)]
        index = dict(device=device, dtype=torch.int32)
        self.block_table = torch.full((slots, -(-max_seq_len // page)), NULL_PAGE, **index)
        self.compressed_table = torch.full((slots, logical_cpages + 1), NULL_PAGE, **index)
        self.lengths = torch.zeros(slots, device=device, dtype=torch.int64)
        self.device = self.block_table.device
        self._length = [0] * slots  # tokens written per slot, on the host
        self._pages: list[list[int]] = [[] for _ in range(slots)]
        self._cpages: list[list[int]] = [[] for _ in range(slots)]
        self._busy = [False] * slots

    @classmethod
    def for_model(cls, module: nn.Module, *, slots: int, max_seq_len: int, num_pages: int,
                  num_compressed_pages: int | None = None, device=None, dtype=None) -> "PagedCache":
        """A paged cache for a Transformer of sparse layers or one SparseAttention (default device and
        dtype: the module's)."""
        attns = sparse_layers(module)
        weight = attns[0].to_qkv.weight
        return cls(attns[0].config, len(attns), slots=slots, max_seq_len=max_seq_len, num_pages=num_pages,
                   num_compressed_pages=num_compressed_pages, device=weight.device if device is None else device,
                   dtype=weight.dtype if dtype is None else dtype)

    # slots ----------------------------------------------------------------------------------------

    @property
    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if not self._busy[s]]

    def length(self, slot: int) -> int:
        """Tokens the slot's sequence holds."""
        return self._length[self._check_slot(slot)]

    def open(self) -> int:
        """Take a free slot for a new sequence (empty: its first run is a prefill)."""
        free = self.free_slots
        if not free:
            raise ValueError(f"every one of slots={self.slots} holds a sequence: close one first")
        self._busy[free[0]] = True
        return free[0]

    def close(self, slot: int) -> None:
        """The slot's sequence is done: its pages go back to the pools, the slot is free."""
        self._check_slot(slot)
        self.token_pool.release(self._pages[slot])
        self.compressed_pool.release(self._cpages[slot])
        self._pages[slot], self._cpages[slot] = [], []
        self.block_table[slot] = NULL_PAGE
        self.compressed_table[slot] = NULL_PAGE
        self._length[slot], self._busy[slot] = 0, False

    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.slots or not self._busy[slot]:
            raise ValueError(f"slot must be an open slot id (from open()) in 0..{self.slots - 1}, got {slot!r}")
        return slot

    # pages ----------------------------------------------------------------------------------------

    def pages_for(self, tokens: int) -> int:
        """Token pages a sequence of `tokens` tokens holds (what a loop admitting requests budgets)."""
        return -(-tokens // self.page_size)

    def _reserve(self, slot: int, tokens: int) -> None:
        """Pages for the slot's first `tokens` tokens, taken from the pools now."""
        if tokens > self.max_seq_len:
            raise ValueError(f"cache capacity is max_seq_len={self.max_seq_len} tokens per sequence; slot {slot} "
                             f"holds {self._length[slot]} and {tokens - self._length[slot]} more do not fit")
        cfg = self.config
        need = -(-tokens // self.page_size) - len(self._pages[slot])
        cneed = -(-(cfg.num_compressed_mem_kv + tokens // cfg.stride) // COMPRESSED_PAGE) - len(self._cpages[slot])
        for pool, n in ((self.token_pool, need), (self.compressed_pool, cneed)):
            if n > pool.free_pages:
                pool.allocate(n)  # raises, naming the pool: nothing is taken
        for pool, pages, table, n in ((self.token_pool, self._pages[slot], self.block_table, need),
                                      (self.compressed_pool, self._cpages[slot], self.compressed_table, cneed)):
            if n > 0:
                new = pool.allocate(n)
                table[slot, len(pages): len(pages) + n] = torch.tensor(new, dtype=table.dtype).to(self.device)
                pages += new

    # a forward over some slots --------------------------------------------------------------------

    def _views(self, index: Tensor, filled: int) -> list[NSACache]:
        table, ctable, lengths = self.block_table[index], self.compressed_table[index], self.lengths[index]
        return [NSACache(config=self.config, capacity=self.max_seq_len, k_pages=s.k_pages, v_pages=s.v_pages,
                         block_table=table, ck_pages=s.ck_pages, cv_pages=s.cv_pages, compressed_table=ctable,
                         ring_keys=s.ring_keys[index], ring_values=s.ring_values[index], lengths=lengths.clone(),
                         filled=filled, window_k_pages=s.window_k_pages, window_v_pages=s.window_v_pages,
                         block_key_pages=s.block_key_pages)
                for s in self.layers]

    def _put_back(self, index: Tensor, views: list[NSACache]) -> None:
        for s, view in zip(self.layers, views):
            s.ring_keys.index_copy_(0, index, view.ring_keys)
            s.ring_values.index_copy_(0, index, view.ring_values)
        self.lengths.index_copy_(0, index, views[0].lengths)

    def run(self, module: nn.Module, inp: Tensor, slots: list[int], *, lengths: list[int] | None = None) -> Tensor:
        """module's forward over the rows of inp (B, K, ...) (ids for a Transformer, x for a
        SparseAttention), row i the sequence of slots[i]. Every slot empty: a prefill of right-padded
        prompts of K tokens, `lengths` their valid tokens (default K). Every slot filled: a step of
        the next K tokens of each (a decoding step, or the next chunk of a prompt). Returns the
        module's output (B, K, ...)."""
        attns = sparse_layers(module)
        if len(attns) != len(self.layers):
            raise ValueError(f"this cache holds {len(self.layers)} layers, the module has {len(attns)}")
        if not isinstance(slots, (list, tuple)) or len(slots) != inp.shape[0] or len(set(slots)) != len(slots):
            raise ValueError(f"slots must list {inp.shape[0]} distinct open slots (one per row of inp), got {slots!r}")
        slots = [self._check_slot(s) for s in slots]
        K = inp.shape[1]
        empty = [self._length[s] == 0 for s in slots]
        if any(empty) and not all(empty):
            raise ValueError("slots mixes empty slots (a prefill) with filled ones (a step): run them in separate calls")
        if not all(empty) and lengths is not None:
            raise ValueError("lengths describes prompts: pass it with empty slots (their prefill)")
        valid = [K] * len(slots) if lengths is None else list(lengths)
        if len(valid) != len(slots) or not all(isinstance(n, int) and 1 <= n <= K for n in valid):
            raise ValueError(f"lengths must list {len(slots)} ints in 1..{K} (each prompt's valid tokens), got {lengths!r}")
        for s in slots:
            self._reserve(s, self._length[s] + K)
        index = torch.tensor(slots, device=self.device)
        views = self._views(index, max(self._length[s] for s in slots))
        prompt_lengths = torch.tensor(valid, device=self.device) if all(empty) and lengths is not None else None
        if isinstance(module, SparseAttention):
            out = module(inp, cache=views[0], lengths=prompt_lengths)
        else:
            out = module(inp, cache=views, lengths=prompt_lengths)
        self._put_back(index, views)
        for s, n in zip(slots, valid):
            self._length[s] = n if empty[0] else self._length[s] + K
        return out
