"""The language-model comparison (benchmarks/lm): packing and positions, document isolation of
every model, the bucketed and capped evaluation, the report's equal-tokens / equal-time reading,
the corpus split, and the smoke run end to end with resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.lm.cli import main
from benchmarks.lm.corpus import IGNORE, SEPARATOR, load_corpus, pack
from benchmarks.lm.evaluation import NATS_TO_BITS, summarize_losses
from benchmarks.lm.models import VARIANTS, build_model
from benchmarks.lm.report import curve_at, summarize
from benchmarks.lm.settings import SMOKE

REPO = Path(__file__).resolve().parents[2]


def test_pack_marks_documents_labels_and_positions():
    rows = torch.tensor([[5, 6, SEPARATOR, 7, 8, 9], [1, SEPARATOR, SEPARATOR, 2, 3, 4]])
    batch = pack(rows)
    assert batch.inputs.tolist() == [[5, 6, 0, 7, 8, 1, 0, 0, 2, 3]]
    # a document starts each row and after each separator (an empty one between two separators)
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 7, 8, 10] and batch.cu_seqlens.dtype == torch.int32
    # the label of a separator is the next document's first byte: not scored
    assert batch.labels.tolist() == [[6, 0, IGNORE, 8, 9, 0, IGNORE, IGNORE, 3, 4]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 0, 1]]


def test_pack_with_a_cap_cuts_documents_and_keeps_the_labels():
    rows = torch.tensor([[1, 2, 3, 4, 5, 6, 7, SEPARATOR, 8, 9, 10]])
    full, capped = pack(rows), pack(rows, cap=3)
    assert full.cu_seqlens.tolist() == [0, 8, 10]
    assert capped.cu_seqlens.tolist() == [0, 3, 6, 8, 10]
    assert torch.equal(capped.labels, full.labels) and torch.equal(capped.inputs, full.inputs)
    assert capped.positions.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 0, 1]]
    with pytest.raises(ValueError, match="cap"):
        pack(rows, cap=0)
    with pytest.raises(ValueError, match="rows"):
        pack(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_model_keeps_packed_documents_apart(variant):
    """The logits of a document packed after another equal its logits alone (random weights)."""
    torch.manual_seed(0)
    model = build_model(variant, SMOKE.shape, seed=3, options=dict(SMOKE.nsa_options), backend="torch").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # gates and zero-initialised weights away from their start
    a, b = torch.randint(1, 256, (1, 37)), torch.randint(1, 256, (1, 50))
    with torch.no_grad():
        alone_a = model(a, torch.tensor([0, 37], dtype=torch.int32))
        alone_b = model(b, torch.tensor([0, 50], dtype=torch.int32))
        packed = model(torch.cat((a, b), 1), torch.tensor([0, 37, 87], dtype=torch.int32))
    torch.testing.assert_close(packed[:, :37], alone_a, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(packed[:, 37:], alone_b, atol=2e-5, rtol=2e-5)


def test_losses_are_summarized_by_position_bucket():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    scored = torch.tensor([True, True, False, True, True])
    positions = torch.tensor([0, 3, 4, 9, 20])
    out = summarize_losses(losses, scored, positions, (0, 4, 10, 16))
    assert math.isclose(out["bpb"], (1 + 2 + 4 + 5) / 4 * NATS_TO_BITS)
    assert math.isclose(out["buckets"]["0-4"], 1.5 * NATS_TO_BITS)
    assert math.isclose(out["buckets"]["4-10"], 4 * NATS_TO_BITS)  # the unscored label at position 4 left out
    assert out["buckets"]["10-16"] is None  # position 20 lies past the last edge
    assert out["bucket_labels"] == {"0-4": 2, "4-10": 1, "10-16": 0}


def _run(model, seed, points, tokens_per_s=1.0):
    final = {"full": {"bpb": points[-1][2], "buckets": {"0-8": 1.0}}, "capped_minus_full": {"0-8": 0.1}}
    return {"status": "finished", "model": model, "lr": 1e-3, "seed": seed, "params": 10, "tokens": points[-1][0],
            "tokens_per_s": tokens_per_s, "final": final,
            "val": [{"tokens": t, "seconds": s, "bpb": b} for t, s, b in points]}


def test_report_reads_curves_at_equal_tokens_and_equal_time():
    assert curve_at([{"tokens": 0, "bpb": 8.0}, {"tokens": 10, "bpb": 4.0}], "tokens", 5) == 6.0
    assert curve_at([{"tokens": 0, "bpb": 8.0}, {"tokens": 10, "bpb": 4.0}], "tokens", 11) is None
    fast = _run("window", 0, [(0, 0, 8.0), (100, 10, 3.0)])
    slow = _run("nsa", 0, [(0, 0, 8.0), (50, 10, 4.0), (100, 20, 2.0)])
    rows = {r["model"]: r for r in summarize([fast, slow])["rows"]}
    assert rows["nsa"]["bpb_at_equal_tokens"] == 2.0 and rows["window"]["bpb_at_equal_tokens"] == 3.0
    assert rows["nsa"]["bpb_at_equal_time"] == 4.0 and rows["window"]["bpb_at_equal_time"] == 3.0
    assert rows["nsa"]["buckets_at_equal_tokens"] == {"0-8": None}  # these curves carry no buckets


def test_report_reads_a_position_bucket_along_the_curve():
    points = [{"tokens": 0, "bpb": 8.0, "buckets": {"0-8": 9.0, "8-16": 7.0}},
              {"tokens": 10, "bpb": 4.0, "buckets": {"0-8": 5.0, "8-16": 3.0}},
              {"tokens": 20, "bpb": 2.0}]  # a point without buckets (an earlier run's format)
    assert curve_at(points, "tokens", 5, bucket="8-16") == 5.0
    assert curve_at(points, "tokens", 10, bucket="0-8") == 5.0
    assert curve_at(points, "tokens", 15, bucket="0-8") is None and curve_at(points, "tokens", 15) == 3.0


def test_corpus_split_is_by_file_and_drops_duplicates(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i:02d}.py").write_text(f"x = {i}\n" * 5)
    (tmp_path / "copy.py").write_text("x = 3\n" * 5)  # the same bytes as m03.py
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "skip.py").write_text("skipped = True\n")
    corpus = load_corpus("stdlib", 0.3, roots=[tmp_path])
    d = corpus.description
    assert d["files"] == 40 and d["duplicate_files_dropped"] == 1
    assert d["train_bytes"] + d["val_bytes"] == sum(len(f"x = {i}\n" * 5) + 1 for i in range(40))
    assert 0 < d["val_bytes"] < d["train_bytes"]
    assert int((corpus.train == SEPARATOR).sum() + (corpus.val == SEPARATOR).sum()) == 40
    again = load_corpus("stdlib", 0.3, roots=[tmp_path])
    assert torch.equal(again.val, corpus.val) and again.description["sha256"] == d["sha256"]
    with pytest.raises(ValueError, match="corpus"):
        load_corpus("nowhere", 0.3)


def test_smoke_run_writes_every_run_and_resumes(tmp_path, capsys):
    args = ["--smoke", "--out", str(tmp_path), "--models", "dense,nsa", "--steps", "2", "--eval-every", "1"]
    assert main(args) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert runs == ["dense-lr0.003-seed0.json", "nsa-lr0.003-seed0.json"]
    run = json.loads((tmp_path / "runs" / runs[1]).read_text())
    assert run["status"] == "finished" and run["steps"] == 2 and [p["step"] for p in run["val"]] == [0, 1, 2]
    assert all(set(p["buckets"]) == {"0-32", "32-64", "64-128"} for p in run["val"])
    assert run["val"][-1]["buckets"]["64-128"] == pytest.approx(run["final"]["full"]["buckets"]["64-128"], abs=1e-5)
    assert set(run["final"]["capped_minus_full"]) == {"0-32", "32-64", "64-128"}
    summary = json.loads((tmp_path / "summary_lm.json").read_text())
    assert {r["model"] for r in summary["rows"]} == {"dense", "nsa"}
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == 2


@pytest.mark.parametrize("bad, message", [(["--models", "dense,rnn"], "models"), (["--buckets", "5,10"], "buckets"),
                                          (["--nsa-options", "{"], "nsa_options"), (["--lrs", "x"], "lrs"),
                                          (["--compression-lr-scale", "0"], "compression_lr_scale")])
def test_bad_settings_exit_2_naming_the_setting(tmp_path, capsys, bad, message):
    assert main(["--smoke", "--out", str(tmp_path), *bad]) == 2
    assert message in capsys.readouterr().out


def test_sweep_schedule_is_the_1500_step_runs_settings():
    """--schedule sweep gives the settings of the 1500-step runs in results/lm_1500_*; flags still override it."""
    from benchmarks.lm.cli import parse_arguments, settings_from_arguments

    sweep = settings_from_arguments(parse_arguments(["--out", "x", "--schedule", "sweep"]))
    recorded = json.loads((REPO / "benchmarks/results/lm_1500_compression_lr025/runs/nsa-lr0.001-seed0.json").read_text())
    for name in ("steps", "warmup_steps", "eval_every", "time_budget_s", "context", "batch"):
        assert getattr(sweep, name) == recorded["config"][name], name
    full = settings_from_arguments(parse_arguments(["--out", "x"]))
    assert (full.steps, full.time_budget_s) == (6000, 480.0)
    assert settings_from_arguments(parse_arguments(["--out", "x", "--schedule", "sweep", "--steps", "900"])).steps == 900


def test_gate_probe_averages_each_branch_by_layer_and_position_bucket():
    from benchmarks.lm.probes import GateProbe

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_strategy_combine = nn.Identity()

    model = nn.Module()
    model.attentions = nn.ModuleList([Layer(), Layer()])
    probe = GateProbe(model, (0, 4, 10))
    positions = torch.tensor([0, 1, 5, 7, 12, 2])  # 12 lies past the last edge: not counted
    gates = torch.stack([positions / 100, torch.full((6,), 0.5), 1 - positions / 100], -1)  # (n, 3)
    with probe.recording(positions):
        for i, layer in enumerate(model.attentions):
            layer.to_strategy_combine(gates.expand(2, 3, 6, 3) * (i + 1))  # layer 2 gates twice layer 1's
    s = probe.summary()
    assert s["by_bucket"]["0-4"]["compressed"] == pytest.approx(1.5 * (0 + 1 + 2) / 300)
    assert s["by_bucket"]["4-10"]["compressed"] == pytest.approx(1.5 * (5 + 7) / 200)
    assert s["mean"]["selected"] == pytest.approx(0.75)
    assert [layer["selected"] for layer in s["per_layer"]] == [pytest.approx(0.5), pytest.approx(1.0)]


def test_validation_records_the_gates_of_nsa_models_only(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path), "--models", "dense,no_selection", "--steps", "1"]) == 0
    dense = json.loads((tmp_path / "runs" / "dense-lr0.003-seed0.json").read_text())
    no_selection = json.loads((tmp_path / "runs" / "no_selection-lr0.003-seed0.json").read_text())
    assert dense["val"][-1]["gates"] is None
    gates = no_selection["val"][-1]["gates"]
    assert gates["mean"]["selected"] == 0.0 and 0 < gates["mean"]["compressed"] < 1
    assert set(gates["by_bucket"]) == {"0-32", "32-64", "64-128"} and len(gates["per_layer"]) == 2
    off = no_selection["final"]["branch_off_minus_full"]
    assert all(v == 0.0 for v in off["selected"].values())  # that gate is 0 already
    assert all(v != 0.0 and math.isfinite(v) for b in ("compressed", "sliding") for v in off[b].values())
    assert "branch_off_minus_full" not in dense["final"]


def test_compression_networks_train_at_their_own_rate():
    """compression_lr_scale: the compression networks, memory tokens and intra-block positions of every
    NSA layer step at scale x the rate, everything else at the rate, decay as before."""
    from benchmarks.quality_training import make_optimizer, optimizer_step
    from nsa_core.model.optimizer_groups import COMPRESSION_ATTRIBUTES

    model = build_model("nsa", SMOKE.shape, 0, dict(SMOKE.nsa_options))
    optimizer = make_optimizer(model, 1e-3, 0.1, torch.device("cpu"), compression_lr_scale=0.25)
    ids = torch.randint(0, 256, (1, 48))
    loss = model(ids, torch.tensor([0, 20, 48], dtype=torch.int32)).float().logsumexp(-1).mean()
    optimizer_step(model, optimizer, loss, 2e-3, 1.0)
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    compression = [n for n in names if any(part in n for part in COMPRESSION_ATTRIBUTES)]
    assert len(compression) == SMOKE.shape.depth * 11  # k / v nets (2 weights, 2 biases each), 2 positions, memory
    for name, p in names.items():
        assert rate[id(p)] == pytest.approx(2e-3 * (0.25 if name in compression else 1.0)), name
        assert decay[id(p)] == (0.1 if p.ndim >= 2 else 0.0), name
    assert len(rate) == len(names)


def test_a_run_paused_and_resumed_equals_the_run_uninterrupted(tmp_path):
    """checkpoint + command_budget_s: a run stopped after its first evaluation and continued by a second call
    has the uninterrupted run's batches, learning rates, curves and weights (to the bit, on the CPU)."""
    from dataclasses import replace

    from benchmarks.lm.training import train_run

    s = replace(SMOKE, eval_every=1, reach_documents=0)
    corpus = load_corpus(s.corpus, s.val_fraction, s.corpus_max_bytes)
    device = torch.device("cpu")
    config = {"run": "test"}

    def fresh():
        return build_model("nsa", s.shape, 0, dict(s.nsa_options), "torch")

    whole = fresh()
    uninterrupted = train_run(whole, corpus, s, 3e-3, 0, device, "fp32", lambda m: None)
    checkpoint = tmp_path / "run.pt"
    first_model = fresh()
    first = train_run(first_model, corpus, s, 3e-3, 0, device, "fp32", lambda m: None, checkpoint=checkpoint,
                      config=config, command_budget_s=1e-9)
    assert first["paused"] and first["steps"] == 1 and checkpoint.exists() and "final" not in first
    resumed_model = fresh()
    second = train_run(resumed_model, corpus, s, 3e-3, 0, device, "fp32", lambda m: None, checkpoint=checkpoint,
                       config=config)
    assert not second["paused"] and second["steps"] == s.steps and not checkpoint.exists()
    assert [p["step"] for p in second["val"]] == list(range(s.steps + 1))
    assert [p["bpb"] for p in second["val"]] == [p["bpb"] for p in uninterrupted["val"]]
    assert second["train_loss"] == uninterrupted["train_loss"]
    assert second["final"]["full"] == uninterrupted["final"]["full"]
    assert [(g["from_step"], g["to_step"]) for g in second["segments"]] == [(0, 1), (1, s.steps)]
    for (name, a), b in zip(whole.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    partial = train_run(fresh(), corpus, s, 3e-3, 0, device, "fp32", lambda m: None, checkpoint=checkpoint,
                        config=config, command_budget_s=1e-9)
    assert partial["paused"] and checkpoint.exists()
    with pytest.raises(ValueError, match="another configuration"):
        train_run(fresh(), corpus, s, 3e-3, 0, device, "fp32", lambda m: None, checkpoint=checkpoint,
                  config={"run": "another"})


def test_command_budget_needs_a_checkpoint_dir(tmp_path, capsys):
    assert main(["--smoke", "--out", str(tmp_path), "--command-budget-s", "60"]) == 2
    assert "checkpoint-dir" in capsys.readouterr().out
    assert main(["--smoke", "--out", str(tmp_path), "--command-budget-s", "0", "--checkpoint-dir", str(tmp_path)]) == 2
    assert "command_budget_s" in capsys.readouterr().out


def test_a_spent_command_budget_starts_no_run(tmp_path, capsys):
    args = ["--smoke", "--out", str(tmp_path), "--models", "dense", "--command-budget-s", "1e-6",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main(args) == 0
    assert "wait for the next command" in capsys.readouterr().out
    assert not list((tmp_path / "runs").glob("*.json"))
