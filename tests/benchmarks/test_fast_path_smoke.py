"""benchmarks.cpu.fast_path: a smoke run, and the loop-reference switch really runs the loop reference."""

import importlib

import torch

from benchmarks.cpu.fast_path import loop_reference, main
from nsa_core.reference.fast_window import sliding_window_fast


def test_loop_reference_swaps_and_restores():
    ops = importlib.import_module("nsa_core.ops.sliding_window")
    with loop_reference():
        assert ops.sliding_window_fast is not sliding_window_fast
    assert ops.sliding_window_fast is sliding_window_fast


def test_smoke_run():
    (result,) = main(["--smoke", "--threads", str(torch.get_num_threads())])
    assert result["fast"] > 0 and result["dense"] > 0 and result["loop"] > 0
