"""safetensors files of SparseAttention weights with the NSAConfig in the metadata: the format,
saving (atomic, serialized into our own temporary file), reading and checking a file completely
(header offsets against the file size, every tensor's bytes, names, shapes and dtypes against
the config), and loading, which checks the header against the config before building anything.

Metadata (string values only): "format" = "nsa", "nsa_version", "nsa_config" (the config as
JSON) and "compress_mlp" ("default" or the class name of a custom network, which
load_safetensors cannot rebuild by itself).

Every reader raises ValueError naming the file and what is wrong with it: a file that is not
safetensors, a truncated one, one whose header and data disagree, one whose config is invalid or
whose tensors do not match it.
"""

from __future__ import annotations

import gc
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from nsa_core.checkpoint.files import check_input_file, write_atomically, write_chunks
from nsa_core.checkpoint.state import load_strictly, summarize, tensor_mismatches
from nsa_core.config import NSAConfig
from nsa_core.limits import parse_json
from nsa_core.model.attention import SparseAttention
from nsa_core.version import __version__

FORMAT = "nsa"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
COMPRESSION_PREFIXES = ("k_compress.", "v_compress.")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _compress_mlp_kind(module: SparseAttention) -> str:
    from nsa_core.model.compress_networks import default_compress_mlp

    cfg = module.config
    reference = default_compress_mlp(cfg.dim_head, cfg.compress_block_size, cfg.compress_mlp_expand_factor)
    ours = module.k_compress
    same = type(ours) is type(reference) and [
        (n, tuple(p.shape)) for n, p in ours.named_parameters()
    ] == [(n, tuple(p.shape)) for n, p in reference.named_parameters()]
    return "default" if same else type(ours).__name__


def save_safetensors(module: SparseAttention, path: str | Path, overwrite: bool = False,
                     on_progress: Callable[[int, int], None] | None = None) -> int:
    """Write the module's state dict with its config in the metadata, atomically (see
    nsa_core.checkpoint.atomic). on_progress(bytes written, total) follows the write.
    Returns the file's size in bytes."""
    if not isinstance(module, SparseAttention):
        raise TypeError(f"module must be a SparseAttention, got {type(module).__name__}")
    metadata = {
        "format": FORMAT,
        "nsa_version": __version__,
        "nsa_config": module.config.to_json(indent=None),
        "compress_mlp": _compress_mlp_kind(module),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    data = serialize(tensors, metadata=metadata)  # bytes in memory: no temporary file of the library
    write_atomically(path, lambda f: write_chunks(f, data, on_progress), overwrite=overwrite)
    return len(data)


# reading ------------------------------------------------------------------------------------


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, tensors) from the header alone; tensors maps name -> {dtype, shape, bytes,
    data_offsets}. Raises ValueError when there is no readable header (not a safetensors file,
    or cut inside its header). The data is not checked: see file_findings."""
    metadata, tensors, _ = _read_header(path)
    return metadata, tensors


@contextmanager
def _collector_paused():
    """The cyclic garbage collector off while a header's objects are built and walked: they hold no
    cycles, and for 600k tensors its passes over the young objects cost more than the parse itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_header(path: str | Path) -> tuple[dict[str, str], dict[str, dict], int]:
    """(metadata, tensors, size of the data section in bytes)."""
    path = check_input_file(path)
    name = repr(str(path))
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{name} is not a safetensors file (too short: {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(f"{name} is not a safetensors file (header length {header_len} is implausible)")
        if header_len > size - 8:
            raise ValueError(f"{name} is truncated or not a safetensors file: its header needs {header_len} bytes, "
                             f"the file has {size - 8} after the length field")
        raw = f.read(header_len)
    with _collector_paused():
        try:  # every value kept below is type-checked, which bounds the nesting of what we use
            header = parse_json(raw, "header", MAX_HEADER_BYTES, max_depth=None)
        except ValueError as err:
            raise ValueError(f"{name} is not a safetensors file ({err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{name} is not a safetensors file (header is not an object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{name} has a malformed header: __metadata__ is not an object of strings")
        # one pass, the parsed entries kept as the table; `type(v) is int` (not isinstance) also refuses booleans
        for tensor, info in header.items():
            try:
                start, end = info["data_offsets"]
                shape = info["shape"]
                dtype = info["dtype"]
                if (type(start) is not int or type(end) is not int or start < 0 or end < 0 or type(shape) is not list
                        or type(dtype) is not str):
                    raise ValueError
                for v in shape:
                    if type(v) is not int or v < 0:
                        raise ValueError
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{name} has a malformed header entry for tensor {tensor!r}") from None
            if len(info) == 3:  # exactly dtype, shape and data_offsets: the entry itself, with its size added
                info["bytes"] = end - start
            else:  # fields the format does not define are not carried on
                header[tensor] = {"dtype": dtype, "shape": shape, "bytes": end - start, "data_offsets": [start, end]}
    return metadata, header, size - 8 - header_len


def layout_findings(tensors: dict[str, dict], data_size: int) -> list[str]:
    """What makes the data section disagree with the header: a truncated file (tensors whose
    bytes are missing), bytes after the last tensor, gaps or overlaps, sizes that do not fit
    shape x dtype, unknown dtypes. Empty when the safetensors library will read every tensor."""
    findings, cut, spans = [], [], []
    with _collector_paused():
        for tensor, info in tensors.items():  # one pass: sizes, and what lies past the end of the file
            start, end = offsets = info["data_offsets"]
            width = DTYPE_BYTES.get(info["dtype"])
            if width is None:
                findings.append(f"tensor {tensor} has unknown dtype {info['dtype']!r}")
            elif end - start != (need := math.prod(info["shape"]) * width):  # also when end < start: need >= 0
                findings.append(f"tensor {tensor} ({info['dtype']} {info['shape']}) needs {need} bytes, "
                                f"its data_offsets {offsets} give {end - start}")
            if end > data_size:
                cut.append(tensor)
            spans.append(offsets)
        if cut:
            cut.sort()
            needed = max(end for _, end in spans)
            findings.append(f"file is truncated: the header places tensor data up to byte {needed}, the file holds "
                            f"{data_size}; {len(cut)} of {len(tensors)} tensors lack their bytes ({', '.join(cut[:4])}"
                            f"{', ...' if len(cut) > 4 else ''})")
        # in order of (start, end) (lists compare so): each tensor starts where the data so far ends
        order = sorted(range(len(spans)), key=spans.__getitem__)
        names = list(tensors)
        position = 0
        for i in order:
            start, end = spans[i]
            if start != position:
                findings.append(f"tensor {names[i]} starts at byte {start} of the data, the previous one ends at "
                                f"{position} (gap or overlap)")
            if end > position:
                position = end
    if not cut and position < data_size:
        findings.append(f"{data_size - position} bytes after the last tensor (the header places data up to byte "
                        f"{position} of {data_size})")
    return findings


def file_findings(path: str | Path) -> tuple[dict[str, str], dict[str, dict], list[str]]:
    """(metadata, tensors, layout findings): read_header plus the data section checked against it."""
    metadata, tensors, data_size = _read_header(path)
    return metadata, tensors, layout_findings(tensors, data_size)


def check_file(path: str | Path) -> tuple[dict[str, str], dict[str, dict]]:
    """read_header, raising ValueError when the data does not match the header (truncated...)."""
    metadata, tensors, findings = file_findings(path)
    if findings:
        raise ValueError(f"{str(path)!r} cannot be loaded: {summarize(findings)}")
    return metadata, tensors


def read_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, after check_file; the library's own errors as ValueError."""
    check_file(path)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise ValueError(f"{str(path)!r} cannot be read as safetensors: {str(err).splitlines()[0]}") from None


# the config -----------------------------------------------------------------------------------


def config_from_metadata(metadata: dict[str, str], source: str = "file") -> NSAConfig:
    if "nsa_config" not in metadata:
        raise ValueError(f"{source} has no 'nsa_config' metadata: it was not written by nsa export / save_safetensors")
    try:
        return NSAConfig.from_json(metadata["nsa_config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source} holds an invalid config: {err}") from None


def expected_tensors(cfg: NSAConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a default-built module of this config holds."""
    with torch.device("meta"):
        module = SparseAttention.from_config(cfg)
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def dtype_findings(tensors: dict[str, dict]) -> list[str]:
    """What breaks the format's dtype rule: every tensor floating (F16, BF16, F32, F64) and all of one
    dtype, as save_safetensors writes a module (integers of the same bytes would load as ~1e9 weights)."""
    findings = []
    for dtype in sorted(({info["dtype"] for info in tensors.values()} - set(FLOAT_DTYPES)) & set(DTYPE_BYTES)):
        names = sorted(t for t, info in tensors.items() if info["dtype"] == dtype)
        listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        findings.append(f"{len(names)} tensor(s) are {dtype} ({listed}); an nsa file holds floating tensors "
                        f"({', '.join(FLOAT_DTYPES)})")
    counts = {}
    for info in tensors.values():
        if info["dtype"] in FLOAT_DTYPES:
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    if len(counts) > 1:
        mix = ", ".join(f"{dtype} x {n}" for dtype, n in sorted(counts.items(), key=lambda item: -item[1]))
        findings.append(f"tensors mix dtypes ({mix}); a module's tensors share one")
    return findings


def tensor_findings(cfg: NSAConfig, metadata: dict[str, str], tensors: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(findings, notes) of the header's tensors against the config, from the header alone (nothing
    is allocated): dtypes, then tensors the config does not expect, misses and shapes."""
    custom = metadata.get("compress_mlp", "default") != "default"
    notes = [f"custom compression network {metadata['compress_mlp']}: its tensors are not checked"] if custom else []
    found = {name: info["shape"] for name, info in tensors.items()}
    findings = tensor_mismatches(expected_tensors(cfg), found, COMPRESSION_PREFIXES if custom else ())
    return dtype_findings(tensors) + findings, notes


def check_against_config(metadata: dict[str, str], tensors: dict[str, dict]) -> tuple[dict | None, list[str], list[str]]:
    """(config dict or None, findings, notes). Findings: no or an invalid config, tensors the
    config does not expect, misses, shapes or dtypes otherwise. Notes: what was not checked."""
    try:
        cfg = config_from_metadata(metadata, "the file")
    except ValueError as err:
        return None, [str(err)], []
    findings, notes = tensor_findings(cfg, metadata, tensors)
    return cfg.to_dict(), findings, notes


@dataclass
class FileReport:
    """Everything `inspect` shows: the header, the embedded config, and what fails a check."""

    metadata: dict[str, str]
    tensors: dict[str, dict]
    config: dict | None
    findings: list[str] = field(default_factory=list)  # reasons load_safetensors refuses the file
    notes: list[str] = field(default_factory=list)  # what was not checked

    @property
    def passed(self) -> bool:
        return not self.findings


def inspect_file(path: str | Path) -> FileReport:
    """Check a file completely: header offsets against the file size, every tensor's bytes, the
    embedded config, tensor names and shapes against it. Raises ValueError only when there is
    no header to report on."""
    metadata, tensors, findings = file_findings(path)
    config, config_findings, notes = check_against_config(metadata, tensors)
    return FileReport(metadata, tensors, config, findings + config_findings, notes)


def load_safetensors(path: str | Path, device: str | torch.device = "cpu", **modules) -> SparseAttention:
    """Rebuild the module from the embedded config and load the weights (strict).
    A custom compression network must be passed again as `compress_mlp=`. The header is checked
    against the config (every expected tensor present with its shape, floating dtypes) before the
    module is built."""
    metadata, tensors = check_file(path)
    cfg = config_from_metadata(metadata, repr(str(path)))
    kind = metadata.get("compress_mlp", "default")
    if kind != "default" and "compress_mlp" not in modules:
        raise ValueError(f"file was saved with a custom compression network ({kind}); pass compress_mlp= to load it")
    findings, _ = tensor_findings(cfg, metadata, tensors)
    if findings:
        raise ValueError(f"{str(path)!r} cannot be loaded: weights do not match the config: {summarize(findings)}")
    module = SparseAttention.from_config(cfg, **modules)
    load_strictly(module, read_tensors(path, device), repr(str(path)))
    return module.to(device)
