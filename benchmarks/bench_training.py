"""The training-speed table of issue 18 in one GPU run: NSA attention at 4k-64k against SDPA and the
peer flash-nsa, the Transformer training step at 512-32k tokens, peak memory, and the cold compile time.

Attention: paper preset (d 128, 4 kv heads, compression 32/16, 16 blocks of 64, window 512, causal) at
G = 16 (64 q heads) and G = 4 (16 q heads), bf16, batch 1; q, k, v -> the attention output, no output
projection:
  dense        SDPA on (1, heads, T, 128), GQA native (enable_gqa), under cuDNN and under flash
               ("best dense": the faster of those that ran);
  nsa eager    SparseAttention.attend_projected with its output projection replaced by an identity (no
               method stops before it): compression MLP, the three branches, selection, gates, combine;
               the projection alone is timed beside it (JSON), for comparing with tables that subtracted it;
  nsa graphed  the same captured with torch.cuda.make_graphed_callables, forward and backward (no host or
               launch overhead), its output checked against eager once;
  flash-nsa    its varlen HFNSACore, mean compression, its window branch ours (benchmarks/peers.py;
               `--peers DIR`, the folder holding flash_nsa/).
fwd: a forward with autograd recording (a training step's forward); fwd+bwd: forward and backward.
Medians of triton.testing.do_bench; peak: torch.cuda.max_memory_allocated over one fwd+bwd (graphed:
over its capture, which runs eager warm-ups, and one replay). Kernels against the float32 reference
first. Step: Transformer (byte vocabulary 256, dim 1024, depth 4, 16 q / 4 kv heads of 64), bf16
parameters, AdamW; a step is zero_grad, loss, backward, optimizer step on rows of `tokens` tokens
(ids of tokens + 1); NSA and dense (cuDNN, flash) eager, and both as one CUDA graph of the whole step.
Compile: the first forward+backward of SparseAttention (paper preset, bf16, T 4096) in a fresh process
with empty Triton and Inductor caches. A path that fails (OOM, a refused shape, a failed capture)
records why; the run goes on.

python benchmarks/bench_training.py --peers .peers --out benchmarks/results_training.json
       [--sections compile,attention,step] [--seq-lens 4096,...] [--groups 16,4] [--step-shapes 512x32,...]
python benchmarks/bench_training.py --smoke   # tiny CPU run of the whole script (fp32, no graphs, no compile)
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.peers import flash_nsa_core, import_flash_nsa  # noqa: E402
from nsa_cli.support.checks import randomize_parameters  # noqa: E402
from nsa_cli.support.speed import _step, median_ms  # noqa: E402
from nsa_core import SparseAttention, get_preset  # noqa: E402
from nsa_core.config import NSAConfig  # noqa: E402
from nsa_core.model.transformer import Transformer  # noqa: E402
from nsa_core.ops import Seqs  # noqa: E402
from nsa_core.ops.dispatch import kernel_unavailable_reason  # noqa: E402

SECTIONS = ("compile", "attention", "step")
STEP_MODEL = dict(num_tokens=256, dim=1024, depth=4, dim_head=64, heads=16, kv_heads=4)
SMOKE_STEP_MODEL = dict(num_tokens=256, dim=64, depth=1, dim_head=16, heads=4, kv_heads=2)
SPARSE_ARGS = ("sliding_window_size", "compress_block_size", "compress_block_sliding_stride", "selection_block_size",
               "num_selected_blocks")
COMPILE_LIMIT_S = 20.0

# measuring ------------------------------------------------------------------------------------------------


def time_ms(fn, dev) -> float:
    """Median ms: do_bench on CUDA (10 ms of warm-up, 50 of repeats: the budget of one device run), else
    speed.median_ms's CPU loop."""
    if dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    return median_ms(fn, dev, warmup=1, reps=3)


def peak_gib(fn, dev) -> dict:
    """Peak allocated over one call of fn, and how far it rose above what was allocated before (CUDA)."""
    if dev.type != "cuda":
        return {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_gib": peak / 2**30, "peak_above_start_gib": (peak - before) / 2**30}


class Skipped(Exception):
    """A path that cannot run here (a graph on the CPU, a peer that did not import): its reason is the cell."""


def describe(error: Exception) -> dict:
    """{"skipped": why} or {"error": type and first line} of an exception."""
    if isinstance(error, Skipped):
        return {"skipped": str(error)}
    lines = str(error).strip().splitlines()
    return {"error": f"{type(error).__name__}: {lines[0][:300] if lines else ''}"}


def release(dev) -> None:
    gc.collect()  # a graphed module's forward refers to the module: a cycle
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def attempt(record: dict, key: str, measure, dev) -> None:
    """record[key] = measure() (a dict: merged into record), or record[key + '_error'] = why."""
    try:
        value = measure()
        if isinstance(value, dict):
            record.update(value)
        else:
            record[key] = value
    except Exception as error:  # one path's OOM or refusal is a cell that says why, not the end of the run
        record[f"{key}_error"] = next(iter(describe(error).values()))
    release(dev)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


# attention ------------------------------------------------------------------------------------------------


class AttentionOutput(nn.Module):
    """SparseAttention from (xn, q, k, v) to the attention output (b, n, heads * d), before the output
    projection: attend_projected of a copy whose projection is an identity. A module, so that
    make_graphed_callables graphs the gradients of its parameters too (compression MLP, gates)."""

    def __init__(self, nsa: SparseAttention):
        super().__init__()
        self.nsa = copy.deepcopy(nsa)
        self.nsa.combine_heads = nn.Identity()

    def forward(self, xn, q, k, v):
        return self.nsa.attend_projected(xn, q, k, v)


def kernel_backend(dev, timed: bool = True) -> str:
    """'triton' where kernels run (so a fallback raises instead of timing the reference), else 'torch'.
    Timed modules on the CPU take the reference: Triton's interpreter (as the tests run) takes minutes."""
    return "triton" if kernel_unavailable_reason(dev) is None and (dev.type == "cuda" or not timed) else "torch"


def random_leaves(cfg: NSAConfig, T: int, dev, dt, seed: int) -> list[torch.Tensor]:
    """xn (1, T, dim), q (1, HQ, T, D), k and v (1, HKV, T, D), requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, T, cfg.dim), (1, cfg.heads, T, cfg.dim_head)] + [(1, cfg.num_kv_heads, T, cfg.dim_head)] * 2
    return [torch.randn(shape, generator=gen).to(dev, dt).requires_grad_() for shape in shapes]


def check_kernels(cfg: NSAConfig, T: int, dev, dt) -> dict:
    """Relative errors against the float32 reference path, of the output and the gradients of xn, q, k, v:
    the kernel path in the timed dtype (`*_kernels`) and the reference path in it (`*_reference`, what the
    dtype alone costs). ok: kernels within 2x (output) / 3x (gradients) of the latter, plus 1e-3."""
    torch.manual_seed(0)
    base = AttentionOutput(SparseAttention.from_config(cfg))
    randomize_parameters(base, seed=0, std=0.02)  # the gates' weights start at zero: no gradient to xn
    leaves = random_leaves(cfg, T, torch.device("cpu"), torch.float32, seed=1)
    grad = torch.randn(1, T, cfg.heads * cfg.dim_head, generator=torch.Generator().manual_seed(2))

    def run(dtype, backend):
        module = copy.deepcopy(base).to(dev, dtype)
        module.nsa.config = module.nsa.config.replace(backend=backend)
        inputs = [t.detach().to(dev, dtype).requires_grad_() for t in leaves]
        out = module(*inputs)
        out.backward(grad.to(dev, dtype))
        return [out.detach()] + [t.grad for t in inputs]

    path = kernel_backend(dev, timed=False)
    exact, reference, kernels = run(torch.float32, "torch"), run(dt, "torch"), run(dt, path)
    names = ("out", "dxn", "dq", "dk", "dv")
    result = {"seq_len": T, "kernel_path": path}
    for name, ours, ref, ex in zip(names, kernels, reference, exact):
        result[f"{name}_kernels"], result[f"{name}_reference"] = rel(ours, ex), rel(ref, ex)
    result["ok"] = all(result[f"{n}_kernels"] <= (2 if n == "out" else 3) * result[f"{n}_reference"] + 1e-3
                       for n in names)
    return result


def dense_backends(dev) -> dict:
    """The SDPA backends timed: cuDNN and flash on CUDA; the CPU's own SDPA (None: no context)."""
    if dev.type != "cuda":
        return {"SDPA (CPU)": None}
    from torch.nn.attention import SDPBackend

    return {"cuDNN": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def sdpa_context(backend):
    """sdpa_kernel([backend]) (backend None: no context)."""
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([backend]) if backend is not None else nullcontext()


def sdpa_under(backend, fn):
    """fn run inside sdpa_context(backend)."""
    def run():
        with sdpa_context(backend):
            return fn()
    return run


def graphed_maker(core: AttentionOutput, leaves, dev):
    """The graphed path: capture a copy of core (make_graphed_callables replaces its forward), check one
    replay against eager, and note the peak over the capture and that replay."""
    def make():
        if dev.type != "cuda":
            raise Skipped("needs CUDA")
        module = copy.deepcopy(core)
        eager = module(*leaves).detach()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        graphed = torch.cuda.make_graphed_callables(module, tuple(leaves), allow_unused_input=True)
        out = graphed(*leaves)
        out.backward(torch.ones_like(out) * 1e-3)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        for t in leaves:
            t.grad = None
        notes = {"graph_vs_eager_rel": rel(out, eager), "graph_bitwise_equal": torch.equal(out, eager),
                 "peak_gib": peak / 2**30, "peak_above_start_gib": (peak - before) / 2**30}
        if notes["graph_vs_eager_rel"] > 5e-3:
            raise ValueError(f"graphed output differs from eager: relative error {notes['graph_vs_eager_rel']:.2e}")
        return (lambda: graphed(*leaves)), leaves, notes
    return make


def measure_path(make, dev) -> dict:
    """fwd and fwd+bwd medians and the peak of one path; make() -> (fn, its leaves, notes)."""
    try:
        fn, leaves, record = make()
    except Exception as error:  # the path could not be built or captured: its cell says why
        release(dev)
        return describe(error)
    for key, backward in (("fwd", False), ("fwd_bwd", True)):
        attempt(record, key, lambda backward=backward: time_ms(_step(fn, backward, leaves), dev), dev)
    if "peak_gib" not in record:
        attempt(record, "peak", lambda: peak_gib(_step(fn, True, leaves), dev), dev)
    return record


def attention_row(core: AttentionOutput, out_proj: nn.Linear, cfg: NSAConfig, T: int, dev, dt, flash_nsa) -> dict:
    """Every path at one length; each prints its line as it finishes."""
    leaves = random_leaves(cfg, T, dev, dt, seed=T)
    _, q, k, v = leaves
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=q.shape[1] != k.shape[1])
    makers = {f"dense {name}": (lambda b=backend: (sdpa_under(b, sdpa), [q, k, v], {}))
              for name, backend in dense_backends(dev).items()}

    def peer():
        if isinstance(flash_nsa, str):
            raise Skipped(flash_nsa)
        return (*flash_nsa_core(flash_nsa, cfg, q, k, v, Seqs.batch(T), compression="mean"), {})

    makers["flash-nsa"] = peer
    makers["nsa eager"] = lambda: (lambda: core(*leaves), leaves, {})
    makers["nsa graphed"] = graphed_maker(core, leaves, dev)
    heads_out = torch.randn(1, T, cfg.heads * cfg.dim_head, device=dev, dtype=dt, requires_grad=True)
    makers["output projection alone"] = lambda: (lambda: out_proj(heads_out), [heads_out], {})
    row = {}
    for name, make in makers.items():
        row[name] = measure_path(make, dev)
        print(f"  G={cfg.group_size} T={T} {name}: {json.dumps(row[name])}", flush=True)
    row["ratios"] = attention_ratios(row)
    return row


def attention_ratios(row: dict) -> dict:
    """nsa ms / other ms (below 1: nsa faster), fwd and fwd+bwd, eager and graphed, against the best dense
    backend, flash SDPA and flash-nsa."""
    ratios = {}
    for key in ("fwd", "fwd_bwd"):
        dense = {name: r.get(key) for name, r in row.items() if name.startswith("dense ") and r.get(key)}
        best = min(dense, key=dense.get) if dense else None
        ratios[f"best_dense_{key}"] = best
        others = {"best dense": dense.get(best), "flash SDPA": row.get("dense flash", {}).get(key),
                  "flash-nsa": row.get("flash-nsa", {}).get(key)}
        for nsa in ("nsa eager", "nsa graphed"):
            ours = row.get(nsa, {}).get(key)
            for other, theirs in others.items():
                ratios[f"{nsa} / {other} {key}"] = ours / theirs if ours and theirs else None
    return ratios


def attention_section(args, base: NSAConfig, dev, dt, flash_nsa) -> dict:
    results = {}
    for group in args.groups:
        cfg = base.replace(heads=group * base.num_kv_heads, backend=kernel_backend(dev))
        print(f"attention G={group} ({cfg.heads} q / {cfg.num_kv_heads} kv heads): kernels against the float32 "
              f"reference at T={args.check_len} ...", flush=True)
        check = {}
        attempt(check, "check", lambda: check_kernels(cfg, args.check_len, dev, dt), dev)
        print(f"  correctness ({dt}; relative errors vs float32 reference): {json.dumps(check)}", flush=True)
        torch.manual_seed(0)
        core = AttentionOutput(SparseAttention.from_config(cfg)).to(dev, dt)
        out_proj = nn.Linear(cfg.heads * cfg.dim_head, cfg.dim, bias=False).to(dev, dt)
        rows = {str(T): attention_row(core, out_proj, cfg, T, dev, dt, flash_nsa) for T in args.seq_lens}
        results[str(group)] = {"heads": cfg.heads, "kv_heads": cfg.num_kv_heads, "correctness": check, "rows": rows}
        del core, out_proj
        release(dev)
    return results


# the training step ----------------------------------------------------------------------------------------


def training_step(model: Transformer, opt, ids):
    def step():
        opt.zero_grad(set_to_none=True)
        model(ids, return_loss=True).backward()
        opt.step()
    return step


def graphed_training_step(model: Transformer, opt, ids, context):
    """The whole step as one CUDA graph (PyTorch's whole-network capture): three eager steps on a side
    stream, then forward, backward and optimizer step captured. Returns (replay, the static loss)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), context():
        for _ in range(3):
            training_step(model, opt, ids)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with context(), torch.cuda.graph(graph):
        loss = model(ids, return_loss=True)
        loss.backward()
        opt.step()
    return graph.replay, loss


def measure_step(model_kwargs: dict, sparse: bool, ids, backend, graphed: bool, dev, dt) -> dict:
    """Median ms and peak of one training step: a fresh model and optimizer, SDPA under `backend`."""
    record = {} if sparse else {"sdpa": "default" if backend is None else backend.name}
    if graphed and dev.type != "cuda":
        return {**record, "skipped": "needs CUDA"}
    try:
        torch.manual_seed(0)
        model = Transformer(**model_kwargs, use_sparse_attn=sparse).to(dev, dt)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda", capturable=graphed)
        if graphed:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            replay, loss = graphed_training_step(model, opt, ids, lambda: sdpa_context(backend))
            replay()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            record.update(loss=loss.item(), peak_gib=peak / 2**30, peak_above_start_gib=(peak - before) / 2**30)
            step = replay
        else:
            step = sdpa_under(backend, training_step(model, opt, ids))
    except Exception as error:  # the model did not fit, or its graph could not be captured
        release(dev)
        return {**record, **describe(error)}
    attempt(record, "ms", lambda: time_ms(step, dev), dev)
    if "peak_gib" not in record:
        attempt(record, "peak", lambda: peak_gib(step, dev), dev)
    return record


def step_section(args, base: NSAConfig, dev, dt) -> dict:
    model_kwargs = dict(SMOKE_STEP_MODEL if args.smoke else STEP_MODEL)
    model_kwargs["sparse_attn_kwargs"] = {name: getattr(base, name) for name in SPARSE_ARGS}
    model_kwargs["sparse_attn_kwargs"]["backend"] = kernel_backend(dev)
    rows = {}
    for tokens, batch in args.step_shapes:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model_kwargs["num_tokens"], (batch, tokens + 1), generator=gen).to(dev)
        row = {}

        def run(name, sparse, backend, graphed):
            row[name] = measure_step(model_kwargs, sparse, ids, backend, graphed, dev, dt)
            release(dev)  # the model, its optimizer and graph are gone with measure_step's frame
            print(f"  step {tokens}x{batch} {name}: {json.dumps(row[name])}", flush=True)

        run("nsa eager", True, None, False)
        for name, backend in dense_backends(dev).items():
            run(f"dense {name} eager", False, backend, False)
        ms = lambda name: row.get(name, {}).get("ms")
        dense_eager = {backend: ms(f"dense {name} eager") for name, backend in dense_backends(dev).items()
                       if ms(f"dense {name} eager")}
        run("nsa graphed", True, None, True)
        fastest = min(dense_eager, key=dense_eager.get) if dense_eager else None  # the dense graph runs under it
        run("dense graphed", False, fastest, True)
        row["ratios"] = {"best dense eager / nsa eager": min(dense_eager.values()) / ms("nsa eager")
                         if dense_eager and ms("nsa eager") else None,
                         "dense graphed / nsa graphed": ms("dense graphed") / ms("nsa graphed")
                         if ms("dense graphed") and ms("nsa graphed") else None}
        rows[f"{tokens}x{batch}"] = row
    return {"model": model_kwargs, "rows": rows}


# compile time ---------------------------------------------------------------------------------------------

COMPILE_CHILD = r"""
import json, sys, time
import torch
from nsa_core import SparseAttention, get_preset
preset, seq_len, device = sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3])
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
nsa = SparseAttention.from_config(get_preset(preset)).to(device, dtype)
x = torch.randn(1, seq_len, nsa.config.dim, device=device, dtype=dtype, requires_grad=True)
def call_s():
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = nsa(x)
    out.backward(torch.ones_like(out))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
print(json.dumps({"first_call_s": call_s(), "second_call_s": call_s()}))
"""


def compile_time(preset: str, seq_len: int, device: str, timeout_s: int = 540) -> dict:
    """First and second forward+backward of SparseAttention(preset) in a fresh process whose Triton and
    Inductor caches are new empty folders: what the first call of a new configuration pays."""
    caches = {name: tempfile.mkdtemp(prefix=f"nsa-cold-{name.lower()}-") for name in
              ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, **caches, "PYTHONPATH": path}
    result = {"preset": preset, "seq_len": seq_len, "device": device, "limit_s": COMPILE_LIMIT_S}
    try:
        child = subprocess.run([sys.executable, "-c", COMPILE_CHILD, preset, str(seq_len), device], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=timeout_s)
        if child.returncode != 0:
            tail = child.stderr.strip().splitlines()
            result["error"] = f"exit {child.returncode}: {tail[-1] if tail else ''}"
        else:
            result.update(json.loads(child.stdout.strip().splitlines()[-1]))
            result["within_limit"] = result["first_call_s"] <= COMPILE_LIMIT_S
    except subprocess.TimeoutExpired:
        result["error"] = f"did not finish in {timeout_s} s"
    finally:
        for folder in caches.values():
            shutil.rmtree(folder, ignore_errors=True)
    return result


# output ---------------------------------------------------------------------------------------------------


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cell(record: dict, key: str) -> str:
    """A measured figure, or why there is none (details in the progress lines and the JSON)."""
    if record.get(key) is not None:
        return fmt(record[key])
    if "skipped" in record:
        return "skipped"
    if "error" in record or f"{key}_error" in record:
        return "failed"
    return "-"


def pair(record: dict, a: str = "fwd", b: str = "fwd_bwd") -> str:
    return f"{cell(record, a)} / {cell(record, b)}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_tables(results: dict) -> None:
    notes = "\n".join(f"- {n}" for n in results["notes"])
    print(f"\n## Training speed: {results['device']}, torch {results['torch']}, triton {results['triton']}, "
          f"{results['dtype']}, flash-nsa {results['flash_nsa']}\n{notes}")
    nsas, others = ("nsa eager", "nsa graphed"), ("best dense", "flash SDPA", "flash-nsa")
    for group, section in results.get("attention", {}).items():
        rows, heads = section["rows"], f"G = {group} ({section['heads']} q / {section['kv_heads']} kv heads)"
        paths = [p for p in next(iter(rows.values()), {}) if p not in ("ratios", "output projection alone")]
        print_table(f"### Attention, {heads}: ms, fwd / fwd+bwd", ["T"] + paths,
                    [[T] + [pair(row[p]) for p in paths] for T, row in rows.items()])

        def best(r: dict) -> str:
            names = {str(r[f"best_dense_{key}"]).removeprefix("dense ") for key in ("fwd", "fwd_bwd")}
            return " / ".join(sorted(names))

        print_table(f"nsa ms / other ms, fwd / fwd+bwd (below 1: nsa faster), {heads}",
                    ["T", "best dense"] + [f"{n.split()[1]} / {o}" for n in nsas for o in others],
                    [[T, best(row["ratios"])] + [pair(row["ratios"], f"{n} / {o} fwd", f"{n} / {o} fwd_bwd")
                                                 for n in nsas for o in others] for T, row in rows.items()])
        print_table(f"peak GiB of one fwd+bwd (graphed: over its capture and a replay), {heads}", ["T"] + paths,
                    [[T] + [cell(row[p], "peak_gib") for p in paths] for T, row in rows.items()])
        print(f"correctness, relative errors vs the float32 reference: {json.dumps(section['correctness'])}")
    if "step" in results:
        rows = results["step"]["rows"]
        paths = [p for p in next(iter(rows.values()), {}) if p != "ratios"]
        print_table("### Training step (zero_grad, loss, backward, AdamW step): ms (peak GiB)",
                    ["tokens x batch"] + paths + ["best dense / nsa, eager", "dense / nsa, graphed"],
                    [[shape] + [f"{cell(row[p], 'ms')} ({cell(row[p], 'peak_gib')})" for p in paths]
                     + [fmt(row["ratios"]["best dense eager / nsa eager"]),
                        fmt(row["ratios"]["dense graphed / nsa graphed"])] for shape, row in rows.items()])
    if "compile" in results:
        c = results["compile"]
        print("\n### Compile time: first forward+backward in a fresh process, empty Triton and Inductor caches")
        if "skipped" in c or "error" in c:
            print(c.get("skipped") or c.get("error"))
        else:
            print(f"preset {c['preset']}, T {c['seq_len']}: first call {c['first_call_s']:.1f} s (limit "
                  f"{c['limit_s']:.0f} s: {'met' if c['within_limit'] else 'NOT met'}), second call "
                  f"{c['second_call_s']:.3f} s")


def shape_pair(text: str) -> tuple[int, int]:
    tokens, _, batch = text.partition("x")
    if not (tokens.isdigit() and batch.isdigit()) or int(tokens) < 2 or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"a step shape is TOKENSxBATCH (e.g. 512x32), got {text!r}")
    return int(tokens), int(batch)


def int_list(text: str) -> list[int]:
    if not all(part.strip().isdigit() and int(part) > 0 for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected positive ints separated by commas, got {text!r}")
    return [int(part) for part in text.split(",")]


def name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"sections are among {', '.join(SECTIONS)}; got {', '.join(unknown)}")
    return names


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", type=name_list, default=list(SECTIONS), help=f"among {','.join(SECTIONS)}")
    ap.add_argument("--seq-lens", type=int_list, default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--groups", type=int_list, default=[16, 4], help="query heads per kv head (4 kv heads)")
    ap.add_argument("--check-len", type=int, default=1024, help="length of the kernels-vs-reference check")
    ap.add_argument("--step-shapes", type=lambda s: [shape_pair(p) for p in s.split(",")],
                    default=[(512, 32), (2048, 8), (8192, 2), (32768, 1)], help="TOKENSxBATCH,...")
    ap.add_argument("--compile-time", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the cold compile time (a subprocess)")
    ap.add_argument("--peers", default=None, help="folder holding flash_nsa/ (put on sys.path)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (after every section)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: preset tiny, fp32, T 128, steps 64x2")
    args = ap.parse_args(argv)
    if args.check_len < 1:
        ap.error(f"--check-len must be a positive int, got {args.check_len}")
    if args.smoke:
        dev, dt, base = torch.device("cpu"), torch.float32, get_preset("tiny")
        args.seq_lens, args.groups, args.check_len, args.step_shapes = [128], [2], 64, [(64, 2)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device here (--smoke runs a tiny CPU version)")
        dev, dt, base = torch.device("cuda"), torch.bfloat16, get_preset("paper")
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "absent"
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{device_name}, torch {torch.__version__}, triton {triton_version}, {dt}", flush=True)
    flash_nsa = import_flash_nsa(args.peers) if dev.type == "cuda" else "needs CUDA"
    results = {"device": device_name, "torch": torch.__version__, "triton": triton_version, "dtype": str(dt),
               "smoke": args.smoke, "config": base.to_dict(),
               "flash_nsa": "timed (mean compression, window: ours)" if not isinstance(flash_nsa, str)
               else f"not run: {flash_nsa}",
               "notes": ["fwd: forward with autograd recording; fwd+bwd: forward and backward; medians (ms)",
                         "attention: q, k, v -> output, no output projection; nsa: attend_projected with an "
                         "identity for its projection (compression MLP and gate linear inside; the projection "
                         "alone: 'output projection alone' in the JSON)",
                         "nsa graphed: torch.cuda.make_graphed_callables (forward and backward)",
                         "flash-nsa: HFNSACore varlen, mean compression, its window branch replaced by ours",
                         "step: ids of tokens + 1 per row (the model sees `tokens`); AdamW lr 1e-4"]}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")

    for section in (s for s in SECTIONS if s in args.sections):
        if section == "compile":
            if not args.compile_time or dev.type != "cuda":
                reason = "skipped: needs CUDA" if dev.type != "cuda" else "skipped: --no-compile-time"
                print(f"compile time: {reason}", flush=True)
                results["compile"] = {"skipped": reason}
                continue
            print("compile time: a fresh process with empty caches ...", flush=True)
            results["compile"] = compile_time("paper", 4096, "cuda")
            print(f"  {json.dumps(results['compile'])}", flush=True)
        elif section == "attention":
            results["attention"] = attention_section(args, base, dev, dt, flash_nsa)
        else:
            print("training step ...", flush=True)
            results["step"] = step_section(args, base, dev, dt)
        save()
    print_tables(results)
    save()
    return results


if __name__ == "__main__":
    main()
