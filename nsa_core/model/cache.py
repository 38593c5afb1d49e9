"""NSACache: the static decoding cache of one causal SparseAttention layer.

Preallocated for `capacity` tokens per sequence and written in place: a decoding step allocates
nothing and copies no cache. Keys and values live in a pool of pages of one selection block each,
reached through a block table (B, pages per sequence) of physical page ids, the layout serving
engines page; this cache's table is the identity (row b owns pages b * NP ... b * NP + NP - 1),
so a paged allocator can replace it without touching the decode kernels, which read through it.

What it holds, and why (B batch, HKV kv heads, D / Dv head dims):
- k_pages / v_pages (B * NP, HKV, PAGE, D): rotated keys and the values of every token (the
  selection may pick any earlier block; the window reaches the last `window` tokens);
- ck_pages / cv_pages (B * NCP, HKV, CPAGE, D): per sequence the memory tokens (slots 0 .. M - 1),
  then the completed compression windows (slot M + c), then one scratch slot (the last) that takes
  the PyTorch path's writes of windows not complete yet, so every step writes the same shapes (the
  fused step compression, ops/window_compression.py, writes only the windows a step completes);
- ring_keys / ring_values (B, HKV, R, D), R = compress_block_size: the last R tokens, unrotated
  (zeros before the sequence start): every window a new token completes is in them;
- window_k_pages / window_v_pages (as k_pages), with independent_kv only: the window branch's own
  rotated keys and values (its pages are read through the same block table);
- block_key_pages (B * NP, HKV, D), with importance "selected_keys" or selected_key_slots only: each
  page's mean rotated key (the block key the selection scores), refreshed for the pages a write
  touches, so a step reads one key per page for the selection instead of every cached key;
- lengths (B,) int64 on the device: tokens written per sequence; `filled` on the host: the
  longest a sequence can be so far (capacity checks without reading the device).

`branch_keys()` hands SparseAttention.attend the cache as its keys (nsa_core.ops.paged.Pages over
the pools and tables), so a decoding step runs the same line of op calls as the parallel pass.

StepCache is what this cache and the dense layers' (model/dense.py) share: the counts that a prefill
starts and a step advances, taken back, saved and restored through methods (generation's CUDA
graph, the decode timing), never edited from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nsa_core.config import NSAConfig
from nsa_core.model.branch_keys import BranchKeys
from nsa_core.model.selection_keys import cached_block_keys
from nsa_core.ops.page_write import refresh_page_means, write_pages
from nsa_core.ops.window_compression import MLPCompression, append_compressed_windows
from nsa_core.ops.paged import Pages

COMPRESSED_PAGE = 64  # compressed tokens per page of the compressed pool
DEFAULT_HEADROOM = 1024  # tokens a cache made by return_cache=True leaves free after its prompt


def room_needed(capacity: int, filled: int, new_tokens: int, growable: bool) -> int:
    """0 when new_tokens more fit; the tokens needed when a growable cache must grow; a ValueError
    naming the capacity for a fixed one."""
    need = filled + new_tokens
    if need <= capacity:
        return 0
    if not growable:
        raise ValueError(f"cache capacity is max_seq_len={capacity} tokens per sequence; {filled} are "
                         f"written and {new_tokens} more do not fit (make it with a larger max_seq_len)")
    return need


@dataclass
class CacheState:
    """A cache's counts and the step state that positions do not say (a snapshot)."""

    lengths: Tensor
    filled: int
    tensors: tuple[Tensor, ...]


class StepCache:
    """The counts of a static decoding cache: `lengths` (B,) on the device, `filled` on the host, and
    the capacity they grow into (subclasses hold them as fields)."""

    def _step_state(self) -> tuple[Tensor, ...]:
        """Tensors a step overwrites that its positions do not say (rewriting them is not enough to
        take a step back)."""
        return ()

    def _buffers(self) -> tuple[Tensor, ...]:
        """Every token buffer (what fill_random fills)."""
        raise NotImplementedError

    def _grow_to(self, capacity: int) -> None:
        raise NotImplementedError

    @property
    def is_empty(self) -> bool:
        """Nothing written yet: the next call is a prefill."""
        return self.filled == 0

    def reserve(self, new_tokens: int) -> None:
        """Make room for new_tokens more per sequence: a growable cache (made by return_cache=True
        without a cache) doubles its capacity; a fixed one (new_cache) raises past its capacity."""
        need = room_needed(self.capacity, self.filled, new_tokens, self.growable)
        if need:
            self._grow_to(max(need, 2 * self.capacity))

    def begin(self, lengths: Tensor, n: int) -> None:
        """A prefill of rows of n tokens, `lengths` (B,) of them valid, was written."""
        self.lengths.copy_(lengths)
        self.filled = n

    def advance(self, n: int) -> None:
        """A step wrote n more tokens to every sequence."""
        self.lengths += n
        self.filled += n

    def rewind(self, n: int) -> None:
        """Take the last n tokens of every sequence back (their entries are overwritten by the next
        writes; the step state is not restored: use snapshot / restore for that)."""
        self.lengths -= n
        self.filled -= n

    def count_replayed(self, n: int) -> None:
        """A CUDA graph of a step writing n tokens was replayed: its device work moved `lengths`; the
        host-side count follows."""
        self.filled += n

    def snapshot(self) -> CacheState:
        return CacheState(self.lengths.clone(), self.filled, tuple(t.clone() for t in self._step_state()))

    def restore(self, state: CacheState) -> None:
        """Back to a snapshot, in place (a captured CUDA graph keeps reading the same tensors)."""
        self.lengths.copy_(state.lengths)
        self.filled = state.filled
        for t, saved in zip(self._step_state(), state.tensors):
            t.copy_(saved)

    def fill_random(self, context: int, *, ragged: int = 0) -> None:
        """Random contents (torch's seeded generator, on the cache's device) for `context` tokens per
        sequence, as if prefilled: for timing steps without the cost of a real prefill. ragged > 0:
        row b holds context - b % ragged tokens instead (rows at different positions)."""
        if isinstance(ragged, bool) or not isinstance(ragged, int) or not 0 <= ragged <= context:
            raise ValueError(f"ragged must be an int in 0..context ({context}), got {ragged!r}")
        for t in self._buffers():
            t.normal_()
        self.lengths.fill_(context)
        if ragged:
            self.lengths -= torch.arange(self.lengths.shape[0], device=self.lengths.device) % ragged
        self.filled = context


_SLOT_RULES: dict[tuple, Tensor] = {}  # (capacity, stride, memory tokens, scratch slot, device) -> table
_MAX_SLOT_RULES = 16


def _slot_rule(capacity: int, stride: int, num_memory: int, scratch: int, device: torch.device) -> Tensor:
    """(capacity,) int64: for a token at position p, the compressed slot of the window it completes
    (num_memory + (p + 1) // stride - 1 when p + 1 is a multiple of the stride), else `scratch`.
    Made once per key and kept; while a CUDA graph is being captured a missing table is made in
    the graph and not kept (its values exist only in replays), a kept one is read as it is."""
    key = (capacity, stride, num_memory, scratch, device)
    table = _SLOT_RULES.get(key)
    if table is None:
        ends = torch.arange(1, capacity + 1, device=device)
        table = torch.where(ends % stride == 0, ends // stride + (num_memory - 1), scratch)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if len(_SLOT_RULES) >= _MAX_SLOT_RULES:
                _SLOT_RULES.pop(next(iter(_SLOT_RULES)))
            _SLOT_RULES[key] = table
    return table


def _identity_table(batch: int, pages: int, device) -> Tensor:
    return torch.arange(batch * pages, device=device, dtype=torch.int32).view(batch, pages)


@dataclass
class NSACache(StepCache):
    config: NSAConfig
    capacity: int
    k_pages: Tensor
    v_pages: Tensor
    block_table: Tensor
    ck_pages: Tensor
    cv_pages: Tensor
    compressed_table: Tensor
    ring_keys: Tensor
    ring_values: Tensor
    lengths: Tensor
    filled: int = 0
    growable: bool = False
    window_k_pages: Tensor | None = None
    window_v_pages: Tensor | None = None
    block_key_pages: Tensor | None = None

    # construction ---------------------------------------------------------------------------------

    @classmethod
    def allocate(cls, config: NSAConfig, batch_size: int, capacity: int, *, device, dtype,
                 growable: bool = False) -> "NSACache":
        for name, value in (("batch_size", batch_size), ("max_seq_len", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not config.causal:
            raise ValueError("a cache needs a causal module (causal=True)")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        hk, d, page = config.num_kv_heads, config.dim_head, config.selection_block_size
        pages = -(-capacity // page)
        slots = config.num_compressed_mem_kv + capacity // config.stride + 1  # + the scratch slot
        cpages = -(-slots // COMPRESSED_PAGE)
        zeros = dict(device=device, dtype=dtype)
        ring = config.compress_block_size
        optional = {}
        if config.independent_kv:
            optional = {name: torch.zeros(batch_size * pages, hk, page, d, **zeros)
                        for name in ("window_k_pages", "window_v_pages")}
        if config.scores_block_keys:
            optional["block_key_pages"] = torch.zeros(batch_size * pages, hk, d, **zeros)
        return cls(
            config=config, capacity=capacity,
            k_pages=torch.zeros(batch_size * pages, hk, page, d, **zeros),
            v_pages=torch.zeros(batch_size * pages, hk, page, d, **zeros),
            block_table=_identity_table(batch_size, pages, device),
            ck_pages=torch.zeros(batch_size * cpages, hk, COMPRESSED_PAGE, d, **zeros),
            cv_pages=torch.zeros(batch_size * cpages, hk, COMPRESSED_PAGE, d, **zeros),
            compressed_table=_identity_table(batch_size, cpages, device),
            ring_keys=torch.zeros(batch_size, hk, ring, d, **zeros),
            ring_values=torch.zeros(batch_size, hk, ring, d, **zeros),
            lengths=torch.zeros(batch_size, device=device, dtype=torch.int64),
            growable=growable, **optional,
        )

    # facts ----------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @property
    def compressed_slots(self) -> int:
        return self.compressed_table.shape[1] * COMPRESSED_PAGE

    @property
    def scratch_slot(self) -> int:
        return self.compressed_slots - 1

    @property
    def device(self) -> torch.device:
        return self.k_pages.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k_pages.dtype

    def check_for(self, config: NSAConfig, inp: Tensor) -> None:
        """A ValueError saying what does not fit when this cache cannot serve `inp` of this module."""
        if self.config != config:
            raise ValueError("cache was made for another module configuration: "
                             f"cache {self.config.to_json(indent=None)} vs module {config.to_json(indent=None)}")
        if inp.shape[0] != self.batch_size:
            raise ValueError(f"cache holds batch size {self.batch_size}, the input has {inp.shape[0]}")
        if inp.device != self.device:
            raise ValueError(f"cache is on {self.device}, the input on {inp.device}")

    def _grow_to(self, capacity: int) -> None:
        bigger = NSACache.allocate(self.config, self.batch_size, capacity, device=self.device, dtype=self.dtype,
                                   growable=True)
        b, hk = self.batch_size, self.config.num_kv_heads
        for name in ("k_pages", "v_pages", "ck_pages", "cv_pages", "window_k_pages", "window_v_pages",
                     "block_key_pages"):
            old, new = getattr(self, name), getattr(bigger, name)
            if old is None:
                continue
            per_row = old.shape[0] // b
            new.view(b, -1, *new.shape[1:])[:, :per_row] = old.view(b, per_row, *old.shape[1:])
        # the old scratch slot lies inside the bigger pool's real slots: clear it
        scratch = self.scratch_slot
        bigger.ck_pages.view(b, -1, hk, COMPRESSED_PAGE, bigger.ck_pages.shape[-1])[
            :, scratch // COMPRESSED_PAGE, :, scratch % COMPRESSED_PAGE] = 0
        bigger.ring_keys.copy_(self.ring_keys)
        bigger.ring_values.copy_(self.ring_values)
        bigger.lengths.copy_(self.lengths)
        bigger.filled = self.filled
        self.__dict__.update(bigger.__dict__)

    def _step_state(self) -> tuple[Tensor, ...]:
        return self.ring_keys, self.ring_values  # the compression ring: positions alone do not say it

    def _buffers(self) -> tuple[Tensor, ...]:
        optional = (self.window_k_pages, self.window_v_pages)
        return (self.k_pages, self.v_pages, self.ck_pages, self.cv_pages, self.ring_keys, self.ring_values,
                *(t for t in optional if t is not None))

    def fill_random(self, context: int, *, ragged: int = 0) -> None:
        super().fill_random(context, ragged=ragged)
        if self.block_key_pages is not None:  # the page means of the random keys, as writes would leave them
            self.block_key_pages.copy_(self.k_pages.mean(dim=2))

    # writes (in place, graph-capturable: positions are device tensors) -----------------------------

    def write_tokens(self, positions: Tensor, k: Tensor, v: Tensor, window_k: Tensor | None = None,
                     window_v: Tensor | None = None, *, rotary_freqs: Tensor | None = None) -> None:
        """Keys k and values v (B, HKV, K, D) of the tokens at positions (B, K); with independent_kv also
        the window branch's (window_k, window_v). The keys are rotated at their positions by rotary_freqs
        (the module's `rotary_emb.freqs`) on the way in, or stored as given (None: rotated already)."""
        pairs = [(self.k_pages, self.v_pages, k, v)]
        if self.window_k_pages is not None:
            if window_k is None or window_v is None:
                raise ValueError("this cache holds the window branch's own keys (independent_kv): pass window_k "
                                 "and window_v")
            pairs.append((self.window_k_pages, self.window_v_pages, window_k, window_v))
        for k_pages, v_pages, keys, values in pairs:
            write_pages(k_pages, v_pages, self.block_table, positions, keys, values, rotary_freqs=rotary_freqs,
                        backend=self.config.backend)
        if self.block_key_pages is not None:  # each written page's mean key (its block key)
            refresh_page_means(self.block_key_pages, self.k_pages, self.block_table, positions,
                               backend=self.config.backend)

    def window_pages(self) -> tuple[Tensor, Tensor]:
        """The pages the window branch reads: its own with independent_kv, else the shared ones."""
        if self.window_k_pages is None:
            return self.k_pages, self.v_pages
        return self.window_k_pages, self.window_v_pages

    def compressed_slot_rule(self) -> Tensor:
        """(capacity,) int64: the compressed slot of the window a token at that position completes, or
        the scratch slot where it completes none (a table made once per capacity: _slot_rule)."""
        cfg = self.config
        return _slot_rule(self.capacity, cfg.stride, cfg.num_compressed_mem_kv, self.scratch_slot, self.device)

    def append_windows(self, positions: Tensor, k: Tensor, v: Tensor, *,
                       compress: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                       mlp: MLPCompression | None) -> None:
        """The compressed tokens of the windows the new tokens at positions (B, K) complete (their
        unrotated k / v (B, HKV, K, D) after the ring), then the ring moved on: ops/window_compression.py
        (`compress`: the module's compression of windows; `mlp`: its tensors when it is the default one)."""
        append_compressed_windows(self.ring_keys, self.ring_values, k, v, positions, slot_of=self.compressed_slot_rule(),
                                  scratch=self.scratch_slot, ck_pages=self.ck_pages, cv_pages=self.cv_pages,
                                  table=self.compressed_table, compress=compress, mlp=mlp, backend=self.config.backend)

    def write_compressed(self, slots: Tensor, ck: Tensor, cv: Tensor) -> None:
        """Compressed keys / values (B, HKV, K, D) into logical compressed slots (B, K)."""
        write_pages(self.ck_pages, self.cv_pages, self.compressed_table, slots, ck, cv, backend=self.config.backend)

    def branch_keys(self) -> BranchKeys:
        """The cache as the branches' keys for SparseAttention.attend with a decoding-step Seqs: the
        compressed slots, token and window pages behind their tables (the step's selection reads the
        compressed pages, or with importance "selected_keys" the pages' block keys:
        ops/compressed_selection.py)."""
        table, ctable = self.block_table, self.compressed_table
        window_k, window_v = self.window_pages()
        block_keys = None if self.block_key_pages is None else cached_block_keys(self.block_key_pages, table)
        return BranchKeys(Pages(self.ck_pages, ctable), Pages(self.cv_pages, ctable), Pages(self.k_pages, table),
                          Pages(self.v_pages, table), Pages(window_k, table), Pages(window_v, table),
                          selection_keys=block_keys)
