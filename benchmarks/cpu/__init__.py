"""The PyTorch path on a CPU: a tiny NSA layer on the fast path, on the loop reference and against
dense attention (fast_path)."""
