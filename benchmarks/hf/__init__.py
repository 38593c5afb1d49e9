"""The Hugging Face retrofit measured: a small dense Llama converted into NSA and trained on, against
the dense original (retrofit)."""
