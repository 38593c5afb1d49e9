"""Data of the quality comparison: a byte corpus every machine has, and passkey samples.

Corpus: the `*.py` files of Python's standard library (`sysconfig.get_paths()["stdlib"]`,
without `site-packages`, `dist-packages` and `__pycache__`), sorted by relative path, each file
one document followed by a 0 byte. A file is held out for validation by a hash of its
relative path, so the split is the same on every machine with the same Python. Rows are cut
from the concatenated stream (attention crosses document boundaries: there is no packing).

Passkey: `<filler> The pass key is 48213. Remember it. 48213 is the pass key. <filler> What is
the pass key? The pass key is 48213`, the needle placed at a sentence start at a chosen depth
of the filler, exactly `length + 1` bytes so that the inputs are `length` bytes and the last
`digits` labels are the key.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DOCUMENT_SEPARATOR = 0
SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__"}
HASH_BUCKETS = 10_000

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


@dataclass(frozen=True)
class ByteCorpus:
    train: Tensor  # (n_train,) uint8
    val: Tensor  # (n_val,) uint8
    description: dict  # what the corpus is: root, file counts, bytes, sha256


def stdlib_python_files(root: Path) -> list[Path]:
    """Relative paths of the standard library's .py files, sorted (skipped directories pruned)."""
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in SKIPPED_DIRECTORIES]
        files += [Path(directory, name).relative_to(root) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.as_posix())


def is_held_out(relative_path: Path, val_fraction: float) -> bool:
    digest = hashlib.sha256(relative_path.as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "little") % HASH_BUCKETS < val_fraction * HASH_BUCKETS


def _byte_stream(documents: list[bytes]) -> Tensor:
    joined = b"".join(doc + bytes([DOCUMENT_SEPARATOR]) for doc in documents)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8)


def load_stdlib_corpus(val_fraction: float, root: Path | None = None) -> ByteCorpus:
    """The standard library's sources, split into train and validation streams by file."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    files = stdlib_python_files(root)
    if not files:
        raise ValueError(f"no .py files under the standard library path {str(root)!r}")
    train_docs, val_docs, digest = [], [], hashlib.sha256()
    for relative in files:
        data = (root / relative).read_bytes()
        digest.update(relative.as_posix().encode() + b"\0" + data)
        (val_docs if is_held_out(relative, val_fraction) else train_docs).append(data)
    train, val = _byte_stream(train_docs), _byte_stream(val_docs)
    description = {
        "source": "Python standard library *.py files", "root": str(root), "files": len(files),
        "train_files": len(train_docs), "val_files": len(val_docs), "train_bytes": train.numel(),
        "val_bytes": val.numel(), "val_fraction": val_fraction, "sha256": digest.hexdigest(),
    }
    return ByteCorpus(train=train, val=val, description=description)


def random_rows(stream: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """`batch` rows of `length + 1` bytes at random offsets of `stream` -> int64 (batch, length + 1)."""
    if stream.numel() < length + 2:
        raise ValueError(f"the stream holds {stream.numel()} bytes, too few for rows of {length + 1}")
    starts = torch.randint(0, stream.numel() - length - 1, (batch,), generator=generator)
    return stream[starts[:, None] + torch.arange(length + 1)].long()


def evenly_spaced_rows(stream: Tensor, rows: int, length: int) -> Tensor:
    """`rows` rows of `length + 1` bytes spread evenly over `stream` -> int64 (rows, length + 1)."""
    if stream.numel() < length + 1:
        raise ValueError(f"the validation stream holds {stream.numel()} bytes, too few for rows of {length + 1}")
    starts = torch.linspace(0, stream.numel() - length - 1, rows).long()
    return stream[starts[:, None] + torch.arange(length + 1)].long()


# passkey ---------------------------------------------------------------------------------------


def passkey_overhead(digits: int) -> int:
    """Bytes of a passkey sample that are not filler."""
    key = "0" * digits
    return len(NEEDLE.format(key=key)) + len(QUESTION) + digits


def _filler(num_bytes: int) -> str:
    """The repeated filler cut to num_bytes so that it ends on a whole sentence (it may begin
    inside one, as a row cut from a document does)."""
    return (FILLER * (num_bytes // len(FILLER) + 1))[len(FILLER) - num_bytes % len(FILLER):] if num_bytes else ""


def _sentence_starts(text: str) -> list[int]:
    """0 and every offset of `text` right after a ". " (len(text) included when it ends a sentence)."""
    return [0] + [i + 2 for i in range(len(text) - 1) if text[i:i + 2] == ". "]


def passkey_text(length: int, depth: float, key: str) -> tuple[str, int]:
    """A sample of exactly length + 1 bytes with the needle at `depth` (0 = start, 1 = end) of the
    filler, moved back to the nearest sentence start -> (text, where the needle starts)."""
    filler_bytes = length + 1 - passkey_overhead(len(key))
    if filler_bytes < 0:
        raise ValueError(f"passkey length {length} is too short: the needle and question alone take "
                         f"{passkey_overhead(len(key))} bytes")
    filler = _filler(filler_bytes)
    starts = _sentence_starts(filler)
    before = starts[bisect.bisect_right(starts, round(depth * filler_bytes)) - 1]
    return filler[:before] + NEEDLE.format(key=key) + filler[before:] + QUESTION + key, before


def repeated_key_offset(digits: int) -> int:
    """Offset, inside the needle, of the key's second occurrence ("... Remember it. 48213 is ...")."""
    needle = NEEDLE.format(key="0" * digits)
    return needle.index("0" * digits, needle.index("0" * digits) + digits)


def random_key(rng: random.Random, digits: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(digits))


def passkey_batch(length: int, depths: list[float], digits: int, rng: random.Random) -> tuple[Tensor, Tensor, Tensor]:
    """One sample per depth, fresh keys -> inputs (b, length), labels (b, length) of bytes, and
    key_mask (b, length): True at the labels that are key digits, i.e. the last `digits` (the
    answer) and the needle's repetition of the key (a local copy)."""
    samples = [passkey_text(length, depth, random_key(rng, digits)) for depth in depths]
    rows = torch.tensor([list(text.encode("ascii")) for text, _ in samples], dtype=torch.long)
    key_mask = torch.zeros(len(samples), length, dtype=torch.bool)
    key_mask[:, -digits:] = True
    for row, (_, needle_start) in enumerate(samples):
        first = needle_start + repeated_key_offset(digits) - 1  # label j predicts byte j + 1
        key_mask[row, first:first + digits] = True
    return rows[:, :-1], rows[:, 1:], key_mask


def depth_bucket_names(buckets: int) -> list[str]:
    return [f"{i / buckets:.2f}-{(i + 1) / buckets:.2f}" for i in range(buckets)]


def stratified_depths(samples_per_bucket: int, buckets: int, rng: random.Random) -> list[tuple[int, float]]:
    """(bucket, depth) pairs: `samples_per_bucket` uniform depths inside each of `buckets` equal bins."""
    return [(b, (b + rng.random()) / buckets) for b in range(buckets) for _ in range(samples_per_bucket)]
