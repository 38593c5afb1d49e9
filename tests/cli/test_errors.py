"""The error contract: a failure caused by the user's input or environment is one line on stderr
and exit code 2, checked before long work; a damaged file gives the same line to every loader
and exit 1 with a finding in `inspect`; a bug keeps its traceback."""

import errno
import json
import os

import pytest
import torch

from cli_support import assert_one_line_error, run
from nsa_core import SparseAttention, get_preset


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder with a good nsa file, a truncated copy, a tiny state dict, a bad lucidrains one."""
    d = tmp_path_factory.mktemp("inputs")
    assert run("export", "--preset", "tiny", "-o", d / "good.safetensors").exit_code == 0
    data = (d / "good.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) - 5000])
    state = SparseAttention.from_config(get_preset("tiny")).state_dict()
    torch.save(state, d / "tiny.pt")
    torch.save({**state, "compress_mem_kv": torch.zeros(2, 16)}, d / "bad_memory.pt")
    torch.save({**state, "to_qkv.weight": torch.zeros(128, 65)}, d / "bad_qkv.pt")
    (d / "folder.safetensors").mkdir()
    (d / "inf.json").write_text(json.dumps({**get_preset("tiny").to_dict(), "compress_mlp_expand_factor": 1.0})
                                .replace("1.0", "Infinity"))
    return d


LUCIDRAINS_ARGS = ["--no-causal", "--sliding-window-size", 8, "--compress-block-sliding-stride", 4,
                   "--selection-block-size", 8, "--num-selected-blocks", 2]

BAD_INPUTS = {
    "batch 0": (["config", "show", "tiny", "--batch", 0], "--batch must be an integer >= 1, got 0"),
    "batch -1": (["config", "show", "tiny", "--batch", -1], "--batch must be an integer >= 1, got -1"),
    "check batch 0": (["check", "--batch", 0], "--batch must be"),
    "visualize head -1": (["visualize-selection", "--head", -1], "--head must be an integer >= 0"),
    "bench batch 0": (["bench", "--device", "cpu", "--batch", 0], "--batch must be"),
    "bench csv folder missing": (["bench", "--device", "cpu", "--csv", "/nonexistent/x.csv"], "'/nonexistent' does not exist"),
    "inf option": (["config", "create", "-o", "{d}/c.json", "--compress-mlp-expand-factor", "inf"], "must be a finite number"),
    "inf in a config file": (["config", "show", "{d}/inf.json"], "compress_mlp_expand_factor must be a finite number"),
    "causal false": (["config", "create", "-o", "{d}/c.json", "--causal", "false"], "--causal is a flag"),
    "parse error": (["check", "--seq-len", "abc"], "Invalid value for '--seq-len'"),
    "unknown option": (["check", "--bogus"], "No such option: --bogus"),
    "directory as config": (["check", "--config", "{d}"], "is a directory"),
    "directory as weights": (["visualize-selection", "--weights", "{d}/folder.safetensors"], "is a directory"),
    "directory to inspect": (["inspect", "{d}/folder.safetensors"], "is a directory"),
    "directory to convert": (["convert", "{d}/folder.safetensors", "{d}/x.pt", "--to", "lucidrains"], "is a directory"),
    "directory as output": (["export", "--preset", "tiny", "-o", "{d}/folder.safetensors"], "is a directory"),
    "binary config": (["check", "--config", "{d}/good.safetensors"], "is not text"),
    "truncated to visualize": (["visualize-selection", "--weights", "{d}/truncated.safetensors"], "cannot be loaded: file is truncated"),
    "truncated to convert": (["convert", "{d}/truncated.safetensors", "{d}/x.pt", "--to", "lucidrains"], "cannot be loaded: file is truncated"),
    "truncated as input": (["visualize-selection", "--input", "{d}/truncated.safetensors"], "cannot be loaded: file is truncated"),
    "weights of another config": (["export", "--preset", "seeds", "--weights", "{d}/tiny.pt", "-o", "{d}/x.safetensors"],
                                  "tensor to_qkv.weight has shape [128, 64], the config expects [1536, 512]"),
    "lucidrains memory of the wrong rank": (["convert", "{d}/bad_memory.pt", "{d}/x.safetensors", "--from", "lucidrains", *LUCIDRAINS_ARGS],
                                            "compress_mem_kv has shape [2, 16]"),
    # dim is read from to_qkv.weight: the tensors that disagree with it are named
    "lucidrains projection of the wrong shape": (["convert", "{d}/bad_qkv.pt", "{d}/x.safetensors", "--from", "lucidrains", *LUCIDRAINS_ARGS],
                                                 "tensor norm.weight has shape [64], the config expects [65]"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(files, case):
    args, words = BAD_INPUTS[case]
    assert_one_line_error(run(*(str(a).format(d=files) for a in args)), words)
    assert not any(p.name.endswith(".nsa-tmp") for p in files.iterdir())


def test_truncated_file_fails_inspect_with_a_finding(files):
    result = run("inspect", files / "truncated.safetensors")
    assert result.exit_code == 1
    assert "finding: file is truncated" in result.stderr and "tensors lack their bytes" in result.stderr
    data = json.loads(run("inspect", files / "truncated.safetensors", "--json").stdout)
    assert data["passed"] is False and data["findings"][0].startswith("file is truncated")


def test_outputs_are_checked_before_the_work(files, monkeypatch):
    from nsa_cli.commands import bench, export

    def must_not_run(*args, **kwargs):
        raise AssertionError("ran before the output was checked")

    monkeypatch.setattr(bench, "benchmark", must_not_run)
    monkeypatch.setattr(export, "build_module", must_not_run)
    assert_one_line_error(run("bench", "--device", "cpu", "--csv", "/nonexistent/x"), "does not exist")
    assert_one_line_error(run("export", "-o", files / "good.safetensors"), "exists", "--force")
    assert_one_line_error(run("export", "-o", files / "no" / "x.safetensors"), "does not exist")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only file system, or no permission
    assert_one_line_error(run("export", "-o", files / "new.safetensors"), "not writable")


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
                                         (errno.EACCES, "Permission denied")])
def test_a_refused_write_is_one_line(files, monkeypatch, code, words):
    from nsa_core.checkpoint import files as checkpoint_files

    def refuse(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint_files.os, "fsync", refuse)
    out = files / "refused.safetensors"
    assert_one_line_error(run("export", "--preset", "tiny", "-o", out), f"cannot write '{out}'", words)
    assert not out.exists() and not any(p.name.endswith(".nsa-tmp") for p in files.iterdir())


def test_a_bug_keeps_its_traceback(monkeypatch):
    from nsa_cli.commands import config_cmd

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(config_cmd, "branch_costs", broken)
    result = run("config", "show", "tiny")
    assert isinstance(result.exception, ZeroDivisionError)
