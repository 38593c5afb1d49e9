"""The HF NSA model: registration, save / load, loss, padding, packed documents, generation (greedy
against the greedy loop over the parallel pass, left / right padding, seeded sampling within top-k /
top-p), gradient checkpointing and a Trainer step. Float64 where two paths must agree to rounding."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import nsa_core
from nsa_core.hf import NSAForCausalLM, NSALMConfig
from nsa_core.hf.cache import NSAGenerationCache

from hf_tiny import VOCAB, randomize, tiny_config


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_only_nsa_core_hf_imports_transformers():
    """The core stays importable without the extra: nothing outside nsa_core/hf imports transformers or
    nsa_core.hf (read from the source, as tests/test_layout.py reads it)."""
    root = Path(nsa_core.__file__).parent
    for path in root.rglob("*.py"):
        if path.parent.name == "hf":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith(("transformers", "nsa_core.hf"))], path


def test_auto_classes_know_the_model_type():
    fields = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("nsa", **fields)
    assert isinstance(config, NSALMConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, NSAForCausalLM)
    assert [layer.is_dense for layer in model.model.layers] == [False, True, False]


def test_save_load_round_trip_is_bit_exact_and_sharded(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, NSAForCausalLM)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_tied_embeddings_round_trip(tmp_path):
    model = randomize(NSAForCausalLM(tiny_config(tie_word_embeddings=True)))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_loss_is_the_shifted_cross_entropy(model):
    ids = torch.randint(0, VOCAB, (2, 11))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    torch.testing.assert_close(summed, want * (labels[:, 1:] != -100).sum() / 7)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_each_row_alone(model, side):
    model = model.double()
    rows = [torch.randint(2, VOCAB, (n,)) for n in (13, 6, 1)]
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            span = slice(n - len(r), n) if side == "left" else slice(0, len(r))
            alone = model(r[None]).logits[0]
            assert rel(batch[i, span], alone) < 1e-12
            assert torch.all(batch[i][mask[i] == 0] == 0)


def test_packed_documents_equal_separate_ones(model):
    """position_ids restarting per document, as DataCollatorWithFlattening makes them: logits, loss and
    gradients equal those of the documents run one by one."""
    from transformers import DataCollatorWithFlattening

    model = model.double().train()
    docs = [torch.randint(2, VOCAB, (n,)).tolist() for n in (5, 11, 1, 7)]
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
    out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total, terms, start = 0.0, 0, 0
    for d in docs:
        ids = torch.tensor(d)[None]
        alone = model(ids, labels=ids)
        assert rel(out.logits[0, start:start + len(d)], alone.logits[0]) < 1e-12
        start += len(d)
        if len(d) > 1:
            total = total + alone.loss * (len(d) - 1)
            terms += len(d) - 1
    (total / terms).backward()
    torch.testing.assert_close(out.loss, total / terms, rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert rel(packed_grads[name], p.grad) < 1e-10, name


def test_a_document_never_predicts_the_next(model):
    """Packed with labels that do not mark document starts: the first token of a document is not a target."""
    ids = torch.randint(2, VOCAB, (1, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    loss = model(ids, position_ids=positions, labels=ids).loss
    logits = model(ids, position_ids=positions).logits
    labels = ids.clone()
    labels[0, 5] = -100
    want = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, want)


def greedy_loop(model, ids, steps):
    """The reference: argmax of the parallel pass over the whole sequence, one token at a time."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), dim=1)
    return ids


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_equals_the_greedy_loop(model, use_cache):
    prompt = torch.randint(2, VOCAB, (2, 7))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, do_sample=False,
                         use_cache=use_cache, pad_token_id=0)
    assert torch.equal(out, greedy_loop(model, prompt, 9))


def test_cached_steps_equal_the_parallel_pass(model):
    """Prefill a left-padded batch, then steps of 1 and 3 tokens: the logits of every new token equal
    the parallel pass over the whole row (float64)."""
    model = model.double()
    ids = torch.randint(2, VOCAB, (2, 15))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :11], attention_mask=mask[:, :11], use_cache=True)
        cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        assert isinstance(cache, NSAGenerationCache) and cache.get_seq_length() == 11
        parts = [out.logits]
        for cols in (slice(11, 12), slice(12, 15)):
            step = model(ids[:, cols], attention_mask=mask[:, : cols.stop], cache=cache, use_cache=True)
            parts.append(step.logits)
    got = torch.cat(parts, dim=1)
    assert rel(got[mask.bool()], full[mask.bool()]) < 1e-12


def test_batched_generate_with_left_padding_equals_each_row(model):
    """(Right padding, as in HF's own models, makes the first new token from a padding position's logits.)"""
    side = "left"
    rows = [torch.randint(2, VOCAB, (n,)) for n in (9, 4)]
    n = 9
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, n:], alone[0, len(r):])


def test_sampling_is_seeded_and_keeps_to_top_k_and_top_p(model):
    prompt = torch.randint(2, VOCAB, (3, 5))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=True, temperature=0.7,
                  pad_token_id=0, return_dict_in_generate=True, output_logits=True, output_scores=True)
    torch.manual_seed(3)
    a = model.generate(prompt, top_k=4, top_p=1.0, **kwargs)
    torch.manual_seed(3)
    b = model.generate(prompt, top_k=4, top_p=1.0, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for step, (raw, scores) in enumerate(zip(a.logits, a.scores)):
        kept = torch.isfinite(scores)
        assert torch.equal(kept.sum(-1), torch.full((3,), 4))
        assert torch.equal(kept, raw >= raw.topk(4, dim=-1).values[:, -1:])
        assert kept.gather(1, a.sequences[:, 5 + step, None]).all()
    torch.manual_seed(4)
    c = model.generate(prompt, top_k=0, top_p=0.6, **kwargs)
    for step, (raw, scores) in enumerate(zip(c.logits, c.scores)):
        probs = (raw / 0.7).softmax(-1)
        order = probs.argsort(dim=-1, descending=True)
        before = probs.gather(1, order).cumsum(-1) - probs.gather(1, order)  # mass of the likelier tokens
        want = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, before < 0.6)
        assert torch.equal(torch.isfinite(scores), want)
        assert want.gather(1, c.sequences[:, 5 + step, None]).all()


def test_gradient_checkpointing_gives_the_same_gradients(model):
    model.train()
    ids = torch.randint(0, VOCAB, (2, 13))
    model(ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7)


def test_a_trainer_step_runs(model, tmp_path):
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, 12))]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_a_trainer_takes_the_compression_rate_groups(model, tmp_path):
    """nsa_core.param_groups on the HF model: its layers' compression side at 0.25 x the rate through the
    Trainer's own schedule."""
    from transformers import Trainer, TrainingArguments

    compression = {id(p) for p in nsa_core.compression_parameters(model)}
    sparse_layers = [m for m in model.modules() if isinstance(m, nsa_core.SparseAttention)]
    assert 0 < len(sparse_layers) < model.config.num_hidden_layers  # the tiny model mixes in a dense layer
    assert len(compression) == len(sparse_layers) * 11  # per layer: 2 nets (4 tensors each), 3 more
    optimizer = torch.optim.AdamW(nsa_core.param_groups(model, 1e-3, 0.1, compression_lr_scale=0.25))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, 12))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    for group in optimizer.param_groups:
        is_compression = all(id(p) in compression for p in group["params"])
        assert group["initial_lr"] == pytest.approx(1e-3 * (0.25 if is_compression else 1.0))
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="combine_gate"):
        tiny_config(combine_gate="softmax")
    with pytest.raises(ValueError, match="dense_layers"):
        tiny_config(dense_layers=[3])
    with pytest.raises(ValueError, match="rotary_scaling type 'yarn'"):
        tiny_config(rotary_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="kv_heads must divide heads"):
        tiny_config(num_key_value_heads=4)
    model = NSAForCausalLM(tiny_config())
    with pytest.raises(TypeError, match="NSAGenerationCache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=[1, 2, 3])
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 3))
    out = model(torch.ones(1, 3, dtype=torch.long), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    with pytest.raises(ValueError, match="new tokens must all be tokens"):
        model(torch.ones(1, 1, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0]]), cache=cache)
