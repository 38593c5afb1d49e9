"""Sequence parallelism measured: one GPU's view (the longest sequence that fits, each rank's compute
in each shard layout: one_gpu), the multi-GPU run under torchrun (correctness, fit, scaling:
two_gpus), and the steps both time (steps)."""
