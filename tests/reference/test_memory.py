"""Memory stays linear in the sequence on the CPU reference path, measured (peak RSS of a fresh
process): the sliding window with a tiny window at 8k tokens (the case that built full T x T scores
before), and a whole module forward (the seeds preset) at 8k tokens (9.8 GB before; 16k was killed at 24 GiB)."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, torch
    torch.manual_seed(0)
    from nsa_core import SparseAttention, get_preset, sliding_window_attention
    what, n = sys.argv[1], int(sys.argv[2])
    if what == "window":
        q = torch.randn(1, 8, n, 64)
        run = lambda: sliding_window_attention(q, q, q, window=2)
    else:
        module = SparseAttention.from_config(get_preset("seeds"))
        x = torch.randn(1, n, 512)
        run = lambda: module(x)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        out = run()
    print(json.dumps({"extra_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
                      "seconds": time.perf_counter() - start, "finite": bool(torch.isfinite(out).all())}))
""")


def peak(what: str, n: int) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, what, str(n)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_window_memory_is_linear():
    # full scores would be 8 x 8192 x 8192 float32 = 2 GiB per tensor (9.5 GB measured before the fix)
    result = peak("window", 8192)
    assert result["finite"] and result["extra_mib"] < 400, result


@pytest.mark.parametrize("n", [8192])
def test_module_forward_memory_is_linear(n):
    # before: 9.8 GB at 8k and killed at 24 GiB at 16k; the input itself is 16 MiB
    result = peak("module", n)
    assert result["finite"] and result["extra_mib"] < 1536, result
