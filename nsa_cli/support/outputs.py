"""Where a command writes: every output path checked before any work, and written one way.

- absent, or a regular file (with --force where the command asks for it): written atomically
  (nsa_core.checkpoint.files.write_atomically: a temporary file beside it, renamed over it);
- `-`: standard output, for commands that write a stream (text or bytes in one go);
- a character device, a FIFO or a socket (`/dev/stdout`, `/dev/null`, a named pipe), or any path
  under /dev or /proc: written into in place, never replaced, for commands that write a stream;
  refused by commands that write files;
- a dangling symlink: refused without --force (it is not written through); with --force the link
  itself is replaced;
- a symlink to a regular file: the file it points to is replaced (the link stays);
- a directory, a missing or read-only folder: refused (check_destination).
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from nsa_core.checkpoint.files import check_destination, write_atomically

STDOUT = "-"
_KINDS = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO (named pipe)"),
          (stat.S_ISSOCK, "socket"))


class OutputError(ValueError):
    """An output path that cannot be written as asked: one line, exit code 2."""


@dataclass(frozen=True)
class Output:
    """A checked destination: `path` (None for stdout), written atomically unless `stream`."""

    path: Path | None
    stream: bool
    force: bool

    @property
    def name(self) -> str:
        return "stdout" if self.path is None else str(self.path)

    def write(self, write: Callable[[BinaryIO], None]) -> None:
        """write(binary file object): into stdout or a device in place, else atomically."""
        if self.path is None:
            sys.stdout.flush()
            target = sys.stdout.buffer
            write(target)
            target.flush()
        elif self.stream:
            with open(self.path, "wb") as f:
                write(f)
        else:
            write_atomically(self.path, write, overwrite=True)

    def write_bytes(self, data: bytes) -> None:
        self.write(lambda f: f.write(data))


def _special_kind(mode: int) -> str | None:
    return next((kind for test, kind in _KINDS if test(mode)), None)


def _is_system_stream(path: Path) -> bool:
    """/dev/stdout, /dev/fd/1, /proc/self/fd/1, ...: names of streams, whatever they point at."""
    text = str(path.absolute())
    return text.startswith(("/dev/", "/proc/"))


def check_output(path: Path | str, force: bool, *, option: str = "-o", stream: bool = False,
                 needs_force: bool = True) -> Output:
    """The destination of `option`, checked before any work (see the module docstring).
    stream: the command writes a stream (`-` and devices allowed); needs_force: an existing
    regular file is replaced only with --force."""
    if str(path) == STDOUT:
        if not stream:
            raise OutputError(f"{option} -: this command writes a file, not a stream; give a file name")
        return Output(None, True, force)
    path = Path(path)
    if path.is_symlink() and not path.exists():
        if not force:
            raise OutputError(f"{option} {str(path)!r} is a symlink to {os.readlink(path)!r}, which does not exist; "
                              "pass --force to replace the link")
        check_destination(path, overwrite=True)
        return Output(path, False, force)
    if path.exists() and not path.is_dir():
        kind = _special_kind(path.stat().st_mode)
        if kind is not None or _is_system_stream(path):
            if not stream:
                what = kind or "system stream"
                raise OutputError(f"{option} {str(path)!r} is a {what}, not a regular file; this command writes "
                                  "regular files only")
            if not os.access(path, os.W_OK):
                raise OutputError(f"{option} {str(path)!r} is not writable (permission denied)")
            return Output(path, True, force)
        if needs_force and not force:
            raise OutputError(f"output file {str(path)!r} exists; pass --force to overwrite it")
        path = path.resolve()  # a symlink to a regular file: replace the file, keep the link
    check_destination(path, overwrite=True)
    return Output(path, False, force)


def same_file(a: Path, b: Path) -> bool:
    """True when a and b name one file (links and relative paths resolved)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()
    except OSError:
        return False
