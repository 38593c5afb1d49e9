"""Facts about this machine that decide where kernels can run (the CLI's `nsa env`)."""

from __future__ import annotations

import platform
import sys

import torch

from nsa_core.ops.dispatch import interpreter_enabled, kernel_unavailable_reason, triton_installed


def environment_report() -> dict:
    cuda = torch.cuda.is_available()
    triton_version = None
    if triton_installed():
        try:
            import triton

            triton_version = triton.__version__
        except Exception as err:  # a broken triton install is a fact worth reporting
            triton_version = f"unimportable ({type(err).__name__})"
    device = torch.device("cuda") if cuda and not interpreter_enabled() else torch.device("cpu")
    reason = kernel_unavailable_reason(device)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "triton_interpreter": interpreter_enabled(),
        "kernels_can_run": reason is None,
        "kernel_device": device.type if reason is None else None,
        "kernels_unavailable_reason": reason,
    }
