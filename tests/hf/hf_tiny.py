"""Tiny NSA language models with random weights, for the HF tests (imported by name: tests/hf is on sys.path)."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import nsa_core.hf  # noqa: E402,F401  (registers the model type)
from nsa_core.hf import NSAForCausalLM, NSALMConfig  # noqa: E402

VOCAB = 61


def tiny_config(**changes) -> NSALMConfig:
    """3 layers (the middle one dense), 6 query heads over 2 kv heads (groups of 3), window 8."""
    fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, sliding_window_size=8, compress_block_size=4,
                  compress_block_sliding_stride=2, selection_block_size=4, num_selected_blocks=2, dense_layers=[1],
                  rotary_theta=500.0, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return NSALMConfig(**{**fields, **changes})


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (norm weights around 1): no branch, bias or gate left at its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale
            p.copy_(1 + noise if "norm" in name else noise)
    return model




NSA_OPTIONS = dict(sliding_window_size=16, compress_block_size=4, compress_block_sliding_stride=2,
                   selection_block_size=4, num_selected_blocks=2)


def dense_model(family: str = "llama", seed: int = 0, **changes):
    """A tiny random dense HF model: 6 query heads over 2 kv heads, head dim 8, 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    if family == "mistral":
        fields["sliding_window"] = None
    torch.manual_seed(seed)
    return randomize(model_cls(config_cls(**{**fields, **changes})), seed).eval()
