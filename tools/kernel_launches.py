"""The documented support matrix as kernel launches: each configuration (kernel family, head dims,
block, group, dtype, causal, ...) runs the real launchers on meta tensors inside
tools.aot.captured_launches, so the recorded launches carry exactly the tiles, warps and
stages the launchers choose. Used by smem_sweep.py and compile_time.py.

Every selected-attention scheme the launchers can pick for the shape is launched: by query always
(partials over budget force it), by block where the group and the tiles allow it (launch.choose_scheme
with a group under launch.BY_BLOCK_MAX_ROWS_*), on the block and slots the op gives the launchers
(autograd.selected_attention_triton: tiles.kernel_block, split_blocks); the forward by tile where
its tiles fit (launch.tile_fits), whatever the rule's thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tools.aot import Launch, captured_launches

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
T = 640  # sequence length of the launches: only its specialization (multiple of 16) reaches the kernels


@dataclass(frozen=True)
class Config:
    """One point of the support matrix. family: selected | window | decode | misc."""

    family: str
    D: int
    DV: int
    dtype: str
    block: int = 64  # selection block (selected), page (decode); unused by window / misc
    G: int = 1
    per_head: bool = False  # selected / decode: a selection per query head (HI = HQ)
    causal: bool = True
    gates: bool = False
    S: int = 16  # selected slots
    schemes: tuple[str, ...] | None = None  # selected: only these schemes (names as launches() gives them)

    def label(self) -> str:
        parts = [self.family, f"D{self.D}" if self.D == self.DV else f"D{self.D}/{self.DV}", self.dtype]
        if self.family in ("selected", "decode"):
            parts += [f"blk{self.block}", f"G{self.G}" + ("ph" if self.per_head else ""), f"S{self.S}"]
        if self.family == "selected":
            parts += ["causal" if self.causal else "noncausal"] + (["gates"] if self.gates else [])
        return " ".join(parts)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _selected(cfg: Config) -> list[tuple[str, Launch]]:
    from nsa_core.kernels.selected_attention import launch, tiles

    dt = DTYPES[cfg.dtype]
    HKV, HQ = 2, 2 * cfg.G
    HI = HQ if cfg.per_head else HKV
    rows = 1 if cfg.per_head else cfg.G
    block = tiles.kernel_block(cfg.D, cfg.DV, cfg.block, dt)  # as the op splits blocks (split_blocks.py)
    f = cfg.block // block
    S = cfg.S * f + (f - 1 if cfg.causal else 0)
    q, k, v = _meta(1, HQ, T, cfg.D, dtype=dt), _meta(1, HKV, T, cfg.D, dtype=dt), _meta(1, HKV, T, cfg.DV, dtype=dt)
    idx = _meta(1, HI, T, S, dtype=torch.int32)
    gates = _meta(1, HI, T, S) if cfg.gates else None
    do = _meta(1, HQ, T, cfg.DV, dtype=dt)
    lse = _meta(1, HQ, T)
    args = (idx, gates, block, cfg.causal, 0.125)
    calls = {
        "fwd by query": lambda: launch.selected_attention_fwd(q, k, v, *args, scheme="by_query"),
        "bwd by query": lambda: launch.selected_attention_bwd(do, q, k, v, do, lse, *args, scheme="by_query"),
    }
    key_tiles = tiles.key_tiles(cfg.D, cfg.DV, block, dt)
    if rows <= launch.BY_BLOCK_MAX_ROWS_FWD and tiles.by_block_fits(key_tiles, backward=False):
        calls["fwd by block"] = lambda: launch.selected_attention_fwd(q, k, v, *args, scheme="by_block")
    if launch.tile_fits(key_tiles, rows):
        calls["fwd by tile"] = lambda: launch.selected_attention_fwd(q, k, v, *args, scheme="by_tile")
    fits = tiles.by_block_fits(key_tiles, backward=True)
    if rows <= launch.BY_BLOCK_MAX_ROWS_BWD and fits:
        calls["bwd by block (atomic dq)"] = lambda: launch.selected_attention_bwd(
            do, q, k, v, do, lse, *args, scheme="by_block", dq_atomic=True)
    if rows <= launch.BY_BLOCK_MAX_ROWS_BWD_DETERMINISTIC and fits:
        calls["bwd by block (dq partials)"] = lambda: launch.selected_attention_bwd(
            do, q, k, v, do, lse, *args, scheme="by_block", dq_atomic=False)
    out = []
    for scheme, call in calls.items():
        if cfg.schemes is not None and scheme not in cfg.schemes:
            continue
        with captured_launches() as launches:
            call()
        out += [(scheme, x) for x in launches]
    return out


def _window(cfg: Config) -> list[tuple[str, Launch]]:
    from nsa_core.kernels.sliding_window import launch

    dt = DTYPES[cfg.dtype]
    q, k, v = _meta(1, 2 * cfg.G, T, cfg.D, dtype=dt), _meta(1, 2, T, cfg.D, dtype=dt), _meta(1, 2, T, cfg.DV, dtype=dt)
    out = []
    for packed in (False, True):
        first = _meta(T, dtype=torch.int32) if packed else None
        tag = " packed" if packed else ""
        with captured_launches() as launches:
            o, lse = launch.sliding_window_fwd(q, k, v, 512, 0.125, first=first)
        out += [("fwd" + tag, x) for x in launches]
        with captured_launches() as launches:
            launch.sliding_window_bwd(o, q, k, v, o, lse, 512, 0.125, first=first)
        out += [("bwd" + tag, x) for x in launches]
    return out


def _decode(cfg: Config) -> list[tuple[str, Launch]]:
    from nsa_core.kernels.decode.launch import paged_decode_fwd

    dt = DTYPES[cfg.dtype]
    B, HKV, K, P, pages = 2, 2, 1, 64, 32
    HQ = HKV * cfg.G
    HI = HQ if cfg.per_head else HKV
    q = _meta(B, HQ, K, cfg.D, dtype=dt)
    k_pages, v_pages = _meta(P, HKV, cfg.block, cfg.D, dtype=dt), _meta(P, HKV, cfg.block, cfg.DV, dtype=dt)
    table, blocks = _meta(B, pages, dtype=torch.int32), _meta(B, HI, K, cfg.S, dtype=torch.int32)
    valid, hi = _meta(B, HI, K, cfg.S, dtype=torch.bool), _meta(B, K, dtype=torch.int32)
    out = []
    for splits, lo in ((1, None), (4, hi)):
        with captured_launches() as launches:
            paged_decode_fwd(q, k_pages, v_pages, table, blocks, valid, hi, lo, 0.125, num_splits=splits)
        out += [(f"splits {splits}" + (" lo" if lo is not None else ""), x) for x in launches]
    return out


def _misc(cfg: Config) -> list[tuple[str, Launch]]:
    """Rotary, the gated combine (forward, backward), the block top-k (cfg.block: scored blocks)."""
    from nsa_core.kernels import block_topk, combine, rotary

    dt = DTYPES[cfg.dtype]
    x = _meta(1, 4, T, cfg.D, dtype=dt)
    gates = _meta(1, 4, T, 3, dtype=dt)
    scores = _meta(1, 4, 16, cfg.block, dtype=dt)
    calls = {
        "rotary": lambda: rotary.rotate(x, _meta(T, cfg.D // 2), _meta(T, cfg.D // 2)),
        "combine fwd": lambda: combine._combine_fwd._init_fn(x, x, x, gates),
        "combine bwd": lambda: combine._combine_bwd._init_fn(x.transpose(1, 2), x, x, x, gates),
        "block top-k": lambda: block_topk._block_topk._init_fn(scores, min(16, cfg.block), 0.125, 0, 64, True, True,
                                                               0.0, 0.0, 1, 2),  # the paper's forced blocks
    }
    out = []
    for name, call in calls.items():
        with captured_launches() as launches:
            call()
        out += [(name, x) for x in launches]
    return out


FAMILIES = {"selected": _selected, "window": _window, "decode": _decode, "misc": _misc}


def launches(cfg: Config) -> list[tuple[str, Launch]]:
    """(scheme or pass, launch) of every kernel launch the launchers make for cfg."""
    return FAMILIES[cfg.family](cfg)


def support_matrix(dims=(256, 128, 64, 32, 16), blocks=(128, 64, 32, 16), groups=(1, 4, 8, 16),
                   dtypes=("bf16", "fp32"), causal=(True,), gates=(True,)) -> list[Config]:
    """The documented support: head dims up to 256 (D = DV, and the widest with the narrowest),
    selection blocks and decode pages up to 128, groups (shared selection, and per query head at the
    largest group: the by-block schemes with the most heads), the dtypes. causal / gates: the minor
    axes (by default causal with gates, the most code; smem_sweep.py --validate compares the rest)."""
    head_dims = [(d, d) for d in dims] + [(max(dims), min(dims)), (min(dims), max(dims))]
    out = []
    for (d, dv) in head_dims:
        for dtype in dtypes:
            out += [Config("window", d, dv, dtype, G=max(groups))]
            out += [Config("misc", d, d, dtype, block=nb) for nb in (16, 4096, 16384) if dv == d]
            for block in blocks:
                for g, per_head in [(g, False) for g in groups] + [(max(groups), True)]:
                    out += [Config("decode", d, dv, dtype, block=block, G=g, per_head=per_head)]
                    out += [Config("selected", d, dv, dtype, block=block, G=g, per_head=per_head, causal=c, gates=x)
                            for c in causal for x in gates]
    return out


def corners() -> list[Config]:
    """What a CI check compiles: the reported defect (D 256, block 128, G 8, bf16) and, for every
    kernel, its largest tiles at the largest head dim x block x dtype that the rules give it (the
    by-block kernels: the largest key tile each takes, tiles.py)."""
    defect = Config("selected", 256, 256, "bf16", block=128, G=8)
    return [
        defect,
        replace(defect, G=4, gates=True),  # by-block forward with a 128 KiB key tile, 1 stage
        replace(defect, block=64, G=4, gates=True),  # by-block backward, wide heads (32 rows, 1 stage)
        replace(defect, dtype="fp32", G=16, gates=True),  # float32 at 256 dims: 64-key sub-blocks
        replace(defect, D=128, DV=128, G=4, gates=True),  # by-block backward with a 64 KiB key tile, 1 stage
        Config("window", 256, 256, "fp32", G=16),
        Config("decode", 256, 256, "fp32", block=128, G=16),
        Config("misc", 256, 256, "fp32", block=16384),
    ]


def ci_corners() -> list[Config]:
    """The corners a CI test compiles in under a minute on 2 CPU cores: the defect, the by-block
    kernels' largest key tiles in bf16, float32's 64-key forward at 256 dims (the slow float32
    backward and window compiles are left to --corners)."""
    defect, fwd_by_block, bwd_by_block, fp32, bwd_by_block_128 = corners()[:5]
    return [defect, replace(fwd_by_block, schemes=("fwd by block",)),
            replace(bwd_by_block, schemes=("bwd by block (atomic dq)",)), replace(fp32, schemes=("fwd by query",)),
            replace(bwd_by_block_128, schemes=("bwd by block (atomic dq)",))]
