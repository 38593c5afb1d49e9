"""Prompts the API refuses with a ValueError naming the argument, before any cache work: batch 0, prefill
`lengths` above the prompt's length, zero or negative (sparse and dense layers, a layer alone and
generate)."""

import pytest
import torch

from nsa_core import SparseAttention, Transformer, get_preset


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    kwargs = dict(sliding_window_size=3, compress_block_size=4, selection_block_size=4, num_selected_blocks=1)
    return {sparse: Transformer(num_tokens=20, dim=16, depth=1, heads=3, kv_heads=1, dim_head=8, use_sparse_attn=sparse,
                                sparse_attn_kwargs=kwargs).eval() for sparse in (True, False)}


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("lengths, words", [([8, 5], "lengths must be in 1..5"), ([0, 5], "from 0 to 5"),
                                            ([-1, 3], "from -1 to 3")])
def test_prompt_lengths_outside_1_to_n(models, sparse, lengths, words):
    m = models[sparse]
    prompt = torch.randint(0, 20, (2, 5))
    with pytest.raises(ValueError, match=words):
        m.generate(prompt, 3, lengths=torch.tensor(lengths))
    with pytest.raises(ValueError, match=words), torch.no_grad():  # the layers check at prefill too
        m(prompt, cache=m.new_cache(2, 9), lengths=torch.tensor(lengths))


def test_lengths_at_the_bounds_are_accepted(models):
    out = models[True].generate(torch.randint(0, 20, (2, 5)), 2, temperature=0, lengths=torch.tensor([1, 5]))
    assert out.shape == (2, 2)


def test_batch_0_is_refused_naming_the_input(models):
    for m in models.values():
        with pytest.raises(ValueError, match="ids must hold at least one sequence"):
            m(torch.zeros(0, 5, dtype=torch.long))
        with pytest.raises(ValueError, match="prompt must hold at least one row"):
            m.generate(torch.zeros(0, 5, dtype=torch.long), 2)
    attn = SparseAttention.from_config(get_preset("tiny"))
    for kwargs in (dict(), dict(return_cache=True)):
        with pytest.raises(ValueError, match=r"input must hold at least one sequence \(batch >= 1\)"):
            attn(torch.randn(0, 10, 64), **kwargs)
