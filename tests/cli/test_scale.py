"""The CLI at scale and on special files: output paths checked before any work (`-`,
devices, FIFOs, dangling symlinks, source == destination), visualize-selection's checks, picture
resolution and ASCII fallback, convert's bounded and silent oracle comparison, inspect of large headers
(complete, streamed), --version, help."""

import io
import json
import math
import os
import struct

import pytest
import torch
from rich.console import Console

from cli_support import assert_one_line_error as one_line_error, run
from nsa_cli.commands import visualize
from nsa_cli.support import inputs
from nsa_cli.support.outputs import check_output
from nsa_cli.support.selection_picture import selection_picture
from nsa_core import SparseAttention, get_preset


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts building a module."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(visualize, "build_module", refuse)


# outputs ------------------------------------------------------------------------------------


def test_stream_outputs_write_into_devices_and_never_replace_them():
    out = check_output("/dev/stdout", True, option="--csv", stream=True, needs_force=False)
    assert out.stream and out.path is not None
    assert check_output("-", False, stream=True).path is None
    result = run("config", "create", "-o", "/dev/null", "--preset", "tiny")
    assert result.exit_code == 0, result.output
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_file_outputs_refuse_devices_and_fifos_even_with_force(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    one_line_error(run("export", "--preset", "tiny", "-o", fifo, "--force"), "FIFO", "not a regular file")
    one_line_error(run("export", "--preset", "tiny", "-o", "/dev/null", "--force"), "character device")
    assert not fifo.is_file()


def test_dash_is_stdout_for_streams_and_refused_for_files(tmp_path):
    result = run("config", "create", "-o", "-", "--preset", "tiny", "--kv-heads", 1)
    assert result.exit_code == 0 and json.loads(result.stdout)["kv_heads"] == 1 and not (tmp_path / "-").exists()
    one_line_error(run("export", "--preset", "tiny", "-o", "-"), "writes a file, not a stream")
    one_line_error(run("config", "create", "-o", "-", "--json"), "--json would print into it")


def test_dangling_symlink_is_not_written_through_without_force(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "missing" / "target.json")
    one_line_error(run("config", "create", "-o", link, "--preset", "tiny"), "does not exist", "--force")
    assert run("config", "create", "-o", link, "--preset", "tiny", "--force").exit_code == 0
    assert link.is_file() and not link.is_symlink() and not (tmp_path / "missing").exists()


def test_symlink_to_a_regular_file_keeps_the_link(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert run("config", "create", "-o", link, "--preset", "tiny", "--force").exit_code == 0
    assert link.is_symlink() and json.loads(target.read_text())["dim"] == get_preset("tiny").dim


def test_convert_refuses_source_as_destination(tmp_path):
    src = tmp_path / "w.safetensors"
    assert run("export", "--preset", "tiny", "-o", src).exit_code == 0
    one_line_error(run("convert", src, src, "--to", "lucidrains", "--force"), "same file")
    one_line_error(run("convert", src, tmp_path / "." / "w.safetensors", "--to", "lucidrains", "--force"), "same file")


# visualize-selection ------------------------------------------------------------------------


def test_visualize_checks_head_and_matplotlib_before_any_work(no_work, tmp_path, monkeypatch):
    one_line_error(run("visualize-selection", "--head", 99, "--seq-len", 131072), "--head must be in [0, 1]")

    def no_matplotlib():
        raise visualize.UsageError("PNG output needs matplotlib: pip install 'nsa[plot]'")

    monkeypatch.setattr(visualize, "_pyplot", no_matplotlib)
    one_line_error(run("visualize-selection", "--seq-len", 32768, "-o", tmp_path / "big.png"), "needs matplotlib")


def test_batch_is_an_index_not_a_size(monkeypatch):
    sizes = []
    real = visualize.selection_picture
    monkeypatch.setattr(visualize, "selection_picture", lambda m, row, h, c: sizes.append(row.shape[0]) or real(m, row, h, c))
    result = run("visualize-selection", "--seq-len", 17, "--batch", 10000, "--json")
    assert result.exit_code == 0, result.output
    assert sizes == [1] and json.loads(result.stdout)["batch"] == 10000


def test_json_with_output_writes_the_file_and_reports_it(tmp_path):
    svg = tmp_path / "s.svg"
    result = run("visualize-selection", "--seq-len", 33, "--json", "-o", svg)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(svg) and svg.read_text().startswith("<svg")


def test_picture_resolution_is_bounded_and_statistics_are_linear():
    cfg = get_preset("tiny").replace(dim=16, dim_head=4, heads=2, kv_heads=1, selection_block_size=4,
                                     compress_block_size=4, sliding_window_size=4, backend="torch")
    torch.manual_seed(0)
    module = SparseAttention.from_config(cfg)
    n = 1001  # 251 selection blocks, pictured in at most 40 x 40 cells
    picture = selection_picture(module, torch.randn(1, n, 16), head=0, cells=40)
    assert picture.factor == 7 and picture.counts.shape == (36, 36)
    assert picture.own.diagonal().all() and picture.window.diagonal().all()  # visible at any scale
    selections = sum(c for blocks in picture.selected.values() for _, c in blocks)
    assert selections == int(picture.counts.sum()) <= n * cfg.num_selected_blocks


def test_latin1_terminal_gets_ascii_glyphs():
    assert visualize.glyphs_for("latin-1") is visualize.ASCII and visualize.glyphs_for("utf-8") is visualize.UNICODE
    cfg = get_preset("tiny").replace(backend="torch")
    module = SparseAttention.from_config(cfg)
    picture = selection_picture(module, torch.randn(1, 40, cfg.dim), head=0, cells=20)
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="latin-1")
    latin = Console(file=stream, width=80, color_system=None)
    for line in visualize.render_picture(picture, "t", visualize.glyphs_for(latin.encoding)):
        latin.print(line)  # a unicode glyph would raise UnicodeEncodeError half-way
    stream.flush()
    assert b"legend" in raw.getvalue()


# convert's oracle comparison ----------------------------------------------------------------


def test_oracle_comparison_is_bounded_silent_and_never_raises(monkeypatch, capsys):
    pytest.importorskip("native_sparse_attention_pytorch")
    import native_sparse_attention_pytorch as oracle

    module = SparseAttention.from_config(get_preset("tiny").replace(selection_block_size=65536))
    far = inputs.compare_with_oracle(module, module.state_dict())
    assert far.relative_error is None and "longer than the" in far.reason
    module = SparseAttention.from_config(get_preset("tiny").replace(selection_block_size=2))
    assert "smaller than the compression stride" in inputs.compare_with_oracle(module, {}).line()

    def noisy_failure(**kwargs):
        print("the oracle talks")
        raise AssertionError("oracle assertion")

    monkeypatch.setattr(oracle, "SparseAttention", noisy_failure)
    module = SparseAttention.from_config(get_preset("tiny"))
    found = inputs.compare_with_oracle(module, module.state_dict())
    assert found.relative_error is None and "AssertionError: oracle assertion" in found.reason
    assert capsys.readouterr().out == ""


# --version, help ----------------------------------------------------------------------------


def test_version_and_flags_in_help():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("nsa ")
    text = run("bench", "--help").stdout
    assert "--backward" in text and "<bool>" not in text


def test_inspect_streams_large_headers_with_findings_first(tmp_path):
    import struct

    from nsa_cli.commands import inspect_cmd

    n = inspect_cmd.TABLE_ROWS + 7
    header = {f"t{i:05d}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    raw = json.dumps(header).encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * n))
    result = run("inspect", path)
    assert result.exit_code == 1  # no embedded config: a finding
    assert result.stderr.startswith("finding: ")
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: {n:,} tensors" and lines[2].startswith("t00000") and f"t{n - 1:05d}" in lines[n + 1]


def _large_header_file(path, layers):
    """A header of layer-structured tensors and junk ones, with four planted layout defects and 12
    bytes after the last tensor; returns (path, header entries by name, the layout findings expected)."""
    parts = [("attn.to_qkv.weight", [3, 5]), ("attn.k_compress.0.weight", [7]), ("norm.weight", [5])]
    header, position = {}, 0
    for i in range(layers):
        for part, shape in parts:
            size = 4 * math.prod(shape)
            header[f"layers.{i}.{part}"] = {"dtype": "F32", "shape": shape, "data_offsets": [position, position + size]}
            position += size
    header["junk.bad_size"] = {"dtype": "F16", "shape": [3], "data_offsets": [position, position + 4]}
    header["junk.odd_dtype"] = {"dtype": "Q7", "shape": [1], "data_offsets": [position + 4, position + 5]}
    header["junk.gap"] = {"dtype": "F32", "shape": [], "data_offsets": [position + 13, position + 17]}
    end = position + 17
    findings = [f"tensor junk.bad_size (F16 [3]) needs 6 bytes, its data_offsets [{position}, {position + 4}] give 4",
                "tensor junk.odd_dtype has unknown dtype 'Q7'",
                f"tensor junk.gap starts at byte {position + 13} of the data, the previous one ends at {position + 5} "
                "(gap or overlap)",
                f"12 bytes after the last tensor (the header places data up to byte {end} of {end + 12})"]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (end + 12))
    return path, header, findings


def test_inspect_of_a_large_header_lists_every_tensor_and_every_finding(tmp_path):
    layers = 16_667  # 50,004 tensors
    path, header, layout = _large_header_file(tmp_path / "large.safetensors", layers)
    no_config = "the file has no 'nsa_config' metadata: it was not written by nsa export / save_safetensors"
    elements = layers * (15 + 7 + 5) + 3 + 1 + 1

    result = run("inspect", path)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"finding: {f}" for f in layout + [no_config]]
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: {len(header):,} tensors" and lines[1].split() == ["tensor", "shape", "dtype", "bytes"]
    listed = [line.split() for line in lines[2 : 2 + len(header)]]
    assert [row[0] for row in listed] == sorted(header)
    rows = {row[0]: row[1:] for row in listed}
    assert rows["layers.16666.attn.to_qkv.weight"] == ["3x5", "F32", "60", "B"]
    assert rows["junk.gap"] == ["scalar", "F32", "4", "B"] and rows["junk.odd_dtype"] == ["1", "Q7", "1", "B"]
    assert lines[2 + len(header):] == [f"tensor elements: {elements:,} (parameters and persistent buffers)",
                                       "file check failed: 5 finding(s)"]

    result = run("inspect", path, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["findings"] == layout + [no_config] and data["parameters"] == elements and data["passed"] is False
    assert list(data["tensors"]) == list(header)
    assert data["tensors"] == {name: {**info, "bytes": info["data_offsets"][1] - info["data_offsets"][0]}
                               for name, info in header.items()}
    lines = result.stdout.splitlines()
    first = lines.index('  "tensors": {') + 1
    assert lines[first + len(header)] == "  },"  # one line per tensor
    assert lines[first] == '    "layers.0.attn.to_qkv.weight": {"dtype": "F32", "shape": [3, 5], "bytes": 60, "data_offsets": [0, 60]},'


def test_inspect_writes_the_first_lines_before_it_has_formatted_the_last(monkeypatch):
    from nsa_cli.commands import inspect_cmd

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            writes.append(None)

    tensors = {f"t{i}\r": {"dtype": "F32", "shape": [2, i % 3], "bytes": 8 * (i % 3), "data_offsets": [0, 0]}
               for i in range(2 * inspect_cmd.CHUNK_LINES + 5)}
    written_when_done = []

    def lines():
        yield from inspect_cmd._listing_lines("title", tensors)
        written_when_done.append(sum(w is not None for w in writes))

    inspect_cmd._write_lines(Recorder(), lines())
    assert written_when_done == [2] and writes.count(None) == 3  # two chunks out, flushed, before the last line
    text = "".join(w for w in writes if w is not None).splitlines()
    assert text[0] == f"title: {len(tensors):,} tensors" and len(text) == len(tensors) + 2
    assert text[2].split() == ["t0", "2x0", "F32", "0", "B"]  # the carriage return removed, as Rich removes it
