"""Options bounded by what the library runs, checked before any work: overflowing integers, sizes past
2**31 - 1, inputs past 2**40 elements, config values that would not build, JSON nesting bombs and huge
config files; `--from lucidrains` with arguments 0.2.3 cannot build. Each one line, naming the option,
exit 2. And `config show`'s cost table in closed form (any length, no tensor of size T)."""

import json

import pytest
import torch

from cli_support import assert_one_line_error, run
from nsa_cli.support import analysis
from nsa_core import SparseAttention, get_preset

HUGE = "9" * 32


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("bounds")
    (d / "bomb.json").write_text('{"dim": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (d / "deep.json").write_text('{"dim": ' + "[" * 40 + "]" * 40 + "}")
    (d / "huge.json").write_text(get_preset("tiny").to_json() + " " * 2**20)
    (d / "wide.json").write_text(json.dumps({**get_preset("tiny").to_dict(), "dim": 2**31}))
    torch.save(SparseAttention.from_config(get_preset("tiny")).state_dict(), d / "tiny.pt")
    return d


LUCIDRAINS = ["--no-causal", "--sliding-window-size", 8, "--num-selected-blocks", 2]

CASES = {
    "show seq-len past int64": (["config", "show", "paper", "--seq-len", HUGE], "--seq-len must be at most 2147483647"),
    "show seq-len 2**63": (["config", "show", "paper", "--seq-len", 2**63], "--seq-len must be at most 2147483647"),
    "show batch": (["config", "show", "paper", "--batch", 2**31], "--batch must be at most"),
    "check seed": (["check", "--seed", HUGE], "--seed must be at most 18446744073709551615"),
    "check seed -1": (["check", "--seed", -1], "--seed must be an integer >= 0"),
    "check batch 2**63 - 1": (["check", "--batch", 2**63 - 1], "--batch must be at most"),
    "check input past 2**40": (["check", "--batch", 100_000, "--seq-len", 100_000], "--batch 100000 x --seq-len 100000"),
    "check kv-heads": (["check", "--kv-heads", HUGE], "--kv-heads must be at most"),
    "export seed": (["export", "--preset", "tiny", "-o", "{d}/e.safetensors", "--seed", HUGE], "--seed must be at most"),
    "visualize batch": (["visualize-selection", "--batch", HUGE], "--batch must be at most"),
    "visualize input past 2**40": (["visualize-selection", "--batch", 1000, "--seq-len", 2**31 - 1, "--preset", "paper"],
                                   "--batch 1 x --seq-len"),
    "visualize seed": (["visualize-selection", "--seed", HUGE], "--seed must be at most"),
    "bench batch": (["bench", "--device", "cpu", "--batch", HUGE], "--batch must be at most"),
    "bench seq-len": (["bench", "--device", "cpu", "--seq-len", f"256,{HUGE}"], "--seq-len must be at most"),
    "create dim": (["config", "create", "-o", "{d}/c.json", "--dim", HUGE], "--dim must be at most 2147483647"),
    "create dim 1e20": (["config", "create", "-o", "{d}/c.json", "--dim", "1e20"], "--dim must be an integer, got '1e20'"),
    "create long number": (["config", "create", "-o", "{d}/c.json", "--dim", "9" * 5000], "(5000 characters)"),
    "create expand factor": (["config", "create", "-o", "{d}/c.json", "--compress-mlp-expand-factor", "1e300"],
                             "compression MLP's first weight", "2**40"),
    "create too wide": (["config", "create", "-o", "{d}/c.json", "--dim", 2**30], "to_qkv.weight", "2**40"),
    "nesting bomb as config": (["config", "show", "{d}/bomb.json"], "config nests too deeply"),
    "deep config": (["check", "--config", "{d}/deep.json"], "config nests deeper than 32 levels"),
    "huge config file": (["config", "show", "{d}/huge.json"], "huge.json", "at most 1,048,576 are read"),
    "config file too wide": (["check", "--config", "{d}/wide.json"], "dim must be at most 2147483647"),
    "lucidrains selection under the stride": (["convert", "{d}/tiny.pt", "{d}/o.safetensors", "--from", "lucidrains", *LUCIDRAINS,
                                               "--compress-block-sliding-stride", 4, "--selection-block-size", 2],
                                              "selection_block_size 2 with stride 4"),
    "lucidrains stride from the checkpoint": (["convert", "{d}/tiny.pt", "{d}/o.safetensors", "--from", "lucidrains", *LUCIDRAINS,
                                               "--compress-block-sliding-stride", "none", "--selection-block-size", 4],
                                              "selection_block_size 4 with stride 8"),
    "lucidrains interpolated": (["convert", "{d}/tiny.pt", "{d}/o.safetensors", "--from", "lucidrains", *LUCIDRAINS,
                                 "--compress-block-sliding-stride", 4, "--selection-block-size", 8,
                                 "--interpolated-importance-score"], "has no interpolated_importance_score"),
}


@pytest.mark.parametrize("case", CASES)
def test_out_of_bounds_is_one_line_naming_the_option(d, case):
    args, *words = CASES[case]
    assert_one_line_error(run(*(str(a).format(d=d) for a in args)), *words)
    assert not (d / "o.safetensors").exists() and not (d / "c.json").exists() and not (d / "e.safetensors").exists()


def brute_force_keys(cfg, T):
    """The per-query key counts summed over every query (the table's former tensor version)."""
    t = torch.arange(T, dtype=torch.float64)
    s, w, sel = cfg.stride, cfg.sliding_window_size, cfg.selection_block_size
    if cfg.causal:
        return ((t // s).mean().item(), (t.clamp(max=w) + 1).mean().item(), (t % sel + 1).mean().item())
    window = ((t + w).clamp(max=T - 1) - (t - w).clamp(min=0) + 1).mean().item()
    return (None, window, None)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 5, 200])
def test_cost_table_in_closed_form_equals_the_sums(causal, window):
    cfg = get_preset("paper").replace(causal=causal, sliding_window_size=window)
    for T in (1, 2, 15, 17, 63, 511, 1001):
        compressed, selected, sliding, _ = analysis.branch_costs(cfg, T)
        mean_blocks, mean_window, mean_own = brute_force_keys(cfg, T)
        assert sliding.keys_per_query == pytest.approx(mean_window, rel=1e-12)
        if causal:
            assert compressed.keys_per_query == pytest.approx(cfg.num_compressed_mem_kv + mean_blocks, rel=1e-12)
            assert selected.keys_per_query - mean_own == pytest.approx(
                min(cfg.num_selected_blocks, T // cfg.selection_block_size) * cfg.selection_block_size)


def test_cost_table_at_a_billion_tokens_is_immediate(monkeypatch):
    def no_tensors(*args, **kwargs):
        raise AssertionError("the cost table made a tensor")

    monkeypatch.setattr(torch, "arange", no_tensors)
    costs = analysis.branch_costs(get_preset("paper"), 10**9)
    assert costs[-1].keys_per_query == (10**9 + 1) / 2 and costs[2].keys_per_query < 513
    monkeypatch.undo()  # the command builds the module on the meta device to count parameters
    result = run("config", "show", "paper", "--seq-len", 2**31 - 1, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["seq_len"] == 2**31 - 1
