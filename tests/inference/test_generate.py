"""Transformer.generate on static caches: greedy equals the greedy loop over the parallel pass (sparse
and dense layers), ragged prompts equal each prompt alone, argument errors; on CUDA the graphed step
equals the eager one."""

import pytest
import torch

from nsa_core import Transformer


def model(sparse: bool, device="cpu") -> Transformer:
    torch.manual_seed(0)
    m = Transformer(num_tokens=50, dim=32, depth=2, heads=6, kv_heads=2, dim_head=8, use_sparse_attn=sparse,
                    sparse_attn_kwargs=dict(sliding_window_size=5, compress_block_size=8, compress_block_sliding_stride=4,
                                            selection_block_size=8, num_selected_blocks=2))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)  # random weights everywhere: zero inits hide bugs
    return m.eval().to(device)


def greedy_loop(m: Transformer, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    out = prompt
    with torch.no_grad():
        for _ in range(steps):
            out = torch.cat((out, m(out)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return out[:, prompt.shape[1]:]


@pytest.mark.parametrize("sparse", [True, False])
def test_greedy_generate_equals_parallel_greedy(sparse):
    m = model(sparse)
    prompt = torch.randint(0, 50, (2, 11))
    assert torch.equal(m.generate(prompt, 14, temperature=0), greedy_loop(m, prompt, 14))


@pytest.mark.parametrize("sparse", [True, False])
def test_ragged_prompts_generate_as_alone(sparse):
    m = model(sparse)
    prompt = torch.randint(0, 50, (3, 10))
    lengths = torch.tensor([4, 10, 7])
    together = m.generate(prompt, 6, temperature=0, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(together[i : i + 1], greedy_loop(m, prompt[i : i + 1, :n], 6))


def test_sampling_arguments():
    m = model(True)
    prompt = torch.randint(0, 50, (2, 5))
    torch.manual_seed(1)
    out = m.generate(prompt, 4, temperature=0.7, top_k=3)
    assert out.shape == (2, 4) and out.min() >= 0 and out.max() < 50
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_k=0), "top_k"), (dict(top_k=51), "top_k")):
        kwargs = dict(max_new_tokens=3, temperature=1.0) | bad
        with pytest.raises(ValueError, match=match):
            m.generate(prompt, kwargs.pop("max_new_tokens"), **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sparse", [True, False])
def test_cuda_graph_generate_equals_eager(sparse):
    m = model(sparse, "cuda")
    prompt = torch.randint(0, 50, (2, 40), device="cuda")
    assert torch.equal(m.generate(prompt, 20, temperature=0, cuda_graph=True),
                       m.generate(prompt, 20, temperature=0, cuda_graph=False))
