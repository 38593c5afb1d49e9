"""The text of the language-model comparison and its packed rows.

Corpus: the `*.py` files this Python can read — the standard library (`stdlib`) or the standard
library and every installed package (`python`) — one document per file, files with identical
bytes kept once, sorted by path, each followed by a 0 byte. A file is held out for validation by a
hash of its path, so the split is the same wherever the same files are installed.

Rows: `context + 1` bytes cut from the stream at random (training) or evenly spaced (validation)
offsets (quality_data.random_rows / evenly_spaced_rows). A row is packed: a document starts at the
row's first byte and after every separator (documents never see each other: `cu_seqlens`), and the
byte after a separator is not a label (it is the next document's first byte, which nothing before
it predicts). A token's *position* is the
number of bytes of its own document before it in the row: the context the model had for it.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SEPARATOR = 0
IGNORE = -100  # cross_entropy's ignore_index: labels that are not scored
SOURCES = ("stdlib", "python")
SKIPPED_DIRECTORIES = {"__pycache__"}
HASH_BUCKETS = 10_000


@dataclass(frozen=True)
class Corpus:
    train: Tensor  # (n_train,) uint8
    val: Tensor  # (n_val,) uint8
    description: dict  # roots, file counts, bytes, duplicates dropped, sha256


@dataclass(frozen=True)
class PackedBatch:
    """B rows of n tokens packed into one sequence of B * n (batch 1), as the models take it."""

    inputs: Tensor  # (1, B * n) int64 bytes
    labels: Tensor  # (1, B * n) int64, IGNORE where not scored
    cu_seqlens: Tensor  # (documents + 1,) int32: document d is tokens cu[d] ... cu[d + 1] - 1
    positions: Tensor  # (1, B * n) int64: bytes of the token's own document before it


def source_roots(source: str) -> list[Path]:
    """The directories a corpus reads: the standard library, and for "python" also the installed
    packages (purelib and platlib, when they differ)."""
    if source not in SOURCES:
        raise ValueError(f"corpus must be one of {SOURCES}, got {source!r}")
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"]] + ([paths["purelib"], paths["platlib"]] if source == "python" else [])
    unique = []
    for root in roots:
        if Path(root).is_dir() and Path(root) not in unique:
            unique.append(Path(root))
    return unique


def python_files(roots: list[Path]) -> list[tuple[Path, Path]]:
    """(root, relative path) of every .py file under the roots, sorted by root then path; a root
    nested in another (site-packages inside the standard library) is read once, as its own root."""
    nested = set(roots)
    files = []
    for root in roots:
        for directory, subdirectories, names in os.walk(root):
            here = Path(directory)
            subdirectories[:] = sorted(d for d in subdirectories
                                       if d not in SKIPPED_DIRECTORIES and here / d not in nested)
            files += [(root, (here / name).relative_to(root)) for name in sorted(names) if name.endswith(".py")]
    return files


def is_held_out(key: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") % HASH_BUCKETS < val_fraction * HASH_BUCKETS


def load_corpus(source: str, val_fraction: float, max_bytes: int | None = None,
                roots: list[Path] | None = None) -> Corpus:
    """The corpus, split by file; `max_bytes` stops reading once that many bytes are in (files in
    sorted order: the same prefix every time); `roots` replaces the source's directories."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1 (or None), got {max_bytes}")
    roots = source_roots(source) if roots is None else [Path(r) for r in roots]
    train, val, seen, digest = bytearray(), bytearray(), set(), hashlib.sha256()
    files = duplicates = unreadable = 0
    for root, relative in python_files(roots):
        try:
            data = (root / relative).read_bytes()
        except OSError:
            unreadable += 1
            continue
        content = hashlib.sha256(data).digest()
        if content in seen or SEPARATOR in data:  # a NUL byte would split the document
            duplicates += content in seen
            continue
        seen.add(content)
        key = f"{root.name}/{relative.as_posix()}"
        digest.update(key.encode() + b"\0" + content)
        (val if is_held_out(key, val_fraction) else train).extend(data + bytes([SEPARATOR]))
        files += 1
        if max_bytes is not None and len(train) + len(val) >= max_bytes:
            break
    if not train or not val:
        raise ValueError(f"the {source!r} corpus under {[str(r) for r in roots]} has too few files for a split "
                         f"({files} read)")
    description = {
        "source": source, "roots": [str(r) for r in roots], "files": files, "duplicate_files_dropped": duplicates,
        "unreadable_files": unreadable, "train_bytes": len(train), "val_bytes": len(val), "val_fraction": val_fraction,
        "max_bytes": max_bytes, "sha256": digest.hexdigest(),
    }
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8)
    return Corpus(train=as_tensor(train), val=as_tensor(val), description=description)


def pack(rows: Tensor, cap: int | None = None) -> PackedBatch:
    """rows (B, n + 1) of bytes -> the packed batch of their n-token inputs. With `cap`, documents
    are also cut every `cap` tokens of their own (a piece sees at most `cap - 1` bytes before it):
    the same labels, with the context capped."""
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must be (batch, n + 1) with n >= 1, got shape {tuple(rows.shape)}")
    inputs, labels = rows[:, :-1], rows[:, 1:].clone()
    B, n = inputs.shape
    starts = torch.zeros(B, n, dtype=torch.bool, device=rows.device)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == SEPARATOR
    labels[inputs == SEPARATOR] = IGNORE
    positions = _positions(starts)
    if cap is not None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1 token, got {cap}")
        starts = starts | (positions % cap == 0)
        positions = _positions(starts)
    flat = starts.flatten()
    cu = torch.cat((flat.nonzero().flatten(), torch.tensor([B * n], device=rows.device))).to(torch.int32)
    return PackedBatch(inputs.reshape(1, -1), labels.reshape(1, -1), cu, positions.reshape(1, -1))


def _positions(starts: Tensor) -> Tensor:
    """starts (B, n) bool, True at each document's first token -> each token's offset in its document."""
    index = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start
