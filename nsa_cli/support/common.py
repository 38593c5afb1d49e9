"""What every command shares: consoles, the user-error contract, config resolution, JSON output."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console

from nsa_core.config import NSAConfig, get_preset

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class UsageError(ValueError):
    """A bad command line: reported on one line, exit code 2."""


def cli_errors(fn: Callable) -> Callable:
    """Turn user errors into one line on stderr and exit code 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return fn(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            err_console.print(f"error: {message}", markup=False)
            raise typer.Exit(2) from None

    return wrapper


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


_FIELD_TYPES = {f.name: f.type for f in fields(NSAConfig)}


def coerce_field(name: str, raw: str) -> Any:
    """A config field's value from its command-line text."""
    if name not in _FIELD_TYPES:
        raise UsageError(f"unknown option --{name.replace('_', '-')}; config options: "
                         + ", ".join("--" + n.replace("_", "-") for n in _FIELD_TYPES))
    kind = str(_FIELD_TYPES[name])
    text = raw.strip()
    if "None" in kind and text.lower() in ("none", "null", ""):
        return None
    if kind.startswith("bool"):
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"--{name.replace('_', '-')} must be true or false, got {raw!r}")
    if kind.startswith("int"):
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer, got {raw!r}") from None
    if kind.startswith("float"):
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--{name.replace('_', '-')} must be a number, got {raw!r}") from None
    return text


def parse_field_options(args: list[str]) -> dict[str, Any]:
    """['--kv-heads', '4', '--causal', 'false'] or ['--kv-heads=4'] -> {'kv_heads': 4, 'causal': False}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}; config options look like --kv-heads 4")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UsageError(f"option {arg} needs a value")
            value = args[i + 1]
            i += 1
        name = key.replace("-", "_")
        out[name] = coerce_field(name, value)
        i += 1
    return out


def resolve_config(preset: str | None, config_file: Path | None, overrides: dict[str, Any] | None = None, default_preset: str = "seeds") -> NSAConfig:
    if preset and config_file:
        raise UsageError("give --preset or --config, not both")
    if config_file is not None:
        cfg = NSAConfig.load(config_file)
    else:
        cfg = get_preset(preset or default_preset)
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    return cfg.replace(**changes) if changes else cfg


def check_output_path(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UsageError(f"output file {str(path)!r} exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise UsageError(f"output directory {str(path.parent)!r} does not exist")


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
