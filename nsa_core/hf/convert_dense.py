"""Retrofit a dense Hugging Face Llama-family checkpoint (Llama, Mistral, Qwen2) into the NSA model.

What is copied exactly: embeddings, every norm, the MLPs, q/k/v/o (Qwen2's q/k/v biases too), the LM
head (or the tie), rms_norm_eps, rope theta and the frequency-only scalings ("linear", "llama3";
the rest refused). HF rotates halves (i, i + d/2), nsa_core interleaved pairs (2i, 2i + 1) with the
same frequencies: the rows of q and k (and their biases) are permuted per head to match, which
leaves every q.k product and so every attention weight unchanged.

What is new: the compression networks start as a mean pool of each window (the default MLP built
as relu(mean) - relu(-mean); its other hidden units random with zero output weights, so they can
learn), the intra-block positions and memory tokens zero, and the gates give the window branch
weight 1 and the others 0: with `combine_gate="linear"` (the default) exactly and trainably, with
"sigmoid" through biases (-gate_bias, -gate_bias, +gate_bias). A sequence no longer than
sliding_window_size + 1 tokens is then attended wholly by the window, and the converted model's
logits equal the dense model's.

Every tensor of the source is accounted for: one missing, unexpected or of the wrong shape is a
ValueError naming it. Bad inputs (no config.json, not a Llama-family config, damaged or missing
safetensors files) are one-line ValueErrors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from nsa_core.hf.configuration import NSALMConfig, rope_type_of

FAMILIES = ("llama", "mistral", "qwen2")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "generation_config.json")
NSA_DEFAULTS = dict(sliding_window_size=512, compress_block_size=32, compress_block_sliding_stride=16,
                    selection_block_size=64, num_selected_blocks=16, num_compressed_mem_kv=1)


# reading the source ------------------------------------------------------------------------------

def read_dense_config(src: str | Path) -> dict[str, Any]:
    """The source's config.json as a dict, checked to be a Llama-family decoder we can convert."""
    path = Path(src) / "config.json"
    if not Path(src).is_dir():
        raise ValueError(f"source {str(src)!r} is not a directory (give a Hugging Face model folder)")
    if not path.is_file():
        raise ValueError(f"source {str(src)!r} has no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object")
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{path}: model_type {family!r} is not a Llama-family decoder; supported: {FAMILIES}")
    factor = cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise ValueError(f"{path}: partial_rotary_factor={factor} is not supported (rotary on the whole head only)")
    return cfg


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling or None) from a transformers 4 config (rope_theta, rope_scaling) or a 5 one
    (rope_parameters)."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if rope_type_of(scaling) == "default":
        scaling = None
    return float(theta), scaling


def nsa_config_for(cfg: dict, *, combine_gate: str = "linear", gate_bias: float = 16.0, **nsa: Any) -> NSALMConfig:
    """The NSA model's config for a dense source config (NSA fields: NSA_DEFAULTS, overridden by `nsa`)."""
    heads = cfg["num_attention_heads"]
    theta, scaling = rope_settings(cfg)
    family = cfg["model_type"]
    attention_bias = bool(cfg.get("attention_bias", False))
    fields = {**NSA_DEFAULTS, **nsa}
    if combine_gate == "sigmoid":
        if isinstance(gate_bias, bool) or not isinstance(gate_bias, (int, float)) or not gate_bias > 0:
            raise ValueError(f"gate_bias must be a number > 0, got {gate_bias!r}")
        fields["gate_init_biases"] = [-float(gate_bias), -float(gate_bias), float(gate_bias)]
    return NSALMConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, hidden_act=cfg.get("hidden_act", "silu"),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rotary_theta=theta, rotary_scaling=scaling,
        qkv_bias=True if family == "qwen2" else attention_bias,
        attention_out_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)), max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        initializer_range=cfg.get("initializer_range", 0.02),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), combine_gate=combine_gate,
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"), **fields,
    )


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or model.safetensors."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index (weight_map): {err}") from None
        files = [src / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are not there: {missing}")
        return files
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    if any(src.glob("*.bin")):
        raise ValueError(f"source {str(src)!r} holds PyTorch .bin weights only; save it with safe_serialization "
                         "(safetensors) first")
    raise ValueError(f"source {str(src)!r} has no model.safetensors or model.safetensors.index.json")


def read_weights(src: str | Path) -> dict[str, Tensor]:
    """Every tensor of the folder's safetensors files, each file checked against its header first
    (a damaged or truncated file: a one-line ValueError naming it)."""
    from nsa_core.checkpoint.safetensors import read_tensors

    tensors: dict[str, Tensor] = {}
    for path in weight_files(Path(src)):
        tensors.update(read_tensors(path))
    return tensors


# the mapping ---------------------------------------------------------------------------------------

def half_to_interleaved(t: Tensor, heads: int, head_dim: int) -> Tensor:
    """Rows of a q or k projection (heads * head_dim, ...) or bias from HF's half layout to
    interleaved pairs: our feature 2i takes HF's i, 2i + 1 takes HF's i + head_dim / 2."""
    half = head_dim // 2
    perm = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
    return t.reshape(heads, head_dim, *t.shape[1:])[:, perm].reshape(t.shape)


def mapped_state(src_tensors: dict[str, Tensor], config: NSALMConfig) -> tuple[dict[str, Tensor], list[str]]:
    """The NSA model's tensors taken from the source's, and the source names used or knowingly dropped."""
    out: dict[str, Tensor] = {}
    used: list[str] = []
    h, hk, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def take(name: str) -> Tensor:
        if name not in src_tensors:
            raise ValueError(f"the source has no tensor {name!r} (its config needs it)")
        used.append(name)
        return src_tensors[name]

    def copy(name: str, to: str | None = None) -> None:
        out[to or name] = take(name)

    copy("model.embed_tokens.weight")
    copy("model.norm.weight")
    if not config.tie_word_embeddings:
        copy("lm_head.weight")
    elif "lm_head.weight" in src_tensors:  # a tied checkpoint that stores the head anyway: must be the same
        if not torch.equal(src_tensors["lm_head.weight"], src_tensors["model.embed_tokens.weight"]):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
        used.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                     "mlp.up_proj.weight", "mlp.down_proj.weight"):
            copy(p + name)
        if config.mlp_bias:
            for name in ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"):
                copy(p + name)
        a = p + "self_attn."
        kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
        dense = i in config.dense_layers
        for kind in kinds:
            q = half_to_interleaved(take(f"{a}q_proj.{kind}"), h, d)
            k = half_to_interleaved(take(f"{a}k_proj.{kind}"), hk, d)
            v = take(f"{a}v_proj.{kind}")
            if dense:
                out[f"{a}to_q.{kind}"], out[f"{a}to_k.{kind}"], out[f"{a}to_v.{kind}"] = q, k, v
            else:
                out[f"{a}to_qkv.{kind}"] = torch.cat((q, k, v))
        for kind in ("weight", "bias") if config.attention_out_bias else ("weight",):
            copy(f"{a}o_proj.{kind}", f"{a}to_out.{kind}" if dense else f"{a}combine_heads.{kind}")
    used += [name for name in src_tensors if name.endswith("rotary_emb.inv_freq")]  # recomputed from the config
    return out, used


def init_mean_pool(attn) -> None:
    """The default compression MLP (flatten, Linear, ReLU, Linear) of a SparseAttention as the mean of
    each window: hidden units j and d + j compute +-mean_j, the output relu(+) - relu(-); the other
    hidden units keep their random input weights and get zero output weights."""
    cfg = attn.config
    n, d = cfg.compress_block_size, cfg.dim_head
    for net in (attn.k_compress, attn.v_compress):
        first, second = net[1], net[3]
        if first.out_features < 2 * d:
            raise ValueError(f"a mean-pool start needs compress_mlp_expand_factor * compress_block_size >= 2, got "
                             f"{cfg.compress_mlp_expand_factor} * {n}")
        mean = torch.eye(d).repeat(1, n) / n  # (d, n * d): input feature t * d + j -> j
        with torch.no_grad():
            first.weight[:d], first.weight[d:2 * d] = mean, -mean
            first.bias.zero_()
            second.weight.zero_()
            second.weight[:, :d], second.weight[:, d:2 * d] = torch.eye(d), -torch.eye(d)
            second.bias.zero_()


def dense_to_nsa(src: str | Path, *, dtype: torch.dtype | None = None, **options: Any):
    """The NSA model (NSAForCausalLM, eval mode) converted from the dense folder `src`; `options`:
    the NSA fields (sliding_window_size, compress_block_size, ..., dense_layers, backend),
    combine_gate ("linear" | "sigmoid") and gate_bias. dtype None: the source's."""
    from nsa_core.hf.modeling import NSAForCausalLM

    src = Path(src)
    config = nsa_config_for(read_dense_config(src), **options)
    tensors = read_weights(src)
    state, used = mapped_state(tensors, config)
    unexpected = sorted(set(tensors) - set(used))
    if unexpected:
        raise ValueError(f"the source has tensors the conversion does not know: {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
    model = NSAForCausalLM(config)
    own = model.state_dict()
    for name, t in state.items():
        if name not in own:  # pragma: no cover - a mapping bug, not a user error
            raise ValueError(f"conversion produced {name!r}, which the NSA model does not have")
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(f"tensor for {name!r} has shape {tuple(t.shape)}, the config needs {tuple(own[name].shape)}")
    dtype = dtype or next(iter(tensors.values())).dtype
    for layer in model.model.layers:
        if not layer.is_dense:
            init_mean_pool(layer.self_attn)
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()


def convert_dense(src: str | Path, dst: str | Path, *, overwrite: bool = False, max_shard_size: str = "5GB",
                  on_progress: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """Convert the dense folder `src` and save the NSA model to the folder `dst` (save_pretrained:
    safetensors, sharded past max_shard_size; the tokenizer and generation files copied). Returns a
    report: the config, the source's tensor count, the new parameters."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ValueError(f"output {str(dst)!r} exists and is not an empty folder; pass overwrite=True (--force)")
    if not dst.parent.is_dir():
        raise ValueError(f"output directory {str(dst.parent)!r} does not exist")
    step = on_progress or (lambda what: None)
    step("reading and mapping the dense checkpoint")
    model = dense_to_nsa(src, **options)
    step("writing the NSA model")
    model.save_pretrained(str(dst), safe_serialization=True, max_shard_size=max_shard_size)
    for name in SIDE_FILES:
        if (Path(src) / name).is_file() and name != "config.json":
            shutil.copyfile(Path(src) / name, dst / name)
    new = [n for n, _ in model.named_parameters() if any(k in n for k in ("compress", "intrablock", "strategy"))]
    return {"config": model.config.to_dict(), "source_tensors": len(read_weights_names(src)),
            "new_parameters": sum(p.numel() for n, p in model.named_parameters() if n in new),
            "parameters": sum(p.numel() for p in model.parameters()), "model": model}


def read_weights_names(src: str | Path) -> list[str]:
    """The tensor names of the folder's safetensors files (headers only)."""
    from nsa_core.checkpoint.safetensors import read_header

    return [name for path in weight_files(Path(src)) for name in read_header(path)[1]]


@torch.no_grad()
def compare_with_dense(src: str | Path, model, seq_len: int | None = None, seed: int = 0) -> float:
    """max |converted - dense| / max |dense| of the logits, both in float32, on random tokens of a
    sequence the window covers (seq_len None: min(sliding_window_size + 1, 64)). Loads the dense model
    with transformers (AutoModelForCausalLM, from the local folder)."""
    import copy

    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    nsa = copy.deepcopy(model).float().eval()
    n = seq_len or min(model.config.sliding_window_size + 1, 64)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    want, got = dense(ids).logits, nsa(ids).logits
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
