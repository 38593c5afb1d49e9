"""Hostile safetensors files, refused before any allocation that grows with them: JSON nesting bombs in
the header and in the embedded config, an oversized embedded config, tensors relabelled as integers
(same bytes) or of mixed dtypes, a header-only file whose embedded config is large (missing tensors,
not out of memory)."""

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from nsa_core import SparseAttention, get_preset
from nsa_core.checkpoint.safetensors import inspect_file, load_safetensors, save_safetensors

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("files") / "good.safetensors"
    save_safetensors(SparseAttention.from_config(TINY), path)
    return path


def write(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def refused_everywhere(path: Path, words: str) -> None:
    """load_safetensors raises a ValueError with these words; inspect raises it or reports it."""
    with pytest.raises(ValueError, match=re.escape(words)):
        load_safetensors(path)
    try:
        findings = inspect_file(path).findings
    except ValueError as err:
        findings = [str(err)]
    assert any(words in f for f in findings), findings


def test_a_nesting_bomb_as_the_header(tmp_path):
    bomb = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refused_everywhere(write(tmp_path / "bomb.safetensors", bomb), "nests too deeply")


def test_a_nesting_bomb_in_the_metadata_and_the_embedded_config(tmp_path, good):
    header, data = parts(good)
    deep = "[" * 100_000 + "]" * 100_000
    refused_everywhere(write(tmp_path / "meta.safetensors", {**header, "__metadata__": {"nsa_config": json.loads("[[1]]")}}, data),
                       "__metadata__ is not an object of strings")
    header["__metadata__"]["nsa_config"] = '{"dim": ' + deep + "}"
    refused_everywhere(write(tmp_path / "config.safetensors", header, data), "config nests too deeply")
    header["__metadata__"]["nsa_config"] = '{"dim": ' + "[" * 40 + "]" * 40 + "}"  # under the interpreter's guard
    refused_everywhere(write(tmp_path / "config40.safetensors", header, data), "config nests deeper than 32 levels")


def test_an_oversized_embedded_config(tmp_path, good):
    header, data = parts(good)
    config = json.loads(header["__metadata__"]["nsa_config"])
    header["__metadata__"]["nsa_config"] = json.dumps(config) + " " * 2**20
    refused_everywhere(write(tmp_path / "big.safetensors", header, data), "at most 1,048,576 are read")


def test_tensors_relabelled_as_integers_are_refused(tmp_path, good):
    header, data = parts(good)
    for info in header.values():
        if "dtype" in info:
            info["dtype"] = "I32"  # same bytes: would load as weights around 1e9
    refused_everywhere(write(tmp_path / "i32.safetensors", header, data), "tensor(s) are I32")


def test_mixed_dtypes_are_refused(tmp_path):
    state = SparseAttention.from_config(TINY).state_dict()
    state["norm.weight"] = state["norm.weight"].double()
    from safetensors.torch import save_file

    path = tmp_path / "mixed.safetensors"
    save_file(state, path, metadata={"format": "nsa", "nsa_config": TINY.to_json(indent=None), "compress_mlp": "default"})
    refused_everywhere(path, "tensors mix dtypes (F32 x 16, F64 x 1)")


def test_a_header_only_file_with_a_large_config_reports_missing_tensors_without_building(tmp_path, monkeypatch):
    config = get_preset("paper").replace(dim=2**17)  # a module of ~2.5 GB
    path = write(tmp_path / "hdr.safetensors", {"__metadata__": {"format": "nsa", "nsa_config": config.to_json(indent=None),
                                                                 "compress_mlp": "default"}})
    assert path.stat().st_size < 1000

    real = SparseAttention.from_config

    def only_on_meta(cfg, **modules):  # the header check builds on the meta device, and nothing else may build
        if torch.empty(()).device.type != "meta":
            raise AssertionError("built a module before checking the header")
        return real(cfg, **modules)

    monkeypatch.setattr(SparseAttention, "from_config", only_on_meta)
    refused_everywhere(path, "missing tensor to_qkv.weight (expected shape [9216, 131072])")


def test_a_good_file_still_loads(good):
    module = load_safetensors(good)
    assert module.config == TINY and inspect_file(good).passed
