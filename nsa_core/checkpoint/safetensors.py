"""safetensors files of SparseAttention weights with the NSAConfig in the metadata: the format,
atomic writes, header reading and checks against a config, save and load.

Metadata (string values only): "format" = "nsa", "nsa_version", "nsa_config" (the config as
JSON) and "compress_mlp" ("default" or the class name of a custom network, which
load_safetensors cannot rebuild by itself).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from nsa_core.config import NSAConfig
from nsa_core.model.attention import SparseAttention

FORMAT = "nsa"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _compress_mlp_kind(module: SparseAttention) -> str:
    from nsa_core.model.compress_networks import default_compress_mlp

    cfg = module.config
    reference = default_compress_mlp(cfg.dim_head, cfg.compress_block_size, cfg.compress_mlp_expand_factor)
    ours = module.k_compress
    same = type(ours) is type(reference) and [
        (n, tuple(p.shape)) for n, p in ours.named_parameters()
    ] == [(n, tuple(p.shape)) for n, p in reference.named_parameters()]
    return "default" if same else type(ours).__name__


def write_atomically(path: str | Path, write: Callable[[str], None], overwrite: bool = False) -> None:
    """write(temporary path) beside `path`, then rename it over `path`: never a half-written file,
    and an existing file only replaced with overwrite=True."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"output file {str(path)!r} exists; pass overwrite=True (the CLI's --force) to replace it")
    if not path.parent.exists():
        raise ValueError(f"output directory {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(module: SparseAttention, path: str | Path, overwrite: bool = False) -> None:
    if not isinstance(module, SparseAttention):
        raise TypeError(f"module must be a SparseAttention, got {type(module).__name__}")
    from nsa_core import __version__

    metadata = {
        "format": FORMAT,
        "nsa_version": __version__,
        "nsa_config": module.config.to_json(indent=None),
        "compress_mlp": _compress_mlp_kind(module),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, tensors) from the header alone; tensors maps name -> {dtype, shape, bytes}."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > 100_000_000:
            raise ValueError(f"{str(path)!r} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{str(path)!r} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            tensors[name] = {"dtype": info["dtype"], "shape": list(info["shape"]), "bytes": end - start}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{str(path)!r} has a malformed entry for tensor {name!r}") from None
    return metadata, tensors


def config_from_metadata(metadata: dict[str, str]) -> NSAConfig:
    if "nsa_config" not in metadata:
        raise ValueError("file has no 'nsa_config' metadata: it was not written by nsa export / save_safetensors")
    return NSAConfig.from_json(metadata["nsa_config"])


def expected_tensors(cfg: NSAConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a default-built module of this config holds."""
    with torch.device("meta"):
        module = SparseAttention.from_config(cfg)
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def load_safetensors(path: str | Path, device: str | torch.device = "cpu", **modules) -> SparseAttention:
    """Rebuild the module from the embedded config and load the weights (strict).
    A custom compression network must be passed again as `compress_mlp=`."""
    metadata, _ = read_header(path)
    cfg = config_from_metadata(metadata)
    kind = metadata.get("compress_mlp", "default")
    if kind != "default" and "compress_mlp" not in modules:
        raise ValueError(f"file was saved with a custom compression network ({kind}); pass compress_mlp= to load it")
    module = SparseAttention.from_config(cfg, **modules)
    state = load_file(str(path), device=str(device))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights in {str(path)!r} do not match its config: {err}") from None
    return module.to(device)


def check_against_config(metadata: dict[str, str], tensors: dict[str, dict]) -> tuple[dict | None, list[str]]:
    """(config dict or None, warnings) for tensors the config does not expect, misses or shapes otherwise."""
    warnings_: list[str] = []
    if "nsa_config" not in metadata:
        return None, ["no nsa config in the metadata: not written by nsa export"]
    cfg = NSAConfig.from_json(metadata["nsa_config"])
    if metadata.get("compress_mlp", "default") != "default":
        warnings_.append(f"custom compression network {metadata['compress_mlp']}: its tensors are not checked")
    expected = expected_tensors(cfg)
    custom = metadata.get("compress_mlp", "default") != "default"
    for name, shape in expected.items():
        if custom and name.split(".")[0] in ("k_compress", "v_compress"):
            continue
        if name not in tensors:
            warnings_.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif list(shape) != tensors[name]["shape"]:
            warnings_.append(f"tensor {name} has shape {tensors[name]['shape']}, the config expects {list(shape)}")
    for name in tensors:
        if name not in expected and not (custom and name.split(".")[0] in ("k_compress", "v_compress")):
            warnings_.append(f"unexpected tensor {name}")
    return cfg.to_dict(), warnings_
