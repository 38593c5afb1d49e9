import pytest
import torch

from helpers import randomize_, rel_err
from nsa_core import NSAConfig, SparseAttention
from nsa_core import compress_networks as cn
from nsa_core.checkpoint.lucidrains import from_lucidrains, infer_config
from nsa_core.checkpoint.safetensors import expected_tensors, load_safetensors, read_header, save_safetensors

CFG = NSAConfig(dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=2, compress_block_size=4,
                compress_block_sliding_stride=2, selection_block_size=4, num_selected_blocks=2, causal=True,
                num_compressed_mem_kv=2, compress_mlp_expand_factor=2.0)


def test_save_load_round_trip(tmp_path):
    module = randomize_(SparseAttention.from_config(CFG))
    path = tmp_path / "w.safetensors"
    save_safetensors(module, path)
    loaded = load_safetensors(path)
    assert loaded.config == CFG
    x = torch.randn(1, 13, 32)
    torch.testing.assert_close(loaded(x), module(x))
    metadata, tensors = read_header(path)
    assert metadata["format"] == "nsa" and metadata["compress_mlp"] == "default"
    assert set(tensors) == set(expected_tensors(CFG))
    assert tensors["to_qkv.weight"]["shape"] == [64, 32] and tensors["to_qkv.weight"]["bytes"] == 64 * 32 * 4


def test_save_never_overwrites_without_permission(tmp_path):
    module = SparseAttention.from_config(CFG)
    path = tmp_path / "w.safetensors"
    path.write_text("keep me")
    with pytest.raises(ValueError, match="exists"):
        save_safetensors(module, path)
    assert path.read_text() == "keep me"
    save_safetensors(module, path, overwrite=True)
    assert read_header(path)[0]["format"] == "nsa"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left behind


def test_custom_compression_network_must_be_given(tmp_path):
    module = SparseAttention.from_config(CFG, compress_mlp=cn.AttentionPool(8, 4))
    path = tmp_path / "w.safetensors"
    save_safetensors(module, path)
    with pytest.raises(ValueError, match="custom compression network"):
        load_safetensors(path)
    assert isinstance(load_safetensors(path, compress_mlp=cn.AttentionPool(8, 4)).k_compress, cn.AttentionPool)


def test_corrupt_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(bad)
    bad.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_header(tmp_path / "missing.safetensors")


def test_infer_config_from_lucidrains_checkpoint():
    oracle = pytest.importorskip("native_sparse_attention_pytorch")
    theirs = randomize_(oracle.SparseAttention(
        dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=2, compress_block_size=4,
        compress_block_sliding_stride=2, selection_block_size=4, num_selected_blocks=2, causal=True,
        num_compressed_mem_kv=2, compress_mlp_expand_factor=2.0))
    state = theirs.state_dict()
    with pytest.raises(ValueError, match="cannot tell"):
        infer_config(state)
    cfg = infer_config(state, causal=True, sliding_window_size=2, compress_block_sliding_stride=2,
                       selection_block_size=4, num_selected_blocks=2)
    assert cfg == CFG
    ours = SparseAttention.from_config(cfg)
    ours.load_state_dict(from_lucidrains(state), strict=True)
    x = torch.randn(1, 11, 32)
    assert rel_err(ours(x), theirs(x)) < 2e-5


def test_convert_rejects_non_checkpoints():
    with pytest.raises(ValueError, match="not a SparseAttention state dict"):
        from_lucidrains({"weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="state dict"):
        from_lucidrains([1, 2])
