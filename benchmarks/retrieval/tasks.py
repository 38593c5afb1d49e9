"""The retrieval tasks: rows generated on the fly, seeded, on the model's device, and the length
curriculum.

- `NeedleTask`: a row of filler tokens; somewhere a KEY marker followed by a VALUE token (one of
  `num_values`: chance 1 / num_values); the row's last token is the KEY marker again and the
  answer is the value. The value sits `distance` tokens before the query, distance uniform in
  [min_distance, length - 2] (min_distance > the sliding window: the window never sees it).
- `MQARTask` (multi-query associative recall, Zoology / Based): `num_pairs` key-value pairs
  (k1 v1 k2 v2 ...), then the keys again in random order at random positions of the rest of
  the row (filler between them); every queried key's value is an answer.

Token ids. Needle: values 0 .. V-1, the KEY marker V, filler V+1 ... MQAR: filler 0, keys
1 .. K, values K+1 .. vocab-1 (K = (vocab - 1) // 2); keys within a row are distinct.

Dimension legend: b rows, n tokens of a row, q answers per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    ids: Tensor  # (b, n) int64 tokens
    answer_pos: Tensor  # (b, q) positions whose next-token prediction is scored
    targets: Tensor  # (b, q) the answers
    support_pos: Tensor  # (b, q) where each answer sits earlier in the row (the value token)


def _uniform_ints(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator,
                  device: torch.device) -> Tensor:
    """Integers uniform in [low, high] (inclusive)."""
    return torch.randint(low, high + 1, shape, generator=generator, device=device)


def _random_subset(population: int, count: int, rows: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(rows, count) distinct integers in [0, population), each row in random order."""
    return torch.rand(rows, population, generator=generator, device=device).argsort(dim=-1)[:, :count]


@dataclass(frozen=True)
class NeedleTask:
    min_distance: int  # smallest query - value distance (window + 1: beyond the sliding window)
    num_values: int = 16
    num_filler: int = 32
    name: str = "needle"

    def __post_init__(self) -> None:
        if self.min_distance < 1:
            raise ValueError(f"min_distance must be >= 1, got {self.min_distance}")
        if self.num_values < 2 or self.num_filler < 1:
            raise ValueError(f"num_values must be >= 2 and num_filler >= 1, got {self.num_values}, {self.num_filler}")

    @property
    def vocab_size(self) -> int:
        return self.num_values + 1 + self.num_filler

    @property
    def key_marker(self) -> int:
        return self.num_values

    @property
    def chance(self) -> float:
        return 1 / self.num_values

    def check_length(self, length: int) -> None:
        if length - 2 < self.min_distance:
            raise ValueError(f"needle rows of {length} tokens cannot hold a needle {self.min_distance} tokens before "
                             f"the query: length must be >= min_distance + 2 = {self.min_distance + 2}")

    def batch(self, rows: int, length: int, generator: torch.Generator, device: torch.device) -> Batch:
        self.check_length(length)
        V = self.num_values
        ids = _uniform_ints(V + 1, V + self.num_filler, (rows, length), generator, device)
        distance = _uniform_ints(self.min_distance, length - 2, (rows,), generator, device)
        values = _uniform_ints(0, V - 1, (rows,), generator, device)
        value_pos = length - 1 - distance
        row = torch.arange(rows, device=device)
        ids[row, value_pos] = values
        ids[row, value_pos - 1] = self.key_marker
        ids[:, -1] = self.key_marker
        answer_pos = torch.full((rows, 1), length - 1, device=device)
        return Batch(ids, answer_pos, values[:, None], value_pos[:, None])


@dataclass(frozen=True)
class MQARTask:
    num_pairs: int
    vocab: int = 8192
    name: str = "mqar"

    def __post_init__(self) -> None:
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.num_keys < self.num_pairs:
            raise ValueError(f"mqar vocab {self.vocab} holds {self.num_keys} keys, fewer than num_pairs={self.num_pairs}: "
                             f"vocab must be >= {2 * self.num_pairs + 1}")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def num_keys(self) -> int:
        return (self.vocab - 1) // 2

    @property
    def chance(self) -> float:
        return 1 / (self.vocab - 1 - self.num_keys)

    def check_length(self, length: int) -> None:
        if length < 3 * self.num_pairs:
            raise ValueError(f"mqar rows of {length} tokens cannot hold {self.num_pairs} pairs and their queries: "
                             f"length must be >= 3 * num_pairs = {3 * self.num_pairs}")

    def batch(self, rows: int, length: int, generator: torch.Generator, device: torch.device) -> Batch:
        self.check_length(length)
        N, K = self.num_pairs, self.num_keys
        keys = _random_subset(K, N, rows, generator, device) + 1  # (b, N) distinct
        values = _uniform_ints(K + 1, self.vocab - 1, (rows, N), generator, device)
        ids = torch.zeros(rows, length, dtype=torch.long, device=device)
        ids[:, 0:2 * N:2], ids[:, 1:2 * N:2] = keys, values
        query_pos = _random_subset(length - 2 * N, N, rows, generator, device).sort(dim=-1).values + 2 * N
        order = _random_subset(N, N, rows, generator, device)  # which pair each query asks for
        ids.scatter_(1, query_pos, keys.gather(1, order))
        return Batch(ids, query_pos, values.gather(1, order), 2 * order + 1)


Task = NeedleTask | MQARTask


class Curriculum:
    """Row length: starts at `start`, doubles (up to `target`) when the training accuracy over
    the last steps at the current length reaches `threshold`."""

    def __init__(self, start: int, target: int, threshold: float = 0.9):
        if not 0 < start <= target:
            raise ValueError(f"curriculum start must be in [1, target={target}], got {start}")
        self.length, self.target, self.threshold = start, target, threshold

    def update(self, recent_accuracy: float) -> bool:
        """Advance after a window of steps at the current length; True when the length changed."""
        if self.length >= self.target or recent_accuracy < self.threshold:
            return False
        self.length = min(2 * self.length, self.target)
        return True
