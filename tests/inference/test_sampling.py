"""The sampler draws from softmax(logits / T) (a seeded total-variation test with enough draws), top_k
only among the k likeliest, top_k=1 and T=0 are greedy, top_p keeps the smallest set reaching p;
generate and sample draw through it (no constant token); arguments are checked; on CUDA the decode
path on the kernels samples the same distribution."""

import math

import pytest
import torch

from nsa_core import Transformer
from nsa_core.sampling import filter_logits, sample

DRAWS = 40_000
LOGITS = torch.tensor([1.3, -0.4, 2.1, 0.0, 0.7, -1.9, 1.1])  # distinct, none dominant


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=vocab).double() / tokens.numel()


def tv_bound(vocab: int, draws: int) -> float:
    """Six times the expected total variation of `draws` exact draws (at most 0.5 sqrt(2V / (pi N)))."""
    return 6 * 0.5 * math.sqrt(2 * vocab / (math.pi * draws))


def draw(logits, **kwargs):
    g = torch.Generator().manual_seed(0)
    return sample(logits.expand(DRAWS, -1), generator=g, **kwargs)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    expected = (LOGITS.double() / temperature).softmax(-1)
    tv = 0.5 * (frequencies(draw(LOGITS, temperature=temperature), 7) - expected).abs().sum().item()
    assert tv <= tv_bound(7, DRAWS), tv


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_top_k_draws_only_among_the_k_likeliest_in_proportion(top_k):
    freq = frequencies(draw(LOGITS, temperature=0.8, top_k=top_k), 7)
    top = LOGITS.topk(top_k).indices
    inside = torch.zeros(7, dtype=torch.bool)
    inside[top] = True
    assert freq[~inside].sum() == 0
    expected = torch.zeros(7, dtype=torch.float64)
    expected[top] = (LOGITS[top].double() / 0.8).softmax(-1)
    assert 0.5 * (freq - expected).abs().sum().item() <= tv_bound(top_k, DRAWS)


def test_top_k_1_and_temperature_0_are_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(3))
    greedy = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample(logits, 0.0), greedy)
    assert torch.equal(sample(logits, 1.7, top_k=1), greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    for top_p, kept in ((0.4, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (0.97, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])):
        assert torch.isfinite(filter_logits(logits, top_p=top_p)).nonzero()[:, 1].tolist() == kept, top_p
    shuffled = logits[:, [2, 0, 3, 1]]  # the rule goes by probability, not by position
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7)).nonzero()[:, 1].tolist() == [1, 3]
    freq = frequencies(draw(logits[0], top_p=0.7), 4)
    expected = torch.tensor([0.5, 0.3, 0, 0], dtype=torch.float64) / 0.8
    assert 0.5 * (freq - expected).abs().sum().item() <= tv_bound(2, DRAWS)


def test_top_k_and_top_p_together():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.95)).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.5)).sum() == 2


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=0), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_k=8), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.2), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
])
def test_arguments_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        sample(LOGITS[None], **bad)


def small_model(sparse: bool, device="cpu") -> Transformer:
    """Sparse layers for the kernels' test; dense ones on the CPU, where the reference's sparse pass over
    thousands of rows would take seconds (the sampler and the generation loop are the same)."""
    torch.manual_seed(0)
    m = Transformer(num_tokens=12, dim=16, depth=1, heads=3, kv_heads=1, dim_head=8, use_sparse_attn=sparse,
                    sparse_attn_kwargs=dict(sliding_window_size=3, compress_block_size=4, selection_block_size=4,
                                            num_selected_blocks=1))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)  # random weights, logits not too peaked
    return m.eval().to(device)


def test_generate_and_sample_draw_the_model_distribution():
    """The first token of generate (and of Transformer.sample) follows softmax of the last logits."""
    m = small_model(sparse=False)
    prompt = torch.randint(0, 12, (1, 9), generator=torch.Generator().manual_seed(1)).expand(2000, -1)
    with torch.no_grad():
        expected = m(prompt[:1])[0, -1].double().softmax(-1)
    for draws in (m.generate(prompt, 1, temperature=1.0), m.sample(prompt, 10, temperature=1.0, filter_thres=0.0)):
        tv = 0.5 * (frequencies(draws, 12) - expected).abs().sum().item()
        assert tv <= tv_bound(12, 2000), tv
    with pytest.raises(ValueError, match="top_p"):
        m.generate(prompt[:1], 2, top_p=0)
    with pytest.raises(ValueError, match="filter_thres"):
        m.sample(prompt[:1], 12, filter_thres=1.0)


def decoded_pair_distribution(sparse: bool, device: str, rows: int):
    """Two tokens from one prompt in `rows` rows: the second one comes from a decoding step. Among the
    rows whose first token is the commonest, the second token's frequencies, and softmax of the
    parallel pass's logits after that first token."""
    m = small_model(sparse, device)
    prompt = torch.randint(0, 12, (1, 11), generator=torch.Generator().manual_seed(2)).to(device)
    torch.manual_seed(5)
    out = m.generate(prompt.expand(rows, -1), 2, temperature=0.9, top_k=8)
    first = out[:, 0].bincount(minlength=12).argmax()
    second = out[out[:, 0] == first, 1]
    with torch.no_grad():
        logits = m(torch.cat((prompt, first.view(1, 1)), dim=1))[0, -1].double() / 0.9
    expected = filter_logits(logits[None], top_k=8)[0].softmax(-1)
    return frequencies(second.cpu(), 12), expected.cpu(), second.numel()


def test_decoding_step_samples_the_model_distribution():
    freq, expected, n = decoded_pair_distribution(False, "cpu", 2000)
    assert freq[expected == 0].sum() == 0
    assert 0.5 * (freq - expected).abs().sum().item() <= tv_bound(8, n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoding_step_on_the_kernels_samples_the_model_distribution():
    """The CUDA path: the step on the kernels, replayed from a CUDA graph, then the sampler."""
    freq, expected, n = decoded_pair_distribution(True, "cuda", 200_000)
    assert freq[expected == 0].sum() == 0
    assert 0.5 * (freq - expected).abs().sum().item() <= tv_bound(8, n)
