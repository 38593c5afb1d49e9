"""Decoding on the GPU: correctness of prefill + decode, one decode step against dense attention on a
static cache, generation tokens/s, prefill against the parallel forward (speed)."""
