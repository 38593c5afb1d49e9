"""Sequence parallelism over torch.distributed, built on the ops' sequence descriptor."""
