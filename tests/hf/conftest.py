"""The HF tests' fixtures (skipped without transformers)."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_tiny import NSAForCausalLM, randomize, tiny_config  # noqa: E402


@pytest.fixture
def model() -> NSAForCausalLM:
    torch.manual_seed(0)
    return randomize(NSAForCausalLM(tiny_config())).eval()
