"""`nsa check`'s packed-documents check: it runs among the checks and passes on a healthy module."""

import torch

from nsa_cli.support.checks import _packed_check, run_checks
from nsa_core import NSAConfig, SparseAttention


def test_packed_check_passes_for_short_and_long_rows():
    module = SparseAttention(dim=16, dim_head=4, heads=2, sliding_window_size=4, compress_block_size=4,
                             selection_block_size=4, num_selected_blocks=2, causal=True, backend="torch")
    for n in (1, 2, 40):
        result = _packed_check(module, torch.randn(1, n, 16), 1e-5)
        assert result.passed and result.name == "packed documents equal separate", result


def test_packed_check_is_among_the_checks():
    cfg = NSAConfig(dim=16, dim_head=4, heads=2, sliding_window_size=4, compress_block_size=4, selection_block_size=4,
                    num_selected_blocks=2, causal=False)
    names = {r.name: r.passed for r in run_checks(cfg, seq_len=23, batch=2)}
    assert names["packed documents equal separate"]
