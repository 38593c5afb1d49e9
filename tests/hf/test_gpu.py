"""The HF NSA model on the kernels (CUDA): a training step (plain, padded, packed) equals the PyTorch
reference path's, a Trainer step runs, and generate on the decode kernels gives the logits of the
parallel pass over what it generated."""

import pytest
import torch

from hf_tiny import randomize
from nsa_core.hf import NSAForCausalLM, NSALMConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_config(**changes) -> NSALMConfig:
    """12 query heads over 4 kv heads (groups of 3), head dim 64, the middle layer dense."""
    fields = dict(vocab_size=256, hidden_size=384, intermediate_size=768, num_hidden_layers=3, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64, sliding_window_size=64, compress_block_size=32,
                  compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=4, dense_layers=[1],
                  pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return NSALMConfig(**{**fields, **changes})


def pair():
    """The same random weights on the kernels and on the PyTorch reference."""
    torch.manual_seed(0)
    kernels = randomize(NSAForCausalLM(gpu_config(backend="triton")), scale=0.05).cuda()
    reference = NSAForCausalLM(gpu_config(backend="torch")).cuda()
    reference.load_state_dict(kernels.state_dict())
    return kernels, reference


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def batches():
    ids = torch.randint(1, 256, (2, 777), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :300] = 0
    positions = torch.cat([torch.arange(n, device="cuda") for n in (400, 1, 376)])[None]
    return [dict(input_ids=ids, labels=ids), dict(input_ids=ids, attention_mask=mask, labels=ids),
            dict(input_ids=ids[:1], position_ids=positions, labels=ids[:1])]


def test_training_step_on_the_kernels_equals_the_reference():
    kernels, reference = pair()
    for batch in batches():
        grads = []
        for model in (kernels, reference):
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            grads.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
        (loss_k, grad_k), (loss_r, grad_r) = grads
        assert abs(loss_k - loss_r) < 1e-4 * abs(loss_r)
        assert rel(grad_k, grad_r) < 2e-3


def test_bf16_trainer_step_on_the_kernels(tmp_path):
    from transformers import Trainer, TrainingArguments

    kernels, _ = pair()
    data = [{"input_ids": row, "labels": row} for row in torch.randint(1, 256, (8, 512))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, bf16=True,
                             report_to=[], save_strategy="no", gradient_checkpointing=True, disable_tqdm=True)
    result = Trainer(model=kernels, args=args, train_dataset=data).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_the_decode_kernels_gives_the_parallel_logits(dtype):
    kernels, _ = pair()
    model = kernels.to(dtype).eval()
    prompt = torch.randint(1, 256, (2, 300), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :45] = 0  # left padding
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=40, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    generated = torch.stack(out.logits, dim=1).float()  # (2, 40, V)
    with torch.no_grad():
        full_mask = torch.cat((mask, torch.ones_like(out.sequences[:, 300:])), dim=1)
        parallel = model(out.sequences, attention_mask=full_mask).logits[:, 299:-1].float()
    assert rel(generated, parallel) < (2e-3 if dtype == torch.float32 else 3e-2)
    top2 = parallel.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05 * parallel.abs().amax(-1)
    assert torch.equal(out.sequences[:, 300:][clear], parallel.argmax(-1)[clear])
