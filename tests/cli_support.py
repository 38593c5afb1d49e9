"""Shared by the CLI tests: run a command in-process, and the one-line error every failure must be."""

from __future__ import annotations

from typer.testing import CliRunner

from nsa_cli.main import app

runner = CliRunner()
ENV = {"COLUMNS": "120", "NO_COLOR": "1"}


def run(*args):
    """`nsa ARGS...` in-process, 120 columns, no colour."""
    return runner.invoke(app, list(map(str, args)), env=ENV)


def assert_one_line_error(result, *words):
    """Exit 2, one `error: ...` line on stderr holding every word, no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], lines[0]
