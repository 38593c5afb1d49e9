"""benchmarks/retrieval: the tasks' rows have the promised layout, the diagnostics count hits and
their random baseline right, the variants hold their gates at 0, the best learning rate is
chosen by the curve, and the `--smoke` run writes every run's JSON, the summary and the PNG."""

import importlib.util
import json

import pytest
import torch

from benchmarks.attention_layers import BRANCHES, BranchGate, ModelShape
from benchmarks.retrieval.cli import main
from benchmarks.retrieval.diagnostics import selection_hits
from benchmarks.retrieval.models import VARIANTS, Variant, build_model, sparse_layers
from benchmarks.retrieval.report import summarize
from benchmarks.retrieval.settings import SMOKE
from benchmarks.retrieval.tasks import Batch, Curriculum, MQARTask, NeedleTask
from benchmarks.retrieval.training import TrainSettings, train_run

CPU = torch.device("cpu")
TINY = ModelShape(dim=32, depth=2, heads=2, kv_heads=1, dim_head=16, ff_mult=2, window=8, compress_block=8,
                  compress_stride=4, selection_block=8, num_selected=2, compress_hidden=16)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_needle_rows_hold_one_needle_beyond_the_window_and_end_with_its_key():
    task = NeedleTask(min_distance=9)
    batch = task.batch(512, 64, generator(), CPU)
    assert batch.ids.shape == (512, 64) and batch.answer_pos.shape == batch.targets.shape == (512, 1)
    rows = torch.arange(512)
    value_pos = batch.support_pos[:, 0]
    assert (batch.ids[:, -1] == task.key_marker).all() and (batch.answer_pos == 63).all()
    assert (batch.ids[rows, value_pos - 1] == task.key_marker).all()
    assert torch.equal(batch.ids[rows, value_pos], batch.targets[:, 0])
    assert ((batch.ids == task.key_marker).sum(dim=1) == 2).all()  # the needle's key and the query
    distance = 63 - value_pos
    assert distance.min() == 9 and distance.max() == 62  # uniform over [min_distance, length - 2]
    filler = torch.ones_like(batch.ids, dtype=torch.bool)
    filler[rows, value_pos], filler[rows, value_pos - 1], filler[:, -1] = False, False, False
    assert (batch.ids[filler] > task.key_marker).all() and (batch.targets < task.num_values).all()
    assert torch.equal(task.batch(4, 64, generator(3), CPU).ids, task.batch(4, 64, generator(3), CPU).ids)
    with pytest.raises(ValueError, match="min_distance"):
        task.batch(2, 10, generator(), CPU)


def test_mqar_rows_hold_the_pairs_then_each_key_again_with_its_value_as_answer():
    task = MQARTask(num_pairs=6, vocab=40)
    batch = task.batch(64, 30, generator(), CPU)
    keys, values = batch.ids[:, 0:12:2], batch.ids[:, 1:12:2]
    assert ((keys >= 1) & (keys <= task.num_keys)).all() and (values > task.num_keys).all()
    assert all(len(set(row.tolist())) == 6 for row in keys)
    assert (batch.answer_pos >= 12).all() and (batch.answer_pos.diff(dim=1) > 0).all()
    queried = batch.ids.gather(1, batch.answer_pos)
    assert torch.equal(queried.sort(dim=1).values, keys.sort(dim=1).values)  # every key once, some order
    assert torch.equal(batch.ids.gather(1, batch.support_pos), batch.targets)  # the support is the value ...
    assert torch.equal(batch.ids.gather(1, batch.support_pos - 1), queried)  # ... that follows the queried key
    rest = torch.ones_like(batch.ids, dtype=torch.bool)
    rest[:, :12] = False
    rest.scatter_(1, batch.answer_pos, False)
    assert (batch.ids[rest] == 0).all()
    with pytest.raises(ValueError, match="num_pairs"):
        task.batch(2, 17, generator(), CPU)


def test_curriculum_doubles_at_the_threshold_up_to_the_target():
    curriculum = Curriculum(256, 1024, threshold=0.9)
    assert not curriculum.update(0.89) and curriculum.length == 256
    assert curriculum.update(0.9) and curriculum.length == 512
    assert curriculum.update(0.95) and curriculum.length == 1024
    assert not curriculum.update(1.0) and curriculum.length == 1024


def test_selection_hits_and_their_random_baseline():
    # 2 rows, 1 head, answers at 40 (5 blocks of 8 before its own) and 20 (2 blocks); 2 slots each
    batch = Batch(ids=torch.zeros(2, 48, dtype=torch.long), answer_pos=torch.tensor([[40], [20]]),
                  targets=torch.zeros(2, 1, dtype=torch.long), support_pos=torch.tensor([[13], [3]]))
    indices = torch.zeros(2, 1, 48, 2, dtype=torch.long)
    valid = torch.zeros(2, 1, 48, 2, dtype=torch.bool)
    indices[0, 0, 40], valid[0, 0, 40] = torch.tensor([4, 1]), torch.tensor([True, True])  # block 1 = 13 // 8: hit
    indices[1, 0, 20], valid[1, 0, 20] = torch.tensor([0, 1]), torch.tensor([False, True])  # block 0 invalid: miss
    hits, baseline = selection_hits(indices, valid, batch, selection_block=8)
    assert hits.flatten().tolist() == [1.0, 0.0]
    assert baseline.flatten().tolist() == pytest.approx([2 / 5, 1 / 2])


def test_branch_gate_holds_the_branches_it_turns_off_at_exactly_zero():
    gate = BranchGate(16, heads=3, off=("compressed", "sliding"), biases=(0.5, -1.0, 2.0))
    out = gate(torch.randn(2, 5, 16)).sigmoid().view(2, 5, 3, len(BRANCHES))
    assert (out[..., 0] == 0).all() and (out[..., 2] == 0).all()
    assert torch.allclose(out[..., 1], torch.sigmoid(torch.tensor(-1.0)))
    with pytest.raises(ValueError, match="off"):
        BranchGate(16, heads=1, off=("fine",))


def test_variants_differ_only_in_attention_and_take_library_options():
    models = {name: build_model(VARIANTS[name], TINY, vocab_size=20, target_length=64, seed=0)
              for name in ("dense", "nsa", "nsa_selected_only_all_blocks")}
    dense, nsa, every = models.values()
    for name in ("embed.weight", "previous_embed.weight", "to_logits.weight", "feed_forwards.1.3.weight"):
        assert torch.equal(dense.state_dict()[name], nsa.state_dict()[name]), name
    assert [layer.config.num_selected_blocks for layer in sparse_layers(every)] == [64 // 8] * 2
    gates = sparse_layers(every)[0].to_strategy_combine(torch.randn(1, 4, 32))  # (b, h, n, 3)
    assert (gates[..., 0] == 0).all() and (gates[..., 2] == 0).all() and (gates[..., 1] > 0).all()
    diff = build_model(Variant("nsa", options={"use_diff_topk": True}), TINY, 20, 64, seed=0)
    assert all(layer.config.use_diff_topk for layer in sparse_layers(diff))
    with pytest.raises(ValueError, match="not_an_option"):
        Variant("nsa", options={"not_an_option": 1})
    with pytest.raises(ValueError, match="nsa variants only"):
        Variant("dense", branches=("selected",))


def _run(model: str, lr: float, seed: int, accuracy: list[float]) -> dict:
    steps = [10 * i for i in range(len(accuracy))]
    return {"task": {"name": "needle", "length": 64, "chance": 0.0625}, "model": model, "lr": lr, "seed": seed,
            "eval": {"step": steps, "accuracy": accuracy}, "diagnostics": {}, "status": "finished",
            "steps_to": {"0.9": next((s for s, a in zip(steps, accuracy) if a >= 0.9), None), "0.95": None}}


def test_best_learning_rate_is_the_one_with_the_highest_mean_curve():
    runs = [_run("nsa", 1e-3, 0, [0.1, 0.5, 1.0]), _run("nsa", 1e-3, 1, [0.1, 0.9, 1.0]),
            _run("nsa", 3e-3, 0, [0.1, 1.0, 0.3]), _run("nsa", 3e-3, 1, [0.1, 0.2, 0.3])]
    (row,) = summarize(runs)
    assert row["best_lr"] == 1e-3 and row["seeds"] == [0, 1] and row["steps_to_0.9"] == [20, 10]
    assert row["final_accuracy"] == 1.0 and row["lrs_tried"] == [1e-3, 3e-3]


def test_train_run_reports_every_evaluation_as_it_goes():
    task = NeedleTask(min_distance=9)
    model = build_model(VARIANTS["nsa"], TINY, task.vocab_size, 32, seed=0)
    s = TrainSettings(steps=4, batch=2, eval_every=2, eval_rows=4, lr=1e-3, seed=0, target_length=32,
                      curriculum_start=32, warmup_steps=1, sync_every=2)
    seen = []
    record = train_run(model, task, s, CPU, "fp32", on_eval=lambda r: seen.append(json.loads(json.dumps(r))),
                       log=lambda _: None)
    assert [len(r["eval"]["step"]) for r in seen] == [1, 2, 3, 3] and seen[0]["status"] == "running"
    assert record["status"] == "finished" and record["eval"]["step"] == [0, 2, 4] and record["steps"] == 4
    norms = record["diagnostics"]["grad_norms"]
    assert norms[0] is None and all(layer["k_compress"] > 0 and layer["to_qkv"] > 0 for layer in norms[-1])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval")
    assert main(["--smoke", "--out", str(out)]) == 0
    return out, {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}


def test_smoke_runs_every_task_model_rate_and_seed(smoke):
    _, runs = smoke
    expected = {f"{task}-{length}-{model}-lr{lr:g}-seed{seed}" for task, length in (("needle", 64), ("mqar", 48))
                for model in VARIANTS for lr in SMOKE.lrs for seed in SMOKE.seeds}
    assert set(runs) == expected
    for name, run in runs.items():
        curve = run["eval"]
        assert run["status"] == "finished" and run["steps"] == SMOKE.steps, name
        assert curve["step"] == sorted(set(curve["step"])) and curve["step"][0] == 0 and curve["step"][-1] == run["steps"]
        assert run["train"]["step"] == sorted(set(run["train"]["step"]))
        assert all(0.0 <= a <= 1.0 for a in curve["accuracy"]) and all(loss > 0 for loss in curve["loss"]), name
        assert set(run["steps_to"]) == {"0.9", "0.95"}
        assert all(v is None or v in curve["step"] for v in run["steps_to"].values())
        assert run["wall_seconds"] > 0 and run["params"] > run["attention_params"] > 0
        assert run["environment"]["torch"] == torch.__version__


def test_smoke_diagnostics_hit_rates_baselines_and_gates(smoke):
    _, runs = smoke
    depth, block, selected = SMOKE.shape.depth, SMOKE.shape.selection_block, SMOKE.shape.num_selected
    for name, run in runs.items():
        diag = run["diagnostics"]
        if run["config"]["variant"]["attention"] != "nsa":
            assert not any(diag["hit_rate"]), name
            continue
        assert diag["step"] == run["eval"]["step"] and all(len(h) == depth for h in diag["hit_rate"])
        assert all(0.0 <= h <= 1.0 for hits in diag["hit_rate"] for h in hits)
        off = [b for b in BRANCHES if b not in run["config"]["variant"]["branches"]]
        assert all(layer[b] == 0.0 for gates in diag["gates"] for layer in gates for b in off), name
        if run["config"]["variant"]["all_blocks"]:
            assert all(h == 1.0 for hits in diag["hit_rate"] + diag["hit_rate_random"] for h in hits), name
        elif run["task"]["name"] == "needle":  # one query at 63: 63 // 8 = 7 blocks before its own
            assert all(h == pytest.approx(selected / (63 // block), abs=1e-4)
                       for hits in diag["hit_rate_random"] for h in hits), name


def test_smoke_writes_the_summary_the_picture_and_resumes(smoke, capsys):
    out, runs = smoke
    rows = json.loads((out / "summary_retrieval.json").read_text())["rows"]
    assert {(row["task"], row["model"]) for row in rows} == {(t, m) for t in ("needle 64", "mqar 48") for m in VARIANTS}
    assert all(row["best_lr"] in SMOKE.lrs for row in rows)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "results_retrieval.png").stat().st_size > 10_000
    before = (out / "runs" / "needle-64-dense-lr0.001-seed0.json").read_text()
    capsys.readouterr()
    assert main(["--smoke", "--out", str(out), "--models", "dense", "--tasks", "needle"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, kept") == len(SMOKE.lrs) and "Retrieval from scratch" in printed
    assert (out / "runs" / "needle-64-dense-lr0.001-seed0.json").read_text() == before


@pytest.mark.parametrize("args, name", [(["--steps", "0"], "steps"), (["--models", "nsa,flash"], "models"),
                                        (["--tasks", "copy"], "tasks"), (["--lrs", "a"], "lrs"),
                                        (["--nsa-options", '{"bogus": 1}'], "bogus"),
                                        (["--define", "x"], "define"),
                                        (["--needle-lengths", "8"], "min_distance")])
def test_bad_arguments_are_one_line_errors_naming_the_argument(tmp_path, capsys, args, name):
    assert main(["--smoke", "--out", str(tmp_path), *args]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ") and name in out and len(out.strip().splitlines()) == 1, out
