"""Which Triton kernels still compile on the first call after nsa_core.precompile (paper preset, T 4096 and the
gpu test's T 1234), in a fresh process with an empty Triton cache (run with TRITON_CACHE_DIR set to a new folder)."""
import json, sys, time
import torch
from triton import knobs
from nsa_core import SparseAttention, get_preset, precompile

compiled = []  # Triton's description of each kernel compiled (name, launch options, argument types)
def hook(*args, **kwargs):
    compiled.append(str(kwargs.get("repr", ""))[:600])
    return False
knobs.runtime.jit_post_compile_hook = hook
loaded = []  # kernels loaded on the GPU (launcher built) — at the first launch unless precompile did it
knobs.runtime.kernel_load_start_hook = lambda module, function, name, *rest: loaded.append(name)
seq_len = int(sys.argv[1])
torch.manual_seed(1)
nsa = SparseAttention.from_config(get_preset("paper")).cuda().to(torch.bfloat16)
x = torch.randn(1, seq_len, nsa.config.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
info = precompile(nsa, x)
during = list(compiled); compiled.clear(); loaded_during = list(loaded); loaded.clear()
torch.cuda.synchronize(); t = time.perf_counter()
out = nsa(x); out.float().square().sum().backward(); torch.cuda.synchronize()
first = time.perf_counter() - t
print(json.dumps({"seq_len": seq_len, "precompile": info, "first_call_s": first,
                  "compiled_in_precompile": during, "compiled_in_first_call": compiled,
                  "loaded_in_precompile": loaded_during, "loaded_in_first_call": loaded}, indent=1))
