"""Causal sliding-window attention kernels (forward, dQ, dK/dV) and their torch.library ops."""
