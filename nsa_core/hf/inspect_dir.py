"""A Hugging Face model folder checked for `nsa inspect`: its config.json, every safetensors shard
(header against the file, every tensor's bytes), and for an NSA model (model_type "nsa") the
tensor names and shapes against the model its config builds; a dense Llama-family folder is
listed with a note that `nsa convert SRC DST --from hf` converts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nsa_core.checkpoint.safetensors import FileReport, file_findings
from nsa_core.checkpoint.state import tensor_mismatches
from nsa_core.hf.convert_dense import FAMILIES, weight_files


def expected_tensors(config_dict: dict) -> dict[str, tuple[int, ...]]:
    """name -> shape of what save_pretrained writes for this NSA config (a tied head is not written)."""
    from nsa_core.hf.configuration import NSALMConfig
    from nsa_core.hf.modeling import NSAForCausalLM

    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures", "transformers_version")}
    config = NSALMConfig(**fields)
    with torch.device("meta"):
        model = NSAForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def inspect_model_dir(path: str | Path) -> FileReport:
    """The folder's report; ValueError when it is no model folder at all (no config.json, no weights)."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(path)!r} is a directory without config.json: give a .safetensors file or a "
                         "Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    tensors: dict[str, dict] = {}
    findings: list[str] = []
    metadata: dict[str, str] = {}
    for shard in weight_files(path):
        meta, found, problems = file_findings(shard)
        metadata.update(meta)
        tensors.update({name: {**info, "file": shard.name} for name, info in found.items()})
        findings += [f"{shard.name}: {p}" for p in problems]
    notes = []
    kind = config.get("model_type")
    if kind == "nsa":
        try:
            expected = expected_tensors(config)
        except (ValueError, TypeError) as err:
            findings.append(f"config.json holds an invalid NSA config: {err}")
        else:
            findings += tensor_mismatches(expected, {n: info["shape"] for n, info in tensors.items()})
    elif kind in FAMILIES:
        notes.append(f"a dense {kind} checkpoint: `nsa convert {path} DST --from hf` turns it into an NSA model")
    else:
        notes.append(f"model_type {kind!r}: tensors not checked against a config")
    return FileReport(metadata, tensors, config, findings, notes)
