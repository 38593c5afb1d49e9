"""Atomic writes (one temporary file of ours, removed on SIGINT/SIGTERM, a stale one cleaned, the
umask's mode, file-system errors naming the destination) and complete checks of safetensors files
(truncated, trailing bytes, gaps, wrong sizes) that every loader reports the same way."""

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nsa_core import SparseAttention, get_preset
from nsa_core.checkpoint import files
from nsa_core.checkpoint.files import temporary_path, write_atomically
from nsa_core.checkpoint.safetensors import inspect_file, load_safetensors, read_tensors, save_safetensors

TINY = get_preset("tiny")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_module():
    return SparseAttention.from_config(TINY)


def test_only_our_temporary_file_during_a_write(tmp_path, tiny_module, monkeypatch):
    """safetensors serializes into memory and we write the bytes: no library temporary file."""
    from nsa_core.checkpoint import safetensors as st

    seen = []
    real = st.write_chunks

    def watching(f, data, on_progress=None):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real(f, data, on_progress)

    monkeypatch.setattr(st, "write_chunks", watching)
    path = tmp_path / "w.safetensors"
    save_safetensors(tiny_module, path)
    assert seen == [[".w.safetensors.nsa-tmp"]]
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_stale_temporary_file_is_cleaned_by_the_next_write(tmp_path, tiny_module):
    path = tmp_path / "w.safetensors"
    temporary_path(path).write_bytes(b"left by a killed write")
    save_safetensors(tiny_module, path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert load_safetensors(path).config == TINY


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_get_the_mode_the_umask_gives(tmp_path, tiny_module, umask, mode):
    old = os.umask(umask)
    try:
        save_safetensors(tiny_module, tmp_path / "w.safetensors")
        write_atomically(tmp_path / "c.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    for name in ("w.safetensors", "c.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only file system")])
def test_file_system_errors_name_the_destination_and_leave_nothing(tmp_path, monkeypatch, code, words):
    path = tmp_path / "out.bin"
    path.write_bytes(b"keep me")

    def refuse(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", refuse)
    with pytest.raises(OSError, match=words) as info:
        write_atomically(path, lambda f: f.write(b"new"), overwrite=True)
    assert str(path) in str(info.value) and info.value.errno == code
    assert path.read_bytes() == b"keep me" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_destination_checks(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        write_atomically(tmp_path, lambda f: None)
    with pytest.raises(ValueError, match="does not exist"):
        write_atomically(tmp_path / "no" / "x", lambda f: None)
    (tmp_path / "x").write_bytes(b"")
    with pytest.raises(ValueError, match="exists"):
        write_atomically(tmp_path / "x", lambda f: None)


SLOW_EXPORT = textwrap.dedent("""
    import sys, time
    from nsa_core.checkpoint import safetensors as st

    def slow(f, data, on_progress=None):
        f.write(data[: len(data) // 2])
        f.flush()
        print("writing", flush=True)
        time.sleep(60)

    st.write_chunks = slow
    from nsa_cli.main import app
    app(sys.argv[1:])
""")


@pytest.mark.parametrize("sig, exists", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_a_signal_mid_write_removes_the_temporary_file(tmp_path, sig, exists):
    dst = tmp_path / "out.safetensors"
    if exists:
        dst.write_bytes(b"the previous file")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, "export", "--preset", "tiny", "-o", str(dst), "--force"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert temporary_path(dst).exists()  # mid-write
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == (-signal.SIGTERM if sig == signal.SIGTERM else 130), proc.stderr.read()
    assert [p.name for p in tmp_path.iterdir()] == ([dst.name] if exists else [])
    if exists:
        assert dst.read_bytes() == b"the previous file"


# complete file checks -----------------------------------------------------------------------


def _rewrite(path: Path, header_change=None, data_change=None) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    if header_change:
        header_change(header)
    if data_change:
        data = data_change(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _swap_offsets(header):
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]


DAMAGE = {
    "truncated": (None, lambda d: d[: len(d) // 2], "file is truncated"),
    "trailing bytes": (None, lambda d: d + b"\0" * 8, "bytes after the last tensor"),
    "wrong size": (lambda h: h["norm.weight"].update(shape=[65]), None, "needs 260 bytes"),
    "unknown dtype": (lambda h: h["norm.weight"].update(dtype="Q7"), None, "unknown dtype"),
    "overlap": (lambda h: h["norm.weight"].update(data_offsets=[0, h["norm.weight"]["data_offsets"][1] - h["norm.weight"]["data_offsets"][0]]),
                None, "gap or overlap"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_files_are_found_by_inspect_and_refused_by_every_loader(tmp_path, tiny_module, damage):
    header_change, data_change, words = DAMAGE[damage]
    path = tmp_path / "w.safetensors"
    save_safetensors(tiny_module, path)
    assert inspect_file(path).passed
    _rewrite(path, header_change, data_change)
    report = inspect_file(path)
    assert not report.passed and any(words in f for f in report.findings), report.findings
    for load in (load_safetensors, read_tensors):
        with pytest.raises(ValueError, match=f"cannot be loaded: .*{words}"):
            load(path)


def test_inspect_checks_names_and_shapes_against_the_config(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"to_qkv.weight": torch.zeros(3, 3), "extra": torch.zeros(1)}, path,
              metadata={"nsa_config": TINY.to_json(indent=None)})
    findings = " ".join(inspect_file(path).findings)
    assert "unexpected tensor extra" in findings and "missing tensor norm.weight" in findings
    assert "to_qkv.weight has shape [3, 3], the config expects [128, 64]" in findings
    save_file({"x": torch.zeros(1)}, path, metadata={"nsa_config": '{"dim": 0}'})
    assert "invalid config" in inspect_file(path).findings[0]
    save_file({"x": torch.zeros(1)}, path)
    assert "no 'nsa_config' metadata" in inspect_file(path).findings[0]


def test_concurrent_writers_to_one_destination(tmp_path):
    """A second writer while the first is mid-write fails with a clear message and leaves the first
    one's temporary file alone; the first completes; a writer after it succeeds."""
    import threading

    dst = tmp_path / "c.bin"
    started, release, errors = threading.Event(), threading.Event(), []

    def slow(f):
        f.write(b"first")
        started.set()
        release.wait(5)

    def first():
        try:
            write_atomically(dst, slow)
        except Exception as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(5)
    with pytest.raises(BlockingIOError, match="another process is writing"):
        write_atomically(dst, lambda f: f.write(b"second"), overwrite=True)
    assert temporary_path(dst).exists()  # still the first writer's
    release.set()
    thread.join(5)
    assert not errors and dst.read_bytes() == b"first"
    write_atomically(dst, lambda f: f.write(b"third"), overwrite=True)
    assert dst.read_bytes() == b"third" and not temporary_path(dst).exists()
