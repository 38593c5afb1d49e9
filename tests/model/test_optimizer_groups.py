"""param_groups / compression_parameters: every trainable parameter in one group, the compression side of
every SparseAttention at its own rate through real optimizer steps and schedulers, decay on matrices only."""

import math

import pytest
import torch
from torch import nn

from helpers import randomize_
from nsa_core import (RECOMMENDED_COMPRESSION_LR_SCALE, SparseAttention, Transformer, compression_parameters,
                      param_groups)
from nsa_core.model.compress_networks import ConvLinearCompress

SPARSE = dict(sliding_window_size=4, compress_block_size=4, compress_block_sliding_stride=2,
              selection_block_size=4, num_selected_blocks=2)


def make_transformer(use_sparse_attn: bool = True, depth: int = 2) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(num_tokens=40, dim=24, depth=depth, dim_head=8, heads=6, kv_heads=2,  # groups of 3
                        use_sparse_attn=use_sparse_attn, sparse_attn_kwargs=dict(SPARSE))
    return randomize_(model, std=0.3)


def rates_by_parameter(groups: list[dict]) -> dict[int, tuple[float, float]]:
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = (g["lr"], g["weight_decay"])
    return out


def test_every_parameter_once_with_its_rate_and_decay():
    model = make_transformer()
    groups = param_groups(model, 2e-3, weight_decay=0.1, compression_lr_scale=0.25)
    rates = rates_by_parameter(groups)
    names = dict(model.named_parameters())
    assert len(rates) == len(names)
    compression = {n for n in names if any(part in n for part in ("k_compress", "v_compress", "intrablock_positions",
                                                                  "compress_mem_kv"))}
    # per layer: k and v networks (2 weights + 2 biases each), 2 position tables, the memory tokens
    assert len(compression) == 2 * 11
    assert {id(p) for p in compression_parameters(model)} == {id(names[n]) for n in compression}
    for name, p in names.items():
        lr, decay = rates[id(p)]
        assert lr == pytest.approx(2e-3 * (0.25 if name in compression else 1.0)), name
        assert decay == (0.1 if p.ndim >= 2 else 0.0), name
    assert all(g["lr_scale"] in (0.25, 1.0) and g["params"] for g in groups)


def test_default_scale_is_the_recommended_one():
    groups = param_groups(make_transformer(depth=1), 1e-3)
    assert RECOMMENDED_COMPRESSION_LR_SCALE == 0.25
    assert sorted({g["lr"] for g in groups}) == pytest.approx([2.5e-4, 1e-3])
    assert all(g["weight_decay"] == 0.0 for g in groups)


def test_a_dense_model_has_one_rate():
    model = make_transformer(use_sparse_attn=False)
    assert compression_parameters(model) == []
    groups = param_groups(model, 1e-3, 0.1, compression_lr_scale=0.25)
    assert {g["lr"] for g in groups} == {1e-3}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_custom_compression_network_and_bare_module():
    attn = SparseAttention(dim=24, dim_head=8, heads=6, kv_heads=2, causal=True,
                           compress_mlp=ConvLinearCompress(2, 8, 4), **SPARSE)
    found = {id(p) for p in compression_parameters(attn)}
    expected = [*attn.k_compress.parameters(), *attn.v_compress.parameters(), attn.k_intrablock_positions,
                attn.v_intrablock_positions, attn.compress_mem_kv]
    assert found == {id(p) for p in expected} and len(found) == len(expected)


def test_tied_parameters_once_and_frozen_ones_left_out():
    model = make_transformer(depth=1)
    model.to_logits.weight = model.token_emb.weight  # tied embedding
    model.norm.weight.requires_grad_(False)
    rates = rates_by_parameter(param_groups(model, 1e-3, 0.1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(rates) == len(trainable)
    assert id(model.norm.weight) not in rates and id(model.token_emb.weight) in rates


def test_adamw_steps_each_group_at_its_rate():
    """Adam's first step moves an element by ~lr in the gradient's sign (weight decay off): the compression
    side moves 4x less than the rest."""
    model = make_transformer(depth=1)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2, 0.0, compression_lr_scale=0.25), eps=1e-12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 40, (2, 21))
    model(ids, return_loss=True).backward()
    optimizer.step()
    compression = {id(p) for p in compression_parameters(model)}
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name])[p.grad.abs() > 1e-8].abs()
        if moved.numel():
            expected = 1e-2 * (0.25 if id(p) in compression else 1.0)
            torch.testing.assert_close(moved, torch.full_like(moved, expected), rtol=1e-3, atol=1e-7, msg=name)


def test_schedulers_keep_the_ratio():
    model = make_transformer(depth=1)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, 0.1, compression_lr_scale=0.25))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"] * 0.125)


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(compression_lr_scale=0), ValueError, "compression_lr_scale"),
    (dict(compression_lr_scale=-0.5), ValueError, "compression_lr_scale"),
    (dict(compression_lr_scale=math.nan), ValueError, "compression_lr_scale"),
    (dict(compression_lr_scale="0.25"), TypeError, "compression_lr_scale"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr=math.inf), ValueError, "lr"),
    (dict(lr=True), TypeError, "lr"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
])
def test_bad_arguments_name_themselves(kwargs, error, argument):
    args = dict(lr=1e-3) | kwargs
    with pytest.raises(error, match=argument):
        param_groups(make_transformer(depth=1), **args)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        param_groups([nn.Linear(2, 2)], 1e-3)
    with pytest.raises(TypeError, match="model"):
        compression_parameters(None)
