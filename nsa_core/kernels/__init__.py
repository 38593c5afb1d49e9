"""Triton kernels: one module per op, a folder where an op has several kernels (launch, autograd).
Imported lazily: nothing here loads at `import nsa_core`."""
