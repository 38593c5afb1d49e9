"""The peer flash-nsa (mdy666/Scalable-Flash-Native-Sparse-Attention) as the benchmarks call it: the
import with stubs for what it imports but never uses here, its varlen core `HFNSACore` as a timed
callable, and its window branch replaced by ours (the device has no flash-attn, which it uses there).

Get it onto the device as the peers' README says: copy /work/shared/peers/flash_nsa into a git-ignored
folder of the checkout (e.g. .peers/flash_nsa), carry it, and pass that folder (`--peers .peers`).
Shapes as flash-nsa takes them: q (T, HQ, D), k and v (T, HKV, D), gate logits (T, HQ, 3).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

from nsa_core.config import NSAConfig
from nsa_core.ops import Seqs, sliding_window_attention


def import_flash_nsa(peers: str | None):
    """flash_nsa (from the folder `peers` when given, else wherever Python finds it), or why not. Stubs
    what it imports but never uses here (pkg_resources' parse_version, pandas for its own timing
    table), as the peers' README says."""
    stubs = {"pkg_resources": lambda m: setattr(m, "parse_version", importlib.import_module("packaging.version").parse),
             "pandas": lambda m: setattr(m, "Series", dict)}
    for name, fill in stubs.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            fill(module)
            sys.modules[name] = module
    try:
        return import_package("flash_nsa", Path(peers) / "flash_nsa") if peers else importlib.import_module("flash_nsa")
    except Exception as error:  # any failure to import a peer is a row that says why
        return f"{type(error).__name__}: {error}"


def import_package(name: str, folder: Path) -> types.ModuleType:
    """The package `name` imported from `folder` (its __init__.py; its submodules found beside it),
    registered in sys.modules under that name."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    if spec is None or not (folder / "__init__.py").is_file():
        raise ImportError(f"no package {name} in {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def use_our_window(window: int, seqs: Seqs) -> None:
    """Replace flash-nsa's window branch (flash-attn's varlen window) by our sliding-window op over
    `seqs` (the documents of the row it will be called on): (T, heads, D) in and out, causal."""
    def our_window(q, k, v, sm_scale=None):
        heads_first = [t.transpose(0, 1)[None] for t in (q, k, v)]
        out = sliding_window_attention(*heads_first, window=window, scale=sm_scale, seqs=seqs)
        return out[0].transpose(0, 1).contiguous()

    importlib.import_module("flash_nsa.modules.hf_level_nsa").swa_varlen_func = our_window


def flash_nsa_core(flash_nsa, cfg: NSAConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Seqs,
                   compression: str = "linear"):
    """HFNSACore of `cfg`'s shape on our q (1, HQ, T, D), k, v (1, HKV, T, D), its window branch ours:
    (a function returning its output (T, HQ, D), its leaves: its own q, k, v and random gate logits).
    `compression`: its cmp_k_method / cmp_v_method ("linear", "mean", ...). A plain row (seqs not
    packed) is one document, cu_seqlens [0, T]."""
    core = flash_nsa.HFNSACore(flash_nsa.NSAConfig(
        head_dim=cfg.dim_head, num_heads=cfg.heads, num_kv_heads=cfg.num_kv_heads, kernel_size=cfg.compress_block_size,
        stride=cfg.stride, block_size=cfg.selection_block_size, top_n=cfg.num_selected_blocks,
        window_size=cfg.sliding_window_size, cmp_k_method=compression, cmp_v_method=compression)).to(q.device, q.dtype)
    use_our_window(cfg.sliding_window_size, seqs)
    T = q.shape[-2]
    cu_seqlens = seqs.cu_seqlens if seqs.is_packed else torch.tensor([0, T], dtype=torch.int32, device=q.device)
    grad = q.requires_grad
    tq, tk, tv = (t[0].transpose(0, 1).detach().contiguous().requires_grad_(grad) for t in (q, k, v))
    gates = torch.randn(T, cfg.heads, 3, device=q.device, dtype=q.dtype, requires_grad=grad)
    return (lambda: core(tq, tk, tv, gates, cu_seqlens)), [tq, tk, tv, gates]
