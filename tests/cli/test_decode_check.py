"""`nsa check`'s decoding comparison (nsa_cli/support/decode_check.py): a healthy module passes, a
selection flipped at a near-tie is reported and passes, and planted decoding bugs (a wrong
position, a stale cache entry, a missing block) fail."""

import importlib

import torch

from nsa_cli.support.checks import randomize_parameters
from nsa_cli.support.decode_check import compare_decoding, decoded_span
from nsa_core import SparseAttention
from nsa_core.model.cache import NSACache
from nsa_core.ops import Seqs, sliding_window
from nsa_core.reference import step_selection

N = 45  # odd; prefill 15, 30 tokens decoded


def module_and_input(seed=0, x=None):
    torch.manual_seed(seed)
    # 6 query heads over 2 kv heads: a group of 3
    attn = SparseAttention(dim=24, dim_head=8, heads=6, kv_heads=2, sliding_window_size=4, compress_block_size=4,
                           selection_block_size=4, num_selected_blocks=2, causal=True, backend="torch")
    randomize_parameters(attn, seed, std=0.3)
    x = torch.randn(2, N, 24) if x is None else x
    with torch.no_grad():
        return attn, x, attn(x)


def compare(attn, x, parallel):
    with torch.no_grad():
        return compare_decoding(attn, x, parallel, tol=1e-5)


def test_decoded_span_is_bounded():
    assert decoded_span(120) == (40, 80)
    assert decoded_span(1) == (1, 0)
    assert decoded_span(32768) == (32768 - 128, 128)


def test_healthy_module_passes_and_says_what_it_compared():
    found = compare(*module_and_input())
    assert found.passed, found
    assert found.figures["flipped_positions"] == 0 and found.figures["max_abs_error"] < 1e-5
    assert "tokens 15-44 decoded one by one after a 15-token prefill" in found.detail


def test_a_flip_at_a_near_tie_is_reported_not_failed(monkeypatch):
    """Every compressed block equal (the input repeats with the block's period): all block scores
    tie exactly. A perturbation of the decode path's scores at rounding size then flips picks."""
    pattern = torch.randn(1, 4, 24)
    x = pattern.repeat(2, 12, 1)[:, :N]
    attn, x, parallel = module_and_input(x=x)
    original = step_selection.select_top_blocks

    def rounding_noise(logits, num_selected, use_diff_topk, **options):
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)) * 1e-7
        return original(logits + noise * logits.abs().clamp(max=10), num_selected, use_diff_topk, **options)

    monkeypatch.setattr(step_selection, "select_top_blocks", rounding_noise)
    found = compare(attn, x, parallel)
    assert found.figures["disagreeing_positions"] > 0, found  # the picks did flip
    assert found.passed and found.figures["flipped_positions"] == found.figures["disagreeing_positions"]
    assert found.figures["largest_margin"] == 0.0 and "near-tie" in found.detail


def test_wrong_position_fails(monkeypatch):
    """The decoding step's window one position behind."""
    original = sliding_window.paged_window_attention

    def behind(q, k, v, *, seqs, **options):
        return original(q, k, v, seqs=Seqs.step(seqs.cached - 1, seqs.q_len, seqs.k_len), **options)

    monkeypatch.setattr(sliding_window, "paged_window_attention", behind)
    found = compare(*module_and_input())
    assert not found.passed and "not a near-tie" in found.detail, found


def test_stale_cache_entry_fails(monkeypatch):
    original = NSACache.write_tokens

    def skip_steps(self, positions, *tokens, **options):
        if positions.shape[1] > 1:  # the prefill writes; single steps leave stale entries
            original(self, positions, *tokens, **options)

    monkeypatch.setattr(NSACache, "write_tokens", skip_steps)
    found = compare(*module_and_input())
    assert not found.passed and found.figures["disagreeing_positions"] > 0, found


def test_missing_block_fails(monkeypatch):
    """The decoding step's selection drops its last block (the step's compressed branch and selection
    run as one op, ops/compressed_selection.py; on the CPU its twin)."""
    step_op = importlib.import_module("nsa_core.ops.compressed_selection")  # the package exports the function

    original = step_op.step_compressed_selection_reference

    def drop_last(*args, **kwargs):
        out, selection = original(*args, **kwargs)
        selection.valid[..., -1] = False
        return out, selection

    monkeypatch.setattr(step_op, "step_compressed_selection_reference", drop_last)
    found = compare(*module_and_input())
    assert not found.passed, found


def test_a_module_with_block_key_slots_passes_and_its_margins_cover_both_scores():
    from nsa_cli.support.decode_check import selection_margins

    torch.manual_seed(0)
    attn = SparseAttention(dim=24, dim_head=8, heads=6, kv_heads=2, sliding_window_size=4, compress_block_size=4,
                           selection_block_size=4, num_selected_blocks=3, num_forced_initial_blocks=1,
                           selected_key_slots=1, causal=True, backend="torch")
    randomize_parameters(attn, 0, std=0.3)
    x = torch.randn(2, N, 24)
    with torch.no_grad():
        found = compare(attn, x, attn(x))
        assert found.passed, found
        parts = attn.selection_rule.scored_parts()
        assert [(rule.num_selected, keys) for rule, keys in parts] == [(2, False), (1, True)]
        positions = torch.arange(30, N)
        margins, tolerance = selection_margins(attn, x, positions)
        alone = attn.selection_rule.importance_part()
    assert margins.shape == (2, N - 30) and torch.isfinite(margins).all() and (margins >= 0).all()
    assert 0 < tolerance < 1e-3 and alone.num_selected == 2
