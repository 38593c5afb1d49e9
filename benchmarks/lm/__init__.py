"""The language-model comparison: byte-level models that differ only in their attention (dense, NSA's
window alone, NSA, NSA without its selected branch) trained on packed documents of real text, with
bits per byte overall, by position in the document, and with the context capped.

Run as `python -m benchmarks.lm` (see cli.py); `--smoke` is the CI's CPU run.
"""
