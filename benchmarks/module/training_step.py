"""The training-speed benchmark's step section: one Transformer training step (zero_grad, loss, backward,
AdamW step) with NSA and with dense attention (cuDNN, flash), eager and as one CUDA graph of the
whole step, at each tokens x batch shape."""

from __future__ import annotations

import json

import torch

from benchmarks.module.training_paths import (
    attempt, dense_backends, describe, kernel_backend, peak_record, release, sdpa_context, sdpa_under, time_ms,
)
from nsa_core.config import NSAConfig
from nsa_core.model.transformer import Transformer

STEP_MODEL = dict(num_tokens=256, dim=1024, depth=4, dim_head=64, heads=16, kv_heads=4)
SMOKE_STEP_MODEL = dict(num_tokens=256, dim=64, depth=1, dim_head=16, heads=4, kv_heads=2)
SPARSE_ARGS = ("sliding_window_size", "compress_block_size", "compress_block_sliding_stride", "selection_block_size",
               "num_selected_blocks")


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
        attempt(record, "peak", lambda: peak_record(step, dev), dev)
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
