"""Benchmarks and measurements, a package run from the repository root with `python -m benchmarks.TOPIC.NAME`:
kernels/ (the Triton kernels alone), module/ (SparseAttention, packed documents, training speed),
decode/, distributed/ (sequence parallelism), hf/ (the retrofit), cpu/ (the PyTorch path), the
quality comparison (quality*.py) and retrieval/; timing.py is how every script times a call.
Results: results/ (JSON, by topic), RESULTS.md (the tables), NOTES.md (what paid and what did not).
"""
