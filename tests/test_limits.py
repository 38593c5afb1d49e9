"""The library's bounds (nsa_core/limits.py): NSAConfig sizes at most 2**31 - 1 and its largest tensors
at most 2**40 elements, each error naming the argument and the limit; JSON within bytes and nesting,
a ValueError and never a RecursionError."""

import pytest

from nsa_core import NSAConfig, get_preset
from nsa_core.limits import MAX_ELEMENTS, MAX_SIZE, json_depth, parse_json

PAPER = get_preset("paper")


@pytest.mark.parametrize("name", ["dim", "dim_head", "heads", "sliding_window_size", "compress_block_size",
                                  "num_selected_blocks", "num_compressed_mem_kv", "kv_heads", "compress_block_sliding_stride"])
def test_every_size_is_at_most_2_31_minus_1(name):
    with pytest.raises(ValueError, match=rf"{name} must be at most 2147483647 \(2\*\*31 - 1"):
        PAPER.replace(**{name: MAX_SIZE + 1})


@pytest.mark.parametrize("change, what", [
    (dict(dim=2**30), "to_qkv.weight"),
    (dict(compress_mlp_expand_factor=1e300), "compression MLP"),
    (dict(num_compressed_mem_kv=2**31 - 1), "compress_mem_kv"),
])
def test_the_largest_tensors_are_within_2_40_elements(change, what):
    with pytest.raises(ValueError, match=rf"{what}.*at most 1,099,511,627,776 \(2\*\*40\)"):
        PAPER.replace(**change)


def test_a_config_at_the_bounds_still_validates():
    cfg = PAPER.replace(sliding_window_size=MAX_SIZE, num_selected_blocks=MAX_SIZE, dim=2**20)
    assert cfg.dim * (cfg.heads + 2 * cfg.num_kv_heads) * cfg.dim_head <= MAX_ELEMENTS


def test_json_within_bounds():
    assert parse_json('{"a": [1, {"b": 2}]}', "x", 100) == {"a": [1, {"b": 2}]}
    with pytest.raises(ValueError, match="x nests too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000, "x", 10**6)
    with pytest.raises(ValueError, match="x nests deeper than 3 levels"):
        parse_json("[[[[1]]]]", "x", 100, max_depth=3)
    with pytest.raises(ValueError, match="x is 101 bytes long; at most 100"):
        parse_json(" " * 101, "x", 100)
    with pytest.raises(ValueError, match="x is not valid JSON"):
        parse_json('{"a": 1' + "0" * 5000 + "}", "x", 10**6)
    assert json_depth(3, 5) == 0 and json_depth([], 5) == 1 and json_depth({"a": [[]]}, 5) == 3
    with pytest.raises(ValueError, match="config nests too deeply"):
        NSAConfig.from_json('{"dim": ' + "[" * 100_000 + "]" * 100_000 + "}")
