"""What every command shares: consoles, the user-error contract (one line, exit 2), checks of
options and paths made before any work, config resolution, JSON output."""

from __future__ import annotations

import functools
import json
import math
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import torch
import typer
from rich.console import Console
from safetensors import SafetensorError

from nsa_core.checkpoint.files import check_input_file
from nsa_core.config import NSAConfig, get_preset
from nsa_core.limits import MAX_CONFIG_BYTES, MAX_SIZE, check_elements

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class UsageError(ValueError):
    """A bad command line: reported on one line, exit code 2."""


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


# what a user's input or environment causes; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, TypeError, OSError, SafetensorError)


def error_message(err: BaseException) -> str:
    """One line naming what is wrong."""
    if _is_out_of_memory(err):
        first = str(err).splitlines()[0] if str(err) else ""
        return f"out of memory{': ' + first if first else ''} (try a smaller --seq-len, --batch or config)"
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename!r}" if err.filename is not None else ""
        return f"{err.strerror}{where}"
    if isinstance(err, SafetensorError):
        return f"not a readable safetensors file: {str(err).splitlines()[0]}"
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


def cli_errors(fn: Callable) -> Callable:
    """Turn errors caused by the user's input or environment (bad values, files, permissions, full
    or read-only disks, malformed checkpoints, running out of memory) into one line on stderr and
    exit code 2. Other exceptions are bugs: they keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return fn(*args, **kwargs)
        except Exception as err:
            if not (isinstance(err, USER_ERRORS) or _is_out_of_memory(err)):
                raise
            err_console.print(f"error: {error_message(err)}", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


MAX_SEED = 2**64 - 1  # torch.manual_seed's range


def check_int(option: str, value: int, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """A command-line integer checked before any work, within what the library runs (sizes: at most
    2**31 - 1, nsa_core.limits): a UsageError naming the option otherwise."""
    if value < minimum:
        raise UsageError(f"{option} must be an integer >= {minimum}, got {value}")
    if value > maximum:
        raise UsageError(f"{option} must be at most {maximum}, got {value}")
    return value


def check_seed(value: int) -> int:
    return check_int("--seed", value, minimum=0, maximum=MAX_SEED)


def check_input_size(cfg: NSAConfig, batch: int, seq_len: int) -> None:
    """Before allocating a (batch, seq_len, dim) input: it and its q/k/v projection within the
    library's tensor bound, or a UsageError naming the options."""
    width = max(cfg.dim, (cfg.heads + 2 * (3 if cfg.independent_kv else 1) * cfg.num_kv_heads) * cfg.dim_head)
    try:
        check_elements(f"an input of --batch {batch} x --seq-len {seq_len} (x {width}: the config's widest activation)",
                       batch * seq_len * width)
    except ValueError as err:
        raise UsageError(str(err)) from None


_FIELD_TYPES = {f.name: f.type for f in fields(NSAConfig)}
_BOOL_FIELDS = {name for name, kind in _FIELD_TYPES.items() if str(kind).startswith("bool")}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_options_help() -> str:
    """The config options a command takes as extra arguments, for its help and errors."""
    return ", ".join(f"{_option(n)}/--no-{_option(n)[2:]}" if n in _BOOL_FIELDS else _option(n) for n in _FIELD_TYPES)


def _shown(raw: str) -> str:
    return repr(raw) if len(raw) <= 40 else repr(raw[:40]) + f"... ({len(raw)} characters)"


def _within_sizes(name: str, value: Any) -> Any:
    """An integer config option at most the library's size bound, named as the option."""
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SIZE:
        raise UsageError(f"{_option(name)} must be at most {MAX_SIZE} (2**31 - 1), got {value}")
    return value


def coerce_field(name: str, raw: str) -> Any:
    """A (non-boolean) config field's value from its command-line text."""
    if name not in _FIELD_TYPES:
        raise UsageError(f"unknown option {_option(name)}; config options: {config_options_help()}")
    kind = str(_FIELD_TYPES[name])
    text = raw.strip()
    if "None" in kind and text.lower() in ("none", "null", ""):
        return None
    if kind.startswith("int"):
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{_option(name)} must be an integer, got {_shown(raw)}") from None
        return _within_sizes(name, value)
    if kind.startswith("tuple"):  # gate_biases: numbers separated by commas
        try:
            values = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise UsageError(f"{_option(name)} must be numbers separated by commas (e.g. 0,0,0), got {_shown(raw)}") from None
        if not all(math.isfinite(v) for v in values):
            raise UsageError(f"{_option(name)} must be finite numbers, got {_shown(raw)}")
        return values
    if kind.startswith("float"):
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{_option(name)} must be a number, got {_shown(raw)}") from None
        if not math.isfinite(value):
            raise UsageError(f"{_option(name)} must be a finite number, got {raw!r}")
        return value
    return text


def parse_field_options(args: list[str]) -> dict[str, Any]:
    """['--kv-heads', '4', '--no-causal'] or ['--kv-heads=4', '--causal'] -> {'kv_heads': 4, 'causal': False}.
    Booleans are flags, --name / --no-name, as everywhere in the CLI."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}; config options look like --kv-heads 4 or --no-causal")
        key, eq, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in _BOOL_FIELDS
        if name in _BOOL_FIELDS or negated:
            flag = name[3:] if negated else name
            follows = args[i + 1].lower() if i + 1 < len(args) else ""
            if eq or follows in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                raise UsageError(f"{_option(flag)} is a flag and takes no value: use {_option(flag)} or --no-{_option(flag)[2:]}")
            out[flag] = not negated
            i += 1
            continue
        if not eq:
            if name not in _FIELD_TYPES:
                coerce_field(name, "")  # the unknown-option error
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UsageError(f"option {arg} needs a value")
            value = args[i + 1]
            i += 1
        out[name] = coerce_field(name, value)
        i += 1
    return out


def load_config_file(path: Path) -> NSAConfig:
    """A config JSON file, or a UsageError naming the file and what is wrong with it."""
    check_input_file(path, "config file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UsageError(f"config file {str(path)!r} is {path.stat().st_size:,} bytes; at most {MAX_CONFIG_BYTES:,} are read")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"config file {str(path)!r} is not text (JSON expected)") from None
    try:
        return NSAConfig.from_json(text)
    except (ValueError, TypeError) as err:
        raise UsageError(f"config file {str(path)!r}: {error_message(err)}") from None


def resolve_config(preset: str | None, config_file: Path | None, overrides: dict[str, Any] | None = None, default_preset: str = "seeds") -> NSAConfig:
    if preset and config_file:
        raise UsageError("give --preset or --config, not both")
    if config_file is not None:
        cfg = load_config_file(config_file)
    else:
        cfg = get_preset(preset or default_preset)
    changes = {k: _within_sizes(k, v) for k, v in (overrides or {}).items() if v is not None}
    return cfg.replace(**changes) if changes else cfg


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
