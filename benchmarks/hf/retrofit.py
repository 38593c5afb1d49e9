"""Retrofit measured: a small dense Llama trained here, converted into NSA
(nsa_core.hf.convert_dense), then trained on; its validation loss against the dense original's.

Data: the byte corpus of the quality comparison (the standard library's sources,
benchmarks/quality_data.py), bytes as tokens. Steps:
1. a byte-level LlamaForCausalLM (random init) trained for `--dense-steps` steps on rows of
   `--context` bytes;
2. saved with save_pretrained and converted (window `--window`, so that a row is longer than the
   window: past it the sparse branches take over from the dense attention);
3. validation loss of the dense model, of the converted one as converted (on rows no longer than
   window + 1 both are equal: reported too), and of both after `--continue-steps` more steps each on
   the same batches (AdamW, same learning rate).

    python -m benchmarks.hf.retrofit [--dense-steps 300] [--continue-steps 150] [--out FILE]
    python -m benchmarks.hf.retrofit --smoke     # seconds: a few steps of a tinier model

Writes benchmarks/results/hf/retrofit.json by default (a --smoke run only where --out says).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.quality_data import evenly_spaced_rows, load_stdlib_corpus, random_rows

RESULTS = Path(__file__).resolve().parents[1] / "results" / "hf" / "retrofit.json"


def dense_llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64),
                         head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def train(model, stream, steps: int, batch: int, context: int, lr: float, seed: int, what: str = "") -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        rows = random_rows(stream, batch, context, g)
        loss = model(rows, labels=rows).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            sys.stderr.write(f"{what} step {len(losses)}/{steps}: loss {loss.item():.3f}\n")
    return losses


@torch.no_grad()
def val_loss(model, rows: torch.Tensor) -> float:
    model.eval()
    return sum(model(r[None], labels=r[None]).loss.item() for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> dict:
    import nsa_core.hf  # noqa: F401  (registers the model type)
    from nsa_core.hf import dense_to_nsa

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense-steps", type=int, default=300)
    p.add_argument("--continue-steps", type=int, default=150)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-rows", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False)
    args = p.parse_args(argv)
    if args.smoke:
        args.dense_steps, args.continue_steps, args.hidden, args.layers, args.val_rows = 3, 2, 64, 2, 4
        args.context, args.window, args.batch = 48, 16, 4
    torch.manual_seed(0)
    corpus = load_stdlib_corpus(0.05)
    val = evenly_spaced_rows(corpus.val, args.val_rows, args.context)
    start = time.time()
    dense = dense_llama(args.hidden, args.layers)
    dense_curve = train(dense, corpus.train, args.dense_steps, args.batch, args.context, args.lr, seed=1, what="dense")
    nsa_options = dict(sliding_window_size=args.window, compress_block_size=16, compress_block_sliding_stride=8,
                       selection_block_size=16, num_selected_blocks=2)
    with tempfile.TemporaryDirectory() as folder:
        dense.save_pretrained(folder)
        nsa = dense_to_nsa(folder, **nsa_options)
    short = val[:, : args.window + 1]
    result = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "nsa": nsa_options,
        "dense_train_loss_last10": sum(dense_curve[-10:]) / 10 if len(dense_curve) >= 10 else dense_curve[-1],
        "within_window": {"dense": val_loss(dense, short), "converted": val_loss(nsa, short)},
        "before": {"dense": val_loss(dense, val), "converted": val_loss(nsa, val)},
    }
    train(dense, corpus.train, args.continue_steps, args.batch, args.context, args.lr, seed=2, what="dense, continued")
    train(nsa, corpus.train, args.continue_steps, args.batch, args.context, args.lr, seed=2, what="converted, continued")
    result["after"] = {"dense": val_loss(dense, val), "converted": val_loss(nsa, val)}
    gates = torch.stack([layer.self_attn.to_strategy_combine[0].bias.detach().view(-1, 3).mean(0)
                         for layer in nsa.model.layers])
    result["converted_gate_bias_after"] = {"compressed": gates[:, 0].tolist(), "selected": gates[:, 1].tolist(),
                                           "window": gates[:, 2].tolist()}
    result["seconds"] = time.time() - start
    if not args.smoke or args.out != p.get_default("out"):
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=2)
