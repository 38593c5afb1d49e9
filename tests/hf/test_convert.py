"""Retrofit of dense HF Llama / Mistral / Qwen2 folders into the NSA model: logits equal the dense
model's within the window (fp32, 1e-5 relative; measured ~2e-7), every source tensor accounted for,
sharded sources, one-line errors for bad inputs, and the `nsa convert --from hf` / `nsa inspect` commands."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hf_tiny import NSA_OPTIONS, VOCAB, dense_model
from nsa_cli.main import app
from nsa_core.hf import NSAForCausalLM, convert_dense, dense_to_nsa
from nsa_core.hf.convert_dense import half_to_interleaved

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def saved(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder


def rope_kwargs(theta, scaling=None):
    """rope settings as the installed transformers takes them (5: rope_parameters, 4: rope_theta / rope_scaling)."""
    from transformers import LlamaConfig

    if "rope_parameters" in LlamaConfig().to_dict():
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **(scaling or {})}}
    return {"rope_theta": theta, "rope_scaling": scaling}


CASES = {
    "llama": ("llama", rope_kwargs(50000.0)),
    "llama3-scaling": ("llama", rope_kwargs(500000.0, LLAMA3)),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_logits_equal_the_dense_models_within_the_window(case, tmp_path):
    family, changes = CASES[case]
    dense = dense_model(family, **changes)
    nsa = dense_to_nsa(saved(dense, tmp_path), **NSA_OPTIONS)
    assert isinstance(nsa, NSAForCausalLM)
    ids = torch.randint(0, VOCAB, (2, 17))  # window 16: a query sees 17 tokens
    with torch.no_grad():
        want = dense(ids).logits
        for n in (17, 9, 1):
            assert rel(nsa(ids[:, :n]).logits, want[:, :n]) <= 1e-5
        # past the window the sparse branches take over: the models part (the gates let them learn)
        longer = torch.randint(0, VOCAB, (1, 40))
        assert rel(nsa(longer).logits, dense(longer).logits) > 1e-4


def test_sigmoid_gates_and_dense_layers(tmp_path):
    dense = dense_model("llama")
    nsa = dense_to_nsa(saved(dense, tmp_path), combine_gate="sigmoid", gate_bias=16.0, dense_layers=[1], **NSA_OPTIONS)
    assert [layer.is_dense for layer in nsa.model.layers] == [False, True]
    ids = torch.randint(0, VOCAB, (1, 17))
    with torch.no_grad():
        assert rel(nsa(ids).logits, dense(ids).logits) <= 1e-5


def test_half_to_interleaved_pairs_rotate_alike():
    """HF's rotate_half on (q, k) and ours on the permuted rows give the same q.k at every position pair."""
    from nsa_core.model.rotary import RotaryEmbedding
    from nsa_core.ops.rotary import rotary

    d, n = 8, 5
    q, k = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    rot = RotaryEmbedding(d, theta=77.0)
    angles = rot.pair_angles(torch.arange(n), torch.float64)
    cos, sin = torch.cat((angles.cos(),) * 2, -1), torch.cat((angles.sin(),) * 2, -1)
    half = lambda t: torch.cat((-t[..., d // 2:], t[..., : d // 2]), -1)  # noqa: E731
    hf = (q * cos + half(q) * sin) @ (k * cos + half(k) * sin).T
    qi, ki = (half_to_interleaved(t.T, 1, d).T for t in (q, k))
    tables = rot.tables(torch.arange(n), torch.float64)
    ours = rotary(qi, *tables, backend="torch") @ rotary(ki, *tables, backend="torch").T
    torch.testing.assert_close(ours, hf, rtol=1e-12, atol=1e-12)


def test_compression_starts_as_a_mean_pool(tmp_path):
    nsa = dense_to_nsa(saved(dense_model("llama"), tmp_path), **NSA_OPTIONS)
    attn = nsa.model.layers[0].self_attn
    windows = torch.randn(1, 2, 3, 4, 8)
    ck, cv = attn.compress_windows(windows, windows + 1)
    torch.testing.assert_close(ck, windows.mean(-2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cv, (windows + 1).mean(-2), rtol=1e-5, atol=1e-6)


def test_the_gates_of_a_converted_model_learn(tmp_path):
    nsa = dense_to_nsa(saved(dense_model("llama"), tmp_path), **NSA_OPTIONS).train()
    ids = torch.randint(0, VOCAB, (1, 40))
    nsa(ids, labels=ids).loss.backward()
    gate = nsa.model.layers[0].self_attn.to_strategy_combine[0]
    assert gate.weight.grad.abs().max() > 0 and gate.bias.grad.abs().max() > 0


def test_sharded_source_and_destination(tmp_path):
    dense = dense_model("qwen2")
    src = saved(dense, tmp_path / "src", max_shard_size="30KB")
    assert len(list(src.glob("*.safetensors"))) > 1
    report = convert_dense(src, tmp_path / "dst", max_shard_size="30KB", **NSA_OPTIONS)
    assert report["source_tensors"] == len(dense.state_dict())
    assert len(list((tmp_path / "dst").glob("*.safetensors"))) > 1
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    ids = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        assert rel(loaded(ids).logits, dense(ids).logits) <= 1e-5


def one_file_source(tmp_path):
    folder = saved(dense_model("llama"), tmp_path / "src")
    return folder, load_file(folder / "model.safetensors")


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    folder, tensors = one_file_source(tmp_path)
    path = folder / "model.safetensors"
    broken = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(broken, path)
    with pytest.raises(ValueError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        dense_to_nsa(folder, **NSA_OPTIONS)
    save_file({**tensors, "model.layers.0.extra.weight": torch.ones(2)}, path)
    with pytest.raises(ValueError, match=r"does not know: \['model.layers.0.extra.weight'\]"):
        dense_to_nsa(folder, **NSA_OPTIONS)
    save_file({**tensors, "model.norm.weight": torch.ones(47)}, path)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(47,\), the config needs \(48,\)"):
        dense_to_nsa(folder, **NSA_OPTIONS)


def test_bad_sources_are_one_line_errors(tmp_path):
    folder, _ = one_file_source(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        dense_to_nsa(folder, **NSA_OPTIONS)
    config = json.loads((folder / "config.json").read_text())
    for changes, message in (({"model_type": "gpt2"}, "not a Llama-family decoder"),
                             ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
                             ({"partial_rotary_factor": 0.5}, "partial_rotary_factor")):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(ValueError, match=message):
            dense_to_nsa(folder, **NSA_OPTIONS)
    with pytest.raises(ValueError, match="no config.json"):
        dense_to_nsa(tmp_path, **NSA_OPTIONS)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safe_serialization"):
        dense_to_nsa(folder, **NSA_OPTIONS)


def test_cli_convert_and_inspect(tmp_path):
    dense = dense_model("qwen2")
    src = saved(dense, tmp_path / "src")
    dst = tmp_path / "dst"
    runner = CliRunner()
    args = ["convert", str(src), str(dst), "--from", "hf", "--sliding-window-size", "16", "--compress-block-size", "4",
            "--compress-block-sliding-stride", "2", "--selection-block-size", "4", "--num-selected-blocks", "2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dense_relative_error"] <= 1e-5 and report["source_tensors"] == len(dense.state_dict())
    result = runner.invoke(app, ["inspect", str(dst), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"]
    again = runner.invoke(app, args)  # the destination is not empty now
    assert again.exit_code == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr
    bad = runner.invoke(app, ["convert", str(src), str(tmp_path / "x"), "--from", "hf", "--heads", "3"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --from hf takes the source's --heads")
    wrong = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "y"), "--from", "hf"])
    assert wrong.exit_code == 2 and "no config.json" in wrong.stderr
    empty = runner.invoke(app, ["inspect", str(tmp_path)])
    assert empty.exit_code == 2 and "is a directory without config.json" in empty.stderr
    shard = dst / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    damaged = runner.invoke(app, ["inspect", str(dst), "--json"])
    assert damaged.exit_code == 1 and "truncated" in " ".join(json.loads(damaged.stdout)["findings"])
