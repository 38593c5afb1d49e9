"""The first diagnosis of issue 23 (benchmarks/NOTES.md, "Does NSA learn retrieval?"), kept as it ran on
the H200: a 256-token needle task, a tiny 2-layer model, SparseAttention with branches dropped (their
gate held at exactly 0), all blocks selected, gate biases 0, use_diff_topk, and independent keys and
values per branch. Results: benchmarks/results/retrieval/diagnosis_256.json.

`IndepSA` emulates what `independent_kv=True` now does in the library (it predates the option);
"+indepq" gives each branch its own queries too (not a library option). The "+lib", "+kv", "+g0",
"+f12" parts build the library's options directly; they were added after the diagnosis runs.
The benchmark proper, with curricula, seeds and learning-rate sweeps, is `python -m benchmarks.retrieval`.

    python -m benchmarks.retrieval.first_diagnosis --steps 500 --batch 64 --lrs 1e-3,3e-3 \
        --variants dense,nsa+wonly,nsa,nsa+b0,nsa+all+sonly,nsa+all,nsa+sonly,nsa+conly,nsa+diff,nsa+b0+diff
    python -m benchmarks.retrieval.first_diagnosis --steps 500 --batch 64 --lrs 1e-3,3e-3 \
        --variants nsa+all+nowin,nsa+all+nocmp,nsa+nocmp,nsa+nowin,nsa+indep,nsa+indep+b0,nsa+all+indep,nsa+indepq
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nsa_core import SparseAttention
from nsa_core.model.transformer import DenseAttention

args = None  # the command line's, set by main()
dev = "cuda" if torch.cuda.is_available() else "cpu"
NV, MARK, NF = 16, 16, 48
VOCAB = NV + 1 + NF
W = 16

def batch(B, T, g):
    x = torch.randint(NV + 1, VOCAB, (B, T), generator=g)
    dist = torch.randint(W + 2, T - 1, (B,), generator=g)  # query at T-1, value at T-1-dist+? 
    vpos = T - 1 - dist + 1  # value position; marker at vpos-1; distance query-value = dist-1 >= W+1
    vals = torch.randint(0, NV, (B,), generator=g)
    r = torch.arange(B)
    x[r, vpos - 1] = MARK
    x[r, vpos] = vals
    x[:, -1] = MARK
    return x.to(dev), vals.to(dev), vpos.to(dev)

class Gate(nn.Module):
    def __init__(self, dim, heads, biases, keep):
        super().__init__()
        self.lin = nn.Linear(dim, 3 * heads); nn.init.zeros_(self.lin.weight)
        with torch.no_grad(): self.lin.bias.copy_(torch.tensor(list(biases) * heads))
        self.register_buffer("drop", torch.tensor([b not in keep for b in range(3)] * heads), persistent=False)
    def forward(self, x): return self.lin(x).masked_fill(self.drop, float("-inf"))

def make_attn(name, dim):
    H, HK, D = 2, 1, 32
    if name == "dense": return DenseAttention(dim, dim_head=D, heads=H, kv_heads=HK, causal=True)
    kw = dict(dim=dim, dim_head=D, heads=H, kv_heads=HK, sliding_window_size=W, compress_block_size=16,
              compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=4, causal=True, backend=args.backend)
    biases, keep = (-2., -2., 2.), (0, 1, 2)
    indep = None
    lib = False
    opts = {}
    for part in name.split("+")[1:]:
        if part == "b0": biases = (0., 0., 0.)
        elif part == "all": kw["num_selected_blocks"] = args.seq // 16
        elif part == "conly": keep = (0,)
        elif part == "sonly": keep = (1,)
        elif part == "wonly": keep = (2,)
        elif part == "diff": kw["use_diff_topk"] = True
        elif part == "lib": lib = True
        elif part == "kv": opts["independent_kv"] = True
        elif part == "g0": opts["gate_biases"] = (0.0, 0.0, 0.0)
        elif part == "f12": opts.update(num_forced_initial_blocks=1, num_forced_local_blocks=2)
        elif part == "nowin": keep = (0, 1)
        elif part == "nocmp": keep = (1, 2)
        elif part == "indep": indep = "kv"
        elif part == "indepq": indep = "qkv"
        elif part.startswith("sel"): kw["num_selected_blocks"] = int(part[3:])
        elif part.startswith("opt:"):
            k, v = part[4:].split("="); opts[k] = json.loads(v)
    kw.update(opts)
    if lib:
        return SparseAttention(**kw)
    if indep:
        return IndepSA(indep, **kw, strategy_combine_mlp=Gate(dim, H, biases, keep))
    return SparseAttention(**kw, strategy_combine_mlp=Gate(dim, H, biases, keep))

from nsa_core.model.attention import BranchKeys
from nsa_core.model.compression import with_memory
from nsa_core.seqs import Seqs
class IndepSA(SparseAttention):
    def __init__(self, mode, **kw):
        super().__init__(**kw)
        self.mode = mode
        h, hk, d = self.heads, self.kv_heads, self.dim_head
        nq = 3 if mode == "qkv" else 1
        self.to_qkv = nn.Linear(kw["dim"], (nq * h + 6 * hk) * d, bias=False)
    def forward(self, inp):
        x = self.norm(inp)
        h, hk, d = self.heads, self.kv_heads, self.dim_head
        nq = 3 if self.mode == "qkv" else 1
        parts = self.to_qkv(x).split([h * d] * nq + [hk * d] * 6, dim=-1)
        parts = [t.unflatten(-1, (-1, d)).transpose(1, 2) for t in parts]
        qs = parts[:nq]; kc, vc, ks, vs, kw_, vw = parts[nq:]
        n = x.shape[1]; seqs = Seqs.batch(n)
        ck, cv = with_memory(self.compress_mem_kv, *self.compress(kc, vc, seqs))
        pos = seqs.key_positions(x.device)
        keys = BranchKeys(ck, cv, self.rotate(ks, pos), vs)
        self._wkeys = BranchKeys(ck, cv, self.rotate(kw_, pos), vw)
        self._qs = qs
        return self.attend(x, qs[0], keys, seqs)
    @torch.no_grad()
    def select(self, inp):
        from nsa_core.ops.block_selection import select_blocks
        x = self.norm(inp)
        h, hk, d = self.heads, self.kv_heads, self.dim_head
        nq = 3 if self.mode == "qkv" else 1
        parts = self.to_qkv(x).split([h * d] * nq + [hk * d] * 6, dim=-1)
        parts = [t.unflatten(-1, (-1, d)).transpose(1, 2) for t in parts]
        ck, _ = self.compress(parts[nq], parts[nq + 1])
        return select_blocks(parts[0], ck, self.selection_rule, backend=self.config.backend)
    def window_branch(self, q, keys, seqs):
        if self.mode == "qkv":
            q = self.rotate(self._qs[2], seqs.query_positions(q.device))
        return super().window_branch(q, self._wkeys, seqs)
    def selected_branch(self, q, keys, selection, seqs):
        if self.mode == "qkv":
            q = self.rotate(self._qs[1], seqs.query_positions(q.device))
        return super().selected_branch(q, keys, selection, seqs)

class Model(nn.Module):
    def __init__(self, name, dim, depth):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim); self.prev = nn.Linear(dim, dim, bias=False)
        self.attn = nn.ModuleList([make_attn(name.split("+")[0] if name.startswith(("dense",)) else name, dim) for _ in range(depth)])
        self.ff = nn.ModuleList([nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(depth)])
        self.norm = nn.RMSNorm(dim); self.out = nn.Linear(dim, VOCAB, bias=False)
    def forward(self, x):
        e = self.emb(x); h = e + self.prev(F.pad(e, (0, 0, 1, 0))[:, :-1])
        for a, f in zip(self.attn, self.ff):
            h = h + a(h); h = h + f(h)
        return self.out(self.norm(h[:, -1]))

def hitrate(model, x, vpos):
    rates = []
    hooks = []
    inputs = []
    for a in model.attn:
        if isinstance(a, SparseAttention):
            hooks.append(a.register_forward_pre_hook(lambda m, inp: inputs.append(inp[0])))
    with torch.no_grad(): model(x)
    for h in hooks: h.remove()
    for a, inp in zip([a for a in model.attn if isinstance(a, SparseAttention)], inputs):
        sel = a.select(inp)
        if sel is None: rates.append(None); continue
        idx, valid = sel.indices[:, 0, -1], sel.valid[:, 0, -1]   # (B, S) at the query
        blk = (vpos // 16)[:, None]
        rates.append(((idx == blk) & valid).any(-1).float().mean().item())
    return rates


def parse_arguments(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--variants", default="dense,window,nsa")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def main(argv=None):
    global args
    args = parse_arguments(argv)
    res = []
    for name in args.variants.split(","):
        for lr in map(float, args.lrs.split(",")):
            for seed in map(int, args.seeds.split(",")):
                torch.manual_seed(seed); g = torch.Generator().manual_seed(1000 + seed)
                m = Model(name, args.dim, args.depth).to(dev)
                opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
                curve, t0 = [], time.time()
                for step in range(1, args.steps + 1):
                    frac = step / args.steps
                    for gr in opt.param_groups: gr["lr"] = lr * min(1, step / 30) * 0.5 * (1 + math.cos(math.pi * frac))
                    x, y, vp = batch(args.batch, args.seq, g)
                    with torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
                        loss = F.cross_entropy(m(x).float(), y)
                    opt.zero_grad(set_to_none=True); loss.backward()
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
                    if step % args.eval_every == 0 or step == args.steps:
                        ge = torch.Generator().manual_seed(99)
                        x, y, vp = batch(256, args.seq, ge)
                        with torch.no_grad(), torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
                            acc = (m(x).argmax(-1) == y).float().mean().item()
                        hr = hitrate(m, x, vp) if "nsa" in name else None
                        curve.append(dict(step=step, acc=acc, loss=loss.item(), hit=hr))
                r = dict(name=name, lr=lr, seed=seed, seq=args.seq, curve=curve, final=curve[-1]["acc"],
                         best=max(c["acc"] for c in curve), time=time.time() - t0)
                res.append(r)
                print(f"{name:30s} lr={lr:g} s={seed} final={r['final']:.3f} best={r['best']:.3f} hit={curve[-1]['hit']} t={r['time']:.0f}s "
                      + " ".join(f"{c['acc']:.2f}" for c in curve), flush=True)
                json.dump(res, open(os.path.join(args.out, f"diag_{args.seq}{args.tag}.json"), "w"))


if __name__ == "__main__":
    main()
