"""Files of the checkpoint layer: inputs checked for what they are (missing, a directory...), and
atomic writes: one temporary file of ours beside the destination, renamed over it.

The temporary file is named after the destination (`.NAME.nsa-tmp`), so there is never more than
one per destination: a stale one left by a killed process (SIGKILL) is removed by the next write
to that destination. A writer holds an flock on its temporary file until the rename: a second
writer to the same destination meanwhile fails with a BlockingIOError naming it (it never removes
or renames the first one's file), and writers one after another both succeed. SIGINT and SIGTERM during a write remove it and then take their usual
course (the previous handlers are restored and the signal is raised again). The file gets the
mode the umask gives, like any file the process creates.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_SUFFIX = ".nsa-tmp"
CHUNK_BYTES = 16 * 2**20


def temporary_path(path: str | Path) -> Path:
    """The one temporary file a write to `path` uses: `.NAME.nsa-tmp` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def check_input_file(path: str | Path, what: str = "file") -> Path:
    """The path of an existing regular file, or a ValueError saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file")
    if not path.exists():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} is not a regular file")
    return path


def check_destination(path: str | Path, overwrite: bool = False) -> Path:
    """Raise ValueError when `path` cannot be written: an existing file without overwrite, a
    directory, a missing or read-only folder. Cheap: call it before long work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"output file {str(path)!r} exists; pass overwrite=True (the CLI's --force) to replace it")
    parent = path.parent
    if not parent.exists():
        raise ValueError(f"output directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise ValueError(f"output directory {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {str(parent)!r} is not writable (permission denied or read-only file system)")
    return path


class _Interrupted(BaseException):
    """Raised by our signal handler: unwinds the write (BaseException: no `except Exception` stops it)."""


def _install_handlers(state: dict) -> dict:
    """Handlers for SIGINT/SIGTERM that record the signal and raise _Interrupted (until cleanup
    starts); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be set from the main thread

    def handler(signum, frame):
        if state["signal"] is None:
            state["signal"] = signum
            if not state["cleaning_up"]:
                raise _Interrupted()

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old = signal.getsignal(sig)
        if old is signal.SIG_IGN or old is None:  # ignored (or set outside Python): leave as is
            continue
        previous[sig] = old
        signal.signal(sig, handler)
    return previous


def write_chunks(f: BinaryIO, data: bytes | memoryview, on_progress: Callable[[int, int], None] | None = None) -> None:
    """Write `data` in chunks, reporting (bytes written, total) after each."""
    view = memoryview(data)
    total = len(view)
    for start in range(0, total, CHUNK_BYTES):
        f.write(view[start : start + CHUNK_BYTES])
        if on_progress is not None:
            on_progress(min(start + CHUNK_BYTES, total), total)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None], overwrite: bool = False) -> None:
    """write(file object) into `.NAME.nsa-tmp` beside `path`, fsync, then rename it over `path`:
    never a half-written destination, and an existing file replaced only with overwrite=True.

    Raises ValueError for a destination that cannot be written (see check_destination) and
    OSError naming the destination when the file system refuses (full, read-only, permissions)."""
    path = check_destination(path, overwrite)
    tmp = temporary_path(path)
    state = {"signal": None, "cleaning_up": False, "written": False, "owns_temporary": False}
    previous = _install_handlers(state)
    try:
        _write_and_replace(path, tmp, write, state)
        state["written"] = True
    except _Interrupted:
        pass  # the signal takes its course below, once the previous handlers are back
    finally:
        state["cleaning_up"] = True
        if state["owns_temporary"]:  # never another writer's
            tmp.unlink(missing_ok=True)
        _restore(previous)
    if state["signal"] is not None:
        signal.raise_signal(state["signal"])  # KeyboardInterrupt, or the process ends as it would have
        if state["written"]:  # the signal came after the rename and its handler returned
            return
        name = signal.Signals(state["signal"]).name
        raise InterruptedError(errno.EINTR, f"writing {str(path)!r} was interrupted by {name}")


def _open_temporary(path: Path, tmp: Path) -> int:
    """Create `tmp` exclusively and lock it (flock) for this writer. A temporary file left by a
    killed writer holds no lock: it is removed and created afresh. One whose lock is held belongs
    to a writer still running: a BlockingIOError naming the destination (never its file taken)."""
    for _ in range(8):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            try:
                stale = os.open(tmp, os.O_WRONLY)
            except FileNotFoundError:
                continue  # its writer renamed it just now: try again
            try:
                if not _try_lock(stale):
                    raise BlockingIOError(errno.EAGAIN, f"another process is writing {str(path)!r} now "
                                          f"(it holds {tmp.name}); try again when it is done")
                if _same_inode(stale, tmp):
                    tmp.unlink(missing_ok=True)  # stale, from a killed write
            finally:
                os.close(stale)
            continue
        if _try_lock(fd):
            return fd
        os.close(fd)  # locked in the instant between its creation and our lock: another writer's
        raise BlockingIOError(errno.EAGAIN, f"another process is writing {str(path)!r} now; try again when it is done")
    raise BlockingIOError(errno.EAGAIN, f"other processes keep writing {str(path)!r}; try again when they are done")


def _same_inode(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): the exclusive create is the only guard
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _write_and_replace(path: Path, tmp: Path, write: Callable[[BinaryIO], None], state: dict) -> None:
    try:
        fd = _open_temporary(path, tmp)
        state["owns_temporary"] = True
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # while still locked: no other writer takes the file before it is in place
            state["owns_temporary"] = False  # the name may be another writer's from now on
    except BlockingIOError:
        raise
    except OSError as err:
        raise type(err)(err.errno, f"cannot write {str(path)!r}: {err.strerror or err}") from err
    _fsync_directory(path.parent)


def _restore(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


def _fsync_directory(folder: Path) -> None:
    """Make the rename durable; not every platform can open a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
