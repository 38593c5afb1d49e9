"""NSAConfig validation and round trip; every user error names its argument."""


import pytest
import torch

from helpers import rotate
from nsa_core import NSAConfig, SparseAttention, get_preset
from nsa_core.config import PRESETS

BASE = dict(dim=32, dim_head=8, heads=4, sliding_window_size=2, compress_block_size=4, selection_block_size=4,
            num_selected_blocks=2)


def test_json_round_trip_and_from_config(tmp_path):
    cfg = NSAConfig(**BASE, kv_heads=2, causal=True, compress_block_sliding_stride=2, use_diff_topk=True)
    assert NSAConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert NSAConfig.load(tmp_path / "c.json") == cfg
    module = SparseAttention.from_config(cfg)
    assert module.config == cfg
    assert module.kv_heads == 2 and module.stride == 2


def test_presets_build():
    for name in PRESETS:
        cfg = get_preset(name)
        with torch.device("meta"):
            SparseAttention.from_config(cfg)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")


def test_stride_defaults_to_block():
    assert NSAConfig(**BASE).stride == 4


@pytest.mark.parametrize(
    "changes, exc, match",
    [
        (dict(kv_heads=3), ValueError, "kv_heads must divide heads"),
        (dict(dim=0), ValueError, "dim must be"),
        (dict(dim_head=-1), ValueError, "dim_head must be"),
        (dict(heads=2.5), TypeError, "heads must be an int"),
        (dict(sliding_window_size=0), ValueError, "sliding_window_size"),
        (dict(compress_block_size=0), ValueError, "compress_block_size"),
        (dict(compress_block_sliding_stride=8), ValueError, "compress_block_sliding_stride must be <="),
        (dict(compress_block_sliding_stride=0), ValueError, "compress_block_sliding_stride"),
        (dict(selection_block_size=6), ValueError, "selection_block_size .* multiple or a divisor"),
        (dict(num_selected_blocks=-1), ValueError, "num_selected_blocks"),
        (dict(num_compressed_mem_kv=0), ValueError, "num_compressed_mem_kv"),
        (dict(causal="yes"), TypeError, "causal must be a bool"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(compress_mlp_expand_factor=0), ValueError, "compress_mlp_expand_factor"),
    ],
)
def test_bad_arguments(changes, exc, match):
    with pytest.raises(exc, match=match):
        NSAConfig(**{**BASE, **changes})
    with pytest.raises(exc, match=match):
        SparseAttention(**{**BASE, **changes})


def test_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="unknown config keys"):
        NSAConfig.from_dict({**BASE, "heads_typo": 3})
    with pytest.raises(ValueError, match="missing required keys"):
        NSAConfig.from_dict({"dim": 3})
    with pytest.raises(ValueError, match="not valid JSON"):
        NSAConfig.from_json("{")


def test_zero_selected_warns_not_prints(capsys):
    with pytest.warns(UserWarning, match="num_selected_blocks=0"):
        SparseAttention(**{**BASE, "num_selected_blocks": 0})
    assert capsys.readouterr().out == ""


def test_bad_inputs():
    attn = SparseAttention(**BASE)
    with pytest.raises(ValueError, match="last dim must be dim=32"):
        attn(torch.randn(1, 5, 31))
    with pytest.raises(ValueError, match="shape \\(batch, seq, dim=32\\)"):
        attn(torch.randn(5, 32))
    with pytest.raises(TypeError, match="floating"):
        attn(torch.ones(1, 5, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        attn([[1.0] * 32])


def test_backend_choices():
    with pytest.raises(ValueError, match="contradicts"):
        SparseAttention(**BASE, use_triton_kernel=True, backend="torch")
    assert SparseAttention(**BASE, use_triton_kernel=True).config.backend == "triton"
    with pytest.raises(TypeError, match="compress_mlp must be an nn.Module"):
        SparseAttention(**BASE, compress_mlp=lambda x: x)


def test_rotary_by_head_slices_equals_whole(monkeypatch):
    from nsa_core.model.rotary import RotaryEmbedding
    from nsa_core.reference import rotary

    emb = RotaryEmbedding(16)
    t = torch.randn(2, 6, 33, 16).to(torch.bfloat16)
    whole = rotate(emb, t, offset=5)
    monkeypatch.setattr(rotary, "CHUNK_ELEMENTS", 100)
    assert torch.equal(rotate(emb, t, offset=5), whole)
