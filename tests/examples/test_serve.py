"""examples/serve.py's engine on CPU, float64 random weights: five requests of different prompt and
output lengths over two slots (waiting, joining, leaving; prompts prefilled in chunks) get exactly the
tokens Transformer.generate gives each alone; every page goes back to the pool; a pool too small for
a request is refused naming its size; the script runs and checks itself."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("serve_example", ROOT / "examples" / "serve.py")
serve = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = serve  # dataclasses look their module up
spec.loader.exec_module(serve)

SHAPES = [(9, 6), (3, 2), (17, 9), (1, 4), (12, 1)]  # (prompt tokens, new tokens)


def requests(vocab: int) -> list:
    g = torch.Generator().manual_seed(7)
    return [serve.Request(torch.randint(0, vocab, (n,), generator=g), m) for n, m in SHAPES]


def test_engine_equals_generate_alone():
    """40 pages: the slots limit admission (prompts prefilled in chunks of 4); 6 pages (5 usable): the
    pool does, the 26-token request waits for pages with a slot free, so requests share fewer rounds."""
    model = serve.tiny_model(dtype=torch.float64)
    reqs = requests(model.to_logits.out_features)
    alone = [model.generate(r.prompt[None], r.max_new_tokens, temperature=0)[0].tolist() for r in reqs]
    rounds = {}
    for num_pages, prefill_chunk in ((40, 4), (6, None)):
        engine = serve.Engine(model, slots=2, max_seq_len=32, num_pages=num_pages, prefill_chunk=prefill_chunk)
        outputs = engine.serve(requests(model.to_logits.out_features))
        assert outputs == alone
        cache = engine.cache
        assert cache.token_pool.used_pages == 0 and cache.token_pool.free_pages == num_pages - 1
        assert cache.compressed_pool.used_pages == 0 and cache.free_slots == [0, 1]
        rounds[num_pages] = engine.steps
    one_at_a_time = sum(m - 1 for _, m in SHAPES)  # a round per token after the first
    assert rounds[40] < rounds[6] < one_at_a_time, rounds


def test_pool_too_small_is_refused():
    model = serve.tiny_model(dtype=torch.float64)
    engine = serve.Engine(model, slots=2, max_seq_len=32, num_pages=3)
    with pytest.raises(ValueError, match="num_pages=3"):
        engine.serve(requests(model.to_logits.out_features))  # 17 + 9 tokens need 4 pages of 8
    with torch.no_grad(), pytest.raises(ValueError, match="page pool exhausted.*num_pages=3"):
        slot = engine.cache.open()
        engine.cache.run(model, torch.zeros(1, 17, dtype=torch.long), [slot])


def test_script_checks_itself():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), "--requests", "4", "--slots", "2",
                           "--max-prompt", "12", "--max-new", "5", "--prefill-chunk", "5", "--check"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "tokens/s" in done.stdout and done.stdout.count("equal to generate alone") == 4
