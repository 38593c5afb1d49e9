"""The training-speed table in one GPU run: NSA attention at 4k-64k against SDPA and the
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
  flash-nsa    its varlen HFNSACore, mean compression, its window branch ours (benchmarks/module/peers.py;
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

The sections: training_attention.py, training_step.py, cold_compile.py; the tables: training_tables.py.

python -m benchmarks.module.training --peers .peers --out benchmarks/results/module/training.json
       [--sections compile,attention,step] [--seq-lens 4096,...] [--groups 16,4] [--step-shapes 512x32,...]
python -m benchmarks.module.training --smoke   # tiny CPU run of the whole script (fp32, no graphs, no compile)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import torch

from benchmarks.module.cold_compile import compile_time
from benchmarks.module.peers import import_flash_nsa
from benchmarks.module.training_attention import attention_section
from benchmarks.module.training_step import step_section
from benchmarks.module.training_tables import print_tables
from nsa_core import get_preset

SECTIONS = ("compile", "attention", "step")


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
    ap.add_argument("--peers", default=None, help="folder holding flash_nsa/ (imported from there)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (after every section)")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="tiny CPU run: preset tiny, fp32, T 128, steps 64x2")
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
            results["compile_precompiled"] = compile_time("paper", 4096, "cuda", precompiled=True)
            print(f"  precompiled: {json.dumps(results['compile_precompiled'])}", flush=True)
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
