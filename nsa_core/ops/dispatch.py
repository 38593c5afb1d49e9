"""The single kernels-or-reference rule of every op.

backend: "torch" (the reference), "triton" (the kernels), "auto" (kernels where they run).
Kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 (how CI tests them).
Each op calls `use_kernels` once per call, with two kinds of reasons:
- `unsupported`: these inputs cannot take the kernels (dtype, head dim, size): "triton" raises a
  ValueError naming the op and the reason; "auto" falls back to the reference with one warning
  (on CUDA, where the kernels were expected);
- `by_design`: a layout or option the kernel path leaves to the reference on purpose (documented
  in the op's docstring, e.g. decoding steps before the decode kernels, a non-causal window):
  the reference runs, silently, whatever the backend.
Nothing here imports triton at module import time.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from nsa_core.config import BACKENDS


_TRITON_INSTALLED: bool | None = None


def triton_installed() -> bool:
    global _TRITON_INSTALLED
    if _TRITON_INSTALLED is None:
        _TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_unavailable_reason(device: torch.device) -> str | None:
    """None when kernels can run on tensors of this device, else why not."""
    if not triton_installed():
        return "triton is not installed"
    if device.type == "cuda":
        if interpreter_enabled():
            return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"kernels need CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors); got {device.type} tensors"


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def use_kernels(backend: str, device: torch.device, op: str, unsupported=None, by_design: str | None = None) -> bool:
    """Whether `op` runs on the kernels. "torch": never. "triton": yes, or a ValueError naming `op`
    and why not. "auto": on CUDA where they can run, else the reference (one warning per reason
    when on CUDA). `unsupported`: why these inputs cannot take the kernels (a string, or a
    callable returning one, called only once the kernels can run here), None if they can.
    `by_design`: why the reference runs these inputs on purpose (no warning, no error)."""
    check_backend_name(backend)
    if backend == "torch" or (backend == "auto" and device.type != "cuda") or by_design is not None:
        return False
    reason = kernel_unavailable_reason(device)
    if reason is None and unsupported is not None:
        reason = unsupported() if callable(unsupported) else unsupported
    if reason is None:
        return True
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run {op} here: {reason}")
    warn_fallback_once(op, reason)
    return False


_WARNED: set[tuple[str, str]] = set()


def warn_fallback_once(op: str, reason: str) -> None:
    """One warning per (op, reason) when backend="auto" on CUDA falls back to the PyTorch reference."""
    if (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"{op}: backend='auto' uses the PyTorch reference: {reason}", stacklevel=4)
