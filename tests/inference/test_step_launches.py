"""How many kernels one decoding step of one layer issues, counted on the CPU (Triton's interpreter,
backend="triton"): every aten op that reaches the dispatcher and is not a view or an allocation
(on a GPU each of those is one launch: an elementwise op, an index, a copy, a matmul) plus every
Triton kernel launched, with the aten ops the interpreter runs inside a launch left out. No op may
read a tensor on the host (aten._local_scalar_dense: a .item(), a bool() of a tensor). The counts are
asserted exactly, so a change in them is seen and its number written here.

Measured (one token per row, batch 2, the module below), before the fused step selection
(kernels/decode/compressed_selection.py; main at 4a5b76c, the same counter) and after it:
- mean-logit importance (the oracle's): 141 -> 111 kernels, Triton launches 4 -> 4 (the compressed
  branch's paged decode launch became the fused one); then 111 -> 94 without the cache's pooled
  block keys (their upkeep every step; only the twin read them, and it pools the compressed keys);
- summed-probability importance, forced blocks, independent keys: 203 -> 109, Triton 4 -> 4;
- then both: rotary at per-row positions in one launch each (kernels/rotary.py's positions kernel: the
  angles in the kernel, no tables; before, 4 table ops + 11 of the twin's per rotated tensor) and the
  step's positions made once with its descriptor (Seqs.step; before, 2 ops in every op that asked):
  94 -> 66 (Triton 4 -> 6) and 109 -> 71 (Triton 4 -> 7);
- then the page writes (keys rotated on the way in, values; compressed tokens) as one launch each
  (kernels/decode/page_write.py; before, a gather, a floor division, a remainder and an index put per
  tensor): 66 -> 55 (Triton 7) and 71 -> 56 (Triton 8);
- then the window's page list and the compressed slot rule in fewer ops: 55 -> 51, 56 -> 52;
- then the selected and window branches' page lists formed in the paged kernel (its `lists` rules:
  the own page after the listed ones, the window's pages from the position): 51 -> 39, 52 -> 40;
- then the compressed slot of each new token's window looked up in a table made once per capacity
  (NSACache.compressed_slot_rule; before, 7 ops of the rule every step): 39 -> 33, 40 -> 34.
The rest of a step: the token and compression writes into the cache (model/decode.py), the
projections, the gates.
- importance "selected_keys" (2026-12-04): 50 kernels, Triton 8. The compressed branch is a plain paged
  launch; the block scores and top-k over the cache's block keys take the fused step kernel at a stride of one
  block (ops/compressed_selection.py; 68 kernels when they were PyTorch ops); the cache's per-page block keys
  take 7 (their upkeep in write_tokens), against reading every cached key for the page means before.
- selected_key_slots=1 (2026-12-06): 52 kernels, Triton 8: the compressed branch's fused step selection, then
  the fused kernel again over the block keys for the block keys' slots, the block keys' upkeep, and the merge of
  the two selections (a comparison of their slots, 5 small ops and 3 concatenations).
- then the compression of the windows the new tokens complete as two launches for keys and values
  (kernels/decode/window_compression.py: the default MLP's two layers, the slot lookup, the compressed
  page write, the ring shift; before, the concatenations with the ring, the intra-block positions, four
  GEMMs, two ReLUs, the slot lookup, a page write and the ring copies): 33 -> 21, 34 -> 22, 50 -> 38,
  52 -> 40;
- then the block keys' upkeep (the mean key of each page written to) as one launch
  (kernels/decode/page_write.py's page_mean_kernel; before, a concatenation, a floor division, a gather,
  an index, a mean and an index put): selected_keys 38 -> 32, selected_key_slots 40 -> 34;
- then the step's selection reads the block keys in the cache's pages behind its table (PooledBlockKeys
  with pages; before, a gather of every row's keys, the table's int64 copy, a transposing copy into pages
  of one slot and an identity table): 32 -> 29, 34 -> 31;
- then the merge of selected_key_slots' two selections as one launch (kernels/selection_merge.py; before, a
  comparison of every pair of slots, an any, a not, two ands and three concatenations): 31 -> 24.
- then the selected and window branches and the combine in two launches (kernels/decode/fine_window.py; on the
  interpreter no splits, so 3 -> 2): 21 -> 20, 22 -> 21, 29 -> 28, 24 -> 23;
- then the combine's gates computed in that combine launch (the gate network's matmul and sigmoid): 20 -> 18,
  21 -> 19, 28 -> 26, 23 -> 21.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import randomize_
from nsa_core import SparseAttention
from nsa_core.ops.dispatch import kernel_unavailable_reason

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or kernel_unavailable_reason(torch.device("cpu")) is not None,
                                reason="counted on the CPU through Triton's interpreter")

NO_KERNEL = {  # views, allocations and metadata: no launch on a GPU
    "view", "_unsafe_view", "reshape", "alias", "as_strided", "expand", "transpose", "t", "permute", "unsqueeze",
    "squeeze", "select", "slice", "split", "split_with_sizes", "unflatten", "unbind", "chunk", "narrow", "detach",
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias",
    "view_as", "unfold", "diagonal", "flatten", "_to_copy_meta", "resolve_conj", "resolve_neg", "is_same_size",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride", "promote_types",
}


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops by name (outside Triton launches) and Triton launches by kernel name."""

    def __init__(self):
        super().__init__()
        self.aten = collections.Counter()
        self.triton = collections.Counter()
        self.inside_launch = 0
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_launch and func.namespace == "aten":  # nsa:: ops: their Triton launches count
            self.aten[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.aten.items() if name not in NO_KERNEL) + sum(self.triton.values())


def count_step(attn: SparseAttention, prompt: torch.Tensor, token: torch.Tensor, monkeypatch) -> LaunchCounter:
    from triton.runtime.interpreter import GridExecutor

    counter = LaunchCounter()
    launch = GridExecutor.__call__

    def counted(self, *args, **kwargs):
        if counter.active:
            counter.triton[self.fn.__name__] += 1
        counter.inside_launch += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            counter.inside_launch -= 1

    monkeypatch.setattr(GridExecutor, "__call__", counted)
    with torch.no_grad():
        cache = attn.new_cache(prompt.shape[0], 64)
        attn(prompt, cache=cache)
        attn(token, cache=cache)  # compiles / warms whatever a first step does
        with counter:
            attn(token, cache=cache)
    return counter


CONFIGS = {
    "mean_logits": dict(),
    "summed_forced_independent": dict(importance_score="summed_probs", num_forced_initial_blocks=1,
                                      num_forced_local_blocks=1, independent_kv=True),
    "selected_keys": dict(importance_score="selected_keys"),
    "selected_key_slots": dict(selected_key_slots=1),
}
EXPECTED = {"mean_logits": (18, 7), "summed_forced_independent": (19, 8), "selected_keys": (26, 9),
            "selected_key_slots": (21, 10)}  # (kernels, of them Triton launches)
FUSED_SELECTIONS = {"selected_key_slots": 2}  # launches of the fused step selection (1 elsewhere)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_step_kernel_count(name, monkeypatch):
    attn = randomize_(SparseAttention(dim=48, dim_head=16, heads=6, kv_heads=2, sliding_window_size=20,
                                      compress_block_size=16, compress_block_sliding_stride=8, selection_block_size=16,
                                      num_selected_blocks=3, causal=True, backend="triton", **CONFIGS[name]), std=0.2)
    x = torch.randn(2, 40, 48)
    counter = count_step(attn, x[:, :37], x[:, 37:38], monkeypatch)
    assert counter.aten["_local_scalar_dense"] == 0, "a decoding step must not read the device on the host"
    assert counter.triton["compressed_selection_kernel"] == FUSED_SELECTIONS.get(name, 1)
    assert counter.triton["page_write_kernel"] >= 1
    assert (counter.kernels, sum(counter.triton.values())) == EXPECTED[name], (
        f"{counter.kernels} kernels ({dict(counter.triton)}); aten: {sorted(counter.aten.items())}")
