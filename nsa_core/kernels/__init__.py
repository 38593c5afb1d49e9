"""Triton kernels, one folder per op. Imported lazily: nothing here loads at `import nsa_core`."""
