"""The bounds of what the library accepts, checked before any work that grows with them: each size
(a config's dimensions and block sizes, a sequence length, a batch), the elements of one tensor, and
JSON text (its bytes and its nesting: config files, safetensors headers, the config a file embeds).
Each error names what broke the bound and the bound.
"""

from __future__ import annotations

import json
from typing import Any

MAX_SIZE = 2**31 - 1  # any one size: a launch grid's axis and a (batch, head) row's offsets are 32-bit (kernels/outputs.py)
MAX_ELEMENTS = 2**40  # elements of one tensor (4 TiB at fp32: more than any one device holds)
MAX_CONFIG_BYTES = 2**20  # a config's JSON (a real one is under 1 KiB)
MAX_JSON_DEPTH = 32  # nesting of a JSON value we read (a config nests 1 level, a safetensors header 3)

SIZE_RULE = f"{MAX_SIZE} (2**31 - 1: the kernels' 32-bit sizes)"
ELEMENTS_RULE = f"{MAX_ELEMENTS:,} (2**40) elements in one tensor"


def check_elements(what: str, count: int) -> None:
    """ValueError when a tensor of `count` elements (described by `what`) is beyond MAX_ELEMENTS."""
    if count > MAX_ELEMENTS:
        shown = f"{count:,}" if count < 10**15 else f"about {float(count):.2g}"
        raise ValueError(f"{what} would hold {shown} elements; the library takes at most {ELEMENTS_RULE}")


def parse_json(text: str | bytes, what: str, max_bytes: int, max_depth: int | None = MAX_JSON_DEPTH) -> Any:
    """json.loads within bounds: a ValueError naming `what` when the text is over max_bytes, is not
    JSON, or nests deeper than max_depth (None: only the interpreter's recursion guard, for callers
    that check the structure of every value they keep), never a RecursionError."""
    if len(text) > max_bytes:
        raise ValueError(f"{what} is {len(text):,} bytes long; at most {max_bytes:,} are read")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} nests too deeply (at most {max_depth or MAX_JSON_DEPTH} levels are read)") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, and integers of over 4300 digits
        raise ValueError(f"{what} is not valid JSON: {str(err).splitlines()[0][:200]}") from None
    if max_depth is not None and json_depth(data, max_depth) > max_depth:
        raise ValueError(f"{what} nests deeper than {max_depth} levels")
    return data


def json_depth(data: Any, stop_after: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar 0, [] or {} 1, ...), walked without recursion;
    stops counting once it passes `stop_after`."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > stop_after:
            return deepest
        stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return deepest
