import os
import sys

# Kernels run on CPU tensors through Triton's interpreter when there is no GPU (must be set
# before triton compiles anything). backend="auto" still picks the reference on CPU tensors.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element the kernel forgets to write fails the test."""
    from nsa_core.kernels import outputs

    def nan_output(*shape, device, dtype):
        if not dtype.is_floating_point:  # integer outputs: a value no kernel writes
            return torch.full(shape, -7, device=device, dtype=dtype)
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(outputs, "new_output", nan_output)
