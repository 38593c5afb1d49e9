"""The training-speed benchmark's attention section: NSA attention (q, k, v -> the attention output,
no output projection) eager and CUDA-graphed, against SDPA under cuDNN and flash and the peer
flash-nsa, at each length and query group; the kernels checked against the float32 reference first."""

from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.module.peers import flash_nsa_core
from benchmarks.module.training_paths import (
    Skipped, attempt, dense_backends, describe, kernel_backend, peak_record, rel, release, sdpa_under, time_ms,
)
from benchmarks.timing import with_backward
from nsa_cli.support.checks import randomize_parameters
from nsa_core import SparseAttention
from nsa_core.config import NSAConfig
from nsa_core.ops import Seqs


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
        attempt(record, key, lambda backward=backward: time_ms(with_backward(fn, backward, leaves), dev), dev)
    if "peak_gib" not in record:
        attempt(record, "peak", lambda: peak_record(with_backward(fn, True, leaves), dev), dev)
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
