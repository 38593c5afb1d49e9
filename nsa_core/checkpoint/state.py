"""State dicts against a module: every missing, unexpected or wrongly shaped tensor by name, and
strict loading that raises a ValueError naming them (torch's own message names none on one line)."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

MAX_LISTED = 6


def tensor_mismatches(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]],
                      ignore_prefixes: Iterable[str] = ()) -> list[str]:
    """One sentence per tensor that is missing, unexpected or shaped otherwise than expected
    (name -> shape on both sides); names under `ignore_prefixes` (e.g. "k_compress.") are skipped."""
    ignore = tuple(ignore_prefixes)
    problems = []
    for name, shape in expected.items():
        if ignore and name.startswith(ignore):
            continue
        if name not in found:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif list(found[name]) != list(shape):
            problems.append(f"tensor {name} has shape {list(found[name])}, the config expects {list(shape)}")
    for name in found:
        if name not in expected and not (ignore and name.startswith(ignore)):
            problems.append(f"unexpected tensor {name}")
    return problems


def summarize(problems: list[str]) -> str:
    """The problems on one line, the first few listed."""
    listed = "; ".join(problems[:MAX_LISTED])
    more = len(problems) - MAX_LISTED
    return listed + (f"; and {more} more" if more > 0 else "")


def load_strictly(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """module.load_state_dict(state, strict=True), or a ValueError naming every mismatched tensor."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    problems = tensor_mismatches(expected, found)
    if problems:
        raise ValueError(f"weights in {source} do not match the config: {summarize(problems)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # what the shape check cannot see (e.g. a dtype that does not cast)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"weights in {source} do not load: {' '.join(lines[1:3]) or lines[0]}") from None
