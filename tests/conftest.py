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
