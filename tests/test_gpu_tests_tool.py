"""tools/gpu_tests.py: one pytest per file under its own time limit, every failure named, a file cut
off by its limit reported as such, the results written as they come."""

import json

from tools import gpu_tests

PASSING_AND_FAILING = '''
import pytest

@pytest.mark.gpu
def test_ok():
    pass

@pytest.mark.gpu
def test_broken():
    assert 1 == 2

def test_not_gpu():
    pass
'''
SLOW = '''
import time, pytest

@pytest.mark.gpu
def test_slow():
    time.sleep(60)
'''


def test_failures_named_and_a_slow_file_cut_off(tmp_path, capsys):
    (tmp_path / "test_mixed.py").write_text(PASSING_AND_FAILING)
    (tmp_path / "test_slow.py").write_text(SLOW)
    out = tmp_path / "out"
    code = gpu_tests.main([str(tmp_path / "test_mixed.py"), str(tmp_path / "test_slow.py"), "--out", str(out),
                           "--per-file", "10"])
    assert code == 1
    mixed, slow = json.loads((out / "results.json").read_text())
    assert mixed["counts"] == {"failed": 1, "passed": 1, "deselected": 1} and not mixed["cut_off"]
    assert [t.split("::")[-1] for t in mixed["failed"]] == ["test_broken"]
    assert slow["cut_off"] and slow["returncode"] is None
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "test_broken" in printed and "cut off" in printed


def test_not_a_path_is_exit_2(tmp_path, capsys):
    assert gpu_tests.main([str(tmp_path / "missing.py"), "--out", str(tmp_path)]) == 2
    assert "paths must be test files or folders" in capsys.readouterr().err
