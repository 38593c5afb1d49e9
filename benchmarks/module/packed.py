"""Packed documents on the GPU: one row of 64k tokens packed from documents of 1k-16k tokens
(fixed seed), the paper preset (64 query / 4 kv heads, d 128, compression 32/16, 16 blocks of 64,
window 512), bf16, causal. Forward and forward+backward of:
  (a) NSA attention on the packed row in one call (everything after the q/k/v projections, as
      `nsa bench`'s attention mode: compression MLP, the three branches, scoring and top-k, gates,
      combine, output projection);
  (b) the same, one call per document (the sum);
  (c) dense attention over the same documents, each followed by the same output projection: SDPA per
      document on cuDNN and on flash (sums), and one FlexAttention call with a causal document mask
      (compiled; nsa_core.ops.document_attention);
  (d) flash-nsa's varlen path (HFNSACore, linear compression, its window branch replaced by ours since
      the device has no flash-attn) when it can be imported (`--peers DIR`: the folder holding
      `flash_nsa/`); it has no output projection, so it is compared with (a) minus NSA's projections.
Correctness first: packed against per-document outputs and input gradients on a small shape, in the
timed dtype (a float32 check compiled every kernel a second time, and with FlexAttention's compile
it did not finish in 9 minutes on an H200 with a cold cache; --skip-check leaves it out).
Medians of triton.testing.do_bench on CUDA (benchmarks/timing.py); the first call of each path
(FlexAttention compiles there) is timed on its own.

python -m benchmarks.module.packed [--seq-len 65536] [--min-doc 1024] [--max-doc 16384] [--seed 0]
                                   [--peers DIR] [--out benchmarks/results/module/packed.json]
python -m benchmarks.module.packed --smoke     # a tiny CPU run of the whole script (preset tiny, fp32)
flash-nsa on the device: copy /work/shared/peers/flash_nsa into a git-ignored folder of the checkout
(e.g. .peers/flash_nsa), carry it, and pass --peers .peers (see the peers' README).
"""

from __future__ import annotations

import argparse
import json
import random
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from benchmarks.module.peers import flash_nsa_core, import_flash_nsa
from benchmarks.timing import first_call_s, median_ms, with_backward
from nsa_core import SparseAttention, get_preset
from nsa_core.ops import Seqs, document_attention


def document_lengths(total: int, shortest: int, longest: int, seed: int) -> list[int]:
    """Lengths drawn uniformly from [shortest, longest] until they fill `total` (the last one cut)."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(shortest, longest), total - sum(lengths)))
    return lengths


def cumulative(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def projected(nsa: SparseAttention, T: int, dev, dt, grad: bool, seed: int = 0):
    """Leaves xn (1, T, dim), q (1, HQ, T, D), k, v (1, HKV, T, D) from one random row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, nsa.config.dim, generator=gen).to(dev, dt)
    with torch.no_grad():
        xn = nsa.norm(x)
        q, k, v = (t.contiguous() for t in nsa.project(xn))
    return [t.detach().requires_grad_(grad) for t in (xn, q, k, v)]


def nsa_paths(nsa, leaves, spans, seqs):
    """(a) one packed call, (b) one call per document: functions returning outputs, and their leaves."""
    xn, q, k, v = leaves
    docs = [[t[:, s:e] if i == 0 else t[:, :, s:e] for i, t in enumerate(leaves)] for s, e in spans]
    docs = [[t.detach().contiguous().requires_grad_(xn.requires_grad) for t in d] for d in docs]
    packed = lambda: nsa.attend_projected(xn, q, k, v, seqs)
    per_doc = lambda: [nsa.attend_projected(*d) for d in docs]
    return (packed, leaves), (per_doc, [t for d in docs for t in d])


def dense_paths(nsa, leaves, spans, seqs, causal):
    """(c) dense attention + NSA's output projection: SDPA per document under each backend, FlexAttention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, q, k, v = leaves
    out_proj = lambda o: nsa.combine_heads(o.transpose(1, 2).flatten(-2))

    def per_doc(backend):
        def run():
            with sdpa_kernel([backend]) if backend is not None else nullcontext():
                return [out_proj(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                                is_causal=causal, enable_gqa=True)) for s, e in spans]
        return run

    if q.is_cuda:
        paths = {"dense cuDNN SDPA per document": per_doc(SDPBackend.CUDNN_ATTENTION),
                 "dense flash SDPA per document": per_doc(SDPBackend.FLASH_ATTENTION)}
        flex = lambda: out_proj(document_attention(q, k, v, causal=causal, seqs=seqs, backend="triton"))
    else:  # the CPU has one SDPA (math) and FlexAttention forward only, eagerly
        from nsa_core.kernels.document_flex import document_attention_flex

        paths = {"dense SDPA per document": per_doc(None)}
        flex = lambda: out_proj(document_attention_flex(q, k, v, seqs.cu_seqlens, causal, q.shape[-1] ** -0.5))
    paths["dense FlexAttention document mask"] = flex
    return {name: (fn, [q, k, v]) for name, fn in paths.items()}


def timed(fn, leaves, backward: bool, dev) -> tuple[float, float]:
    """(first call s, median ms) of fn (its outputs summed into the backward when asked)."""
    def once():
        out = fn()
        return torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out

    step = with_backward(once, backward, leaves)
    return first_call_s(step, dev), median_ms(step, dev)


def check_correctness(cfg, dev, dt, lengths) -> dict:
    """Packed against per-document: outputs and input gradients of NSA attention, outputs of the
    FlexAttention document mask against SDPA per document."""
    torch.manual_seed(0)
    nsa = SparseAttention.from_config(cfg).to(dev, dt)
    leaves = projected(nsa, sum(lengths), dev, dt, grad=True, seed=1)
    cu = cumulative(lengths, dev)
    spans = [(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
    seqs = Seqs.packed(cu, sum(lengths), device=dev)
    (packed, packed_leaves), (per_doc, doc_leaves) = nsa_paths(nsa, leaves, spans, seqs)
    out_packed, out_docs = packed(), torch.cat(per_doc(), dim=1)
    grad = torch.randn_like(out_packed)
    out_packed.backward(grad)
    torch.cat([o.flatten() for o in per_doc()]).backward(grad.flatten())
    result = {"nsa_out": rel(out_packed, out_docs)}
    for i, name in enumerate(("dxn", "dq", "dk", "dv")):
        parts = [doc_leaves[4 * j + i].grad for j in range(len(spans))]
        result[f"nsa_{name}"] = rel(packed_leaves[i].grad, torch.cat(parts, dim=1 if i == 0 else 2))
    with torch.no_grad():
        flex = dense_paths(nsa, leaves, spans, seqs, cfg.causal)["dense FlexAttention document mask"][0]()
        q, k, v = leaves[1:]
        sdpa = document_attention(q, k, v, causal=cfg.causal, seqs=seqs, backend="torch")  # SDPA per document
    result["dense_flex_out"] = rel(flex, nsa.combine_heads(sdpa.transpose(1, 2).flatten(-2)))
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--min-doc", type=int, default=1024)
    ap.add_argument("--max-doc", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", default=None, help="folder holding flash_nsa/ (imported from there)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--skip-check", action=argparse.BooleanOptionalAction, default=False,
                    help="no correctness check before timing")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="tiny CPU run: preset tiny, fp32, a 128-token row")
    args = ap.parse_args(argv)
    if args.smoke:
        dev, dt, cfg = torch.device("cpu"), torch.float32, get_preset("tiny")
        args.seq_len, args.min_doc, args.max_doc = 128, 5, 48
        check_lengths = [40, 1, 0, 23, 7]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device here (--smoke runs a tiny CPU version)")
        dev, dt, cfg = torch.device("cuda"), torch.bfloat16, get_preset("paper")
        check_lengths = [700, 1, 0, 1500, 77, 300, 5]
    if not 1 <= args.min_doc <= args.max_doc or args.seq_len < 1:
        raise SystemExit("error: need 1 <= --min-doc <= --max-doc and --seq-len >= 1")
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{device_name} torch {torch.__version__}", flush=True)
    small = cfg if args.smoke else cfg.replace(dim=512, heads=16, kv_heads=4)
    correctness = {}
    if not args.skip_check:
        print(f"checking packed against per-document calls at {check_lengths} ...", flush=True)
        correctness = check_correctness(small, dev, dt, check_lengths)
        print(f"correctness, packed vs per document (relative errors, {dt}):", json.dumps(correctness), flush=True)
        if max(correctness.values()) > 5e-2:
            raise SystemExit("error: packed documents do not match per-document calls")

    lengths = document_lengths(args.seq_len, args.min_doc, args.max_doc, args.seed)
    cu = cumulative(lengths, dev)
    seqs = Seqs.packed(cu, args.seq_len, device=dev)
    spans = [(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
    print(f"{len(lengths)} documents: {lengths}", flush=True)
    torch.manual_seed(0)
    nsa = SparseAttention.from_config(cfg).to(dev, dt)
    flash_nsa = import_flash_nsa(args.peers) if dev.type == "cuda" else "needs CUDA"
    rows = {}
    for backward in (False, True):
        leaves = projected(nsa, args.seq_len, dev, dt, grad=backward)
        (packed, packed_leaves), (per_doc, doc_leaves) = nsa_paths(nsa, leaves, spans, seqs)
        xn = leaves[0]
        o = torch.randn(1, args.seq_len, cfg.heads * cfg.dim_head, device=dev, dtype=dt, requires_grad=backward)
        paths = {"NSA packed (one call)": (packed, packed_leaves), "NSA per-document calls (sum)": (per_doc, doc_leaves),
                 "NSA projections (gates, output)": (lambda: nsa.combine_heads(o) + nsa.to_strategy_combine(xn).sum(),
                                                     [xn, o])}
        paths.update(dense_paths(nsa, leaves, spans, seqs, cfg.causal))
        if not isinstance(flash_nsa, str):
            paths["flash-nsa varlen (window: ours)"] = flash_nsa_core(flash_nsa, cfg, *leaves[1:], seqs)
        for name, (fn, fn_leaves) in paths.items():
            key = "fwd_bwd" if backward else "fwd"
            if backward and dev.type == "cpu" and "Flex" in name:
                rows.setdefault(name, {})[key] = None  # FlexAttention has no CPU backward
                continue
            try:
                first_s, ms = timed(fn, fn_leaves, backward, dev)
                rows.setdefault(name, {}).update({key: ms, f"{key}_first_call_s": first_s})
            except (RuntimeError, ValueError) as error:  # a backend that does not take these shapes
                rows.setdefault(name, {}).update({key: None, f"{key}_error": str(error).splitlines()[0][:200]})
            print(name, key, rows[name], flush=True)
    results = {"device": device_name, "torch": torch.__version__, "dtype": str(dt), "seq_len": args.seq_len,
               "documents": lengths, "seed": args.seed, "correctness": correctness, "rows": rows,
               "flash_nsa": "timed" if not isinstance(flash_nsa, str) else f"not run: {flash_nsa}"}
    results["ratios"] = ratios(rows)
    print_table(rows, results["ratios"], results["flash_nsa"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def ratios(rows: dict) -> dict:
    """packed / per-document sum, best dense / packed, flash-nsa / (packed minus NSA's projections)."""
    out = {}
    for key in ("fwd", "fwd_bwd"):
        get = lambda name: rows.get(name, {}).get(key)
        packed, per_doc, proj = get("NSA packed (one call)"), get("NSA per-document calls (sum)"), \
            get("NSA projections (gates, output)")
        dense = [get(n) for n in rows if n.startswith("dense") and get(n) is not None]
        flash = get("flash-nsa varlen (window: ours)")
        out[key] = {"packed_over_per_doc": packed / per_doc if packed and per_doc else None,
                    "dense_best_over_packed": min(dense) / packed if packed and dense else None,
                    "flash_nsa_over_packed_core": flash / (packed - proj) if packed and proj and flash else None}
    return out


def print_table(rows: dict, ratio: dict, flash_note: str) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print("\n| path | fwd ms | fwd+bwd ms |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {fmt(row.get('fwd'))} | {fmt(row.get('fwd_bwd'))} |")
    for label, key in (("packed / per-document sum", "packed_over_per_doc"),
                       ("dense best / packed", "dense_best_over_packed"),
                       ("flash-nsa / packed minus projections", "flash_nsa_over_packed_core")):
        print(f"{label}: fwd {fmt(ratio['fwd'][key])}, fwd+bwd {fmt(ratio['fwd_bwd'][key])}")
    print(f"flash-nsa: {flash_note}")


if __name__ == "__main__":
    main()
