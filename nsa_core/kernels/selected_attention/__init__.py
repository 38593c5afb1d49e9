"""Selected-block attention kernels: forward.py, backward.py (dQ and CSR dK/dV), launch.py
(allocation, tiles, grids), autograd.py (torch.library ops and autograd)."""
