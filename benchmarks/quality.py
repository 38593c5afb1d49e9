"""Evidence that NSA learns (issue 16): four byte-level language models that differ only in their
attention -- nsa, dense, window (NSA's window branch alone), no_selection (NSA without its
selected branch) -- trained with the same data, optimizer, schedule, seed and tokens on the
Python standard library's sources, then fine-tuned briefly and evaluated on passkey retrieval.

Writes DIR/results_quality.json ({"settings", "runs", "retrieval", "environment"}) and, with
matplotlib (the `plot` extra), DIR/results_quality.png; prints a summary table.

    python -m benchmarks.quality --smoke --out /tmp/quality   # tiny, CPU: 30-60 s on 2 cores
    python -m benchmarks.quality --out benchmarks             # one GPU: sized for ~8 minutes on an H100
                                                              # (an estimate from the kernel benchmarks)

Each model's record in "runs" also holds its train loss per step, tokens, tokens/s (training
steps only, synchronized), compile time, peak memory, and for the NSA models the mean gate of
each branch per layer after language modelling and after the passkey fine-tune (on a text row
and on a passkey sample): the first place to look when NSA falls short.

Models: see quality_models.py. Data: quality_data.py. Training and timing: quality_training.py.
Passkey: quality_passkey.py. Settings and presets: quality_settings.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from benchmarks import devices
from benchmarks.quality_data import load_stdlib_corpus, passkey_batch
from benchmarks.quality_models import branch_gate_means, build_language_model, parameter_counts
from benchmarks.quality_passkey import evaluate_passkey, train_passkey
from benchmarks.quality_report import JSON_NAME, environment, plot, print_summary, write_json
from benchmarks.quality_settings import FULL, SMOKE, QualitySettings, with_overrides
from benchmarks.quality_training import autocast, train_language_model

console = Console(width=None if sys.stdout.isatty() else 150)  # a pipe or a CI log: room for the table


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for the JSON and the PNG (created)")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="tiny models on the CPU (the CI run)")
    ap.add_argument("--models", help="comma-separated subset of nsa,dense,window,no_selection")
    ap.add_argument("--steps", type=int, help="language-model training steps per model")
    ap.add_argument("--batch-size", type=int, help="rows per language-model step")
    ap.add_argument("--context", type=int, help="language-model row length in bytes")
    ap.add_argument("--eval-every", type=int, help="validate every this many steps")
    ap.add_argument("--time-budget-s", type=float,
                    help="stop a model's LM training after this many seconds (0: no limit)")
    ap.add_argument("--retrieval-steps", type=int, help="passkey fine-tuning steps per model (0: evaluate only)")
    ap.add_argument("--retrieval-lengths", help="comma-separated passkey lengths in bytes, e.g. 4096,8192")
    ap.add_argument("--retrieval-tokens-per-step", type=int, help="bytes per passkey step (samples = this // length)")
    ap.add_argument("--retrieval-samples-per-bucket", type=int, help="evaluation samples per length and depth bucket")
    ap.add_argument("--answer-only-loss", action=argparse.BooleanOptionalAction, default=False,
                    help="passkey loss on the answer only (default: "
                    "also on the needle's repetition of the key)")
    ap.add_argument("--retrieval-time-budget-s", type=float,
                    help="stop passkey fine-tuning after this many seconds (0: no limit)")
    ap.add_argument("--dim", type=int, help="model width")
    ap.add_argument("--depth", type=int, help="number of layers")
    ap.add_argument("--lr", type=float, help="peak learning rate of the language-model training")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--cpu-threads", type=int, help="torch CPU threads (smoke default: 1)")
    ap.add_argument("--device", help="auto (cuda when available), cpu, cuda or cuda:N")
    ap.add_argument("--precision", help="auto (bf16 autocast on cuda, fp32 on cpu), bf16 or fp32")
    ap.add_argument("--backend", help="NSA ops' backend: auto, torch or triton")
    return ap.parse_args(argv)


def _int_list(name: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None


def settings_from_arguments(args: argparse.Namespace) -> QualitySettings:
    names = ("steps", "batch_size", "context", "eval_every", "retrieval_steps", "retrieval_tokens_per_step",
             "retrieval_samples_per_bucket", "dim", "depth", "lr", "seed",
             "device", "precision", "backend", "cpu_threads", "time_budget_s", "retrieval_time_budget_s")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    for name in ("time_budget_s", "retrieval_time_budget_s"):
        if overrides.get(name) == 0:
            overrides[name] = None
    if args.answer_only_loss:
        overrides["retrieval_supervise_repeat"] = False
    if args.models is not None:
        overrides["models"] = tuple(args.models.split(","))
    if args.retrieval_lengths is not None:
        overrides["retrieval_lengths"] = _int_list("retrieval_lengths", args.retrieval_lengths)
    return with_overrides(SMOKE if args.smoke else FULL, **overrides)


def resolve_device(s: QualitySettings) -> tuple[torch.device, str]:
    return devices.resolve_device(s.device, s.precision)


def log(message: str) -> None:
    console.print(f"  {message}", highlight=False)


def run_one_model(variant: str, s: QualitySettings, corpus, device: torch.device, precision: str) -> tuple[dict, dict]:
    """Train, fine-tune on passkey and evaluate one variant -> (run record, retrieval record)."""
    model = build_language_model(variant, s.shape, s.seed, s.backend).to(device)
    record = parameter_counts(model)
    console.print(f"[bold]{variant}[/bold]: {record['params']:,} parameters "
                  f"({record['attention_params']:,} in attention)", highlight=False)
    record.update(train_language_model(model, corpus, s, device, precision, log))
    log(f"{record['tokens']:,} tokens in {record['train_seconds']} s: {record['tokens_per_s']:,.0f} tokens/s")
    text_probe = corpus.val[: s.context].long()[None]
    passkey_probe = passkey_batch(s.retrieval_lengths[-1], [0.5], s.key_digits, random.Random(s.seed))[0]
    with autocast(device, precision):
        record["branch_gates_after_lm"] = branch_gate_means(model, text_probe.to(device))
    record["retrieval_training"] = train_passkey(model, s, device, precision, log)
    with autocast(device, precision):
        record["branch_gates_after_passkey"] = branch_gate_means(model, passkey_probe.to(device))
    retrieval = evaluate_passkey(model, s, device, precision)
    log("passkey accuracy " + ", ".join(f"{n}: {r['accuracy']:.2f}" for n, r in retrieval.items()))
    return record, retrieval


def run_comparison(s: QualitySettings, out: Path) -> dict:
    device, precision = resolve_device(s)
    if s.cpu_threads is not None:
        torch.set_num_threads(s.cpu_threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    corpus = load_stdlib_corpus(s.val_fraction)
    results = {
        "settings": {**s.to_dict(), "tokens_per_step": s.tokens_per_step, "planned_tokens": s.steps * s.tokens_per_step,
                     "loss_unit": "bits per byte", "corpus": corpus.description},
        "runs": {}, "retrieval": {}, "environment": environment(device, precision),
    }
    console.print(f"corpus: {corpus.description['train_bytes']:,} train / {corpus.description['val_bytes']:,} "
                  f"validation bytes; device {results['environment']['device']} ({precision})", highlight=False)
    for variant in s.models:
        results["runs"][variant], results["retrieval"][variant] = run_one_model(variant, s, corpus, device, precision)
        write_json(results, out)  # after every model: a later failure keeps what is done
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        settings = settings_from_arguments(args)
        resolve_device(settings)
    except ValueError as err:
        console.print(f"error: {err}", highlight=False, soft_wrap=True)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_comparison(settings, args.out)
    print_summary(results, console)
    picture = plot(results, args.out)
    if picture is None:
        console.print("matplotlib is not installed (pip install 'nsa[plot]'): no PNG written")
    console.print(f"wrote {args.out / JSON_NAME}" + (f" and {picture}" if picture else "")
                  + f" in {time.perf_counter() - start:.0f} s", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
