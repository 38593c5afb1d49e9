"""Inference on top of the ops: prefill into a static cache, decode steps, generation."""
