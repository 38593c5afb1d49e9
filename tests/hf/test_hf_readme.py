"""The README's "Use with transformers" snippets, run as a user would paste them (in a fresh folder)."""

import re
import shlex
from pathlib import Path

import torch
from typer.testing import CliRunner

from nsa_cli.main import app

README = Path(__file__).resolve().parents[2] / "README.md"


def section_blocks(kind: str) -> list[str]:
    text = README.read_text()
    section = text.split("## Use with transformers", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{kind}\n(.*?)```", section, flags=re.S)


def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = section_blocks("python")
    assert len(blocks) == 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["greedy"].shape == (2, 30) and namespace["sampled"].shape == (2, 30)
    assert type(namespace["nsa"]).__name__ == "NSAForCausalLM"
    ids = torch.randint(0, 256, (1, 17))
    with torch.no_grad():
        dense, nsa = namespace["dense"].eval()(ids).logits, namespace["nsa"].eval()(ids).logits
    assert ((nsa - dense).abs().max() / dense.abs().max()) <= 1e-5
    commands = [line for block in section_blocks("bash") for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "nsa"
        result = CliRunner().invoke(app, argv[1:])
        assert result.exit_code == 0, result.output
