"""Which Triton kernels still compile on the first call after nsa_core.precompile (paper preset, T 4096 and the
gpu test's T 1234), in a fresh process with an empty Triton cache (run with TRITON_CACHE_DIR set to a new folder)."""
import json, sys, time
import torch
from triton import knobs
from nsa_core import SparseAttention, get_preset, precompile

compiled = []
def hook(*args, **kwargs):
    fn = kwargs.get("fn")
    name = getattr(fn, "name", None) or getattr(getattr(fn, "jit_function", None), "__name__", "?")
    compiled.append({"name": str(name), "repr": str(kwargs.get("repr", ""))[:600],
                     "warmup": bool(kwargs.get("is_manual_warmup", False))})
    return False
knobs.runtime.jit_post_compile_hook = hook
seq_len = int(sys.argv[1])
torch.manual_seed(1)
nsa = SparseAttention.from_config(get_preset("paper")).cuda().to(torch.bfloat16)
x = torch.randn(1, seq_len, nsa.config.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
info = precompile(nsa, x)
during = list(compiled); compiled.clear()
torch.cuda.synchronize(); t = time.perf_counter()
out = nsa(x); out.float().square().sum().backward(); torch.cuda.synchronize()
first = time.perf_counter() - t
print(json.dumps({"seq_len": seq_len, "precompile": info, "first_call_s": first,
                  "compiled_in_precompile": [c["repr"] for c in during],
                  "compiled_in_first_call": [c["repr"] for c in compiled]}, indent=1))
