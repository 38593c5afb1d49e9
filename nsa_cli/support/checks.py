"""Health checks of a SparseAttention configuration (the CLI's `nsa check`).

Each check returns a CheckResult with a measured figure; none prints.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from nsa_cli.support.decode_check import NAME as DECODE_CHECK, compare_decoding
from nsa_core.config import NSAConfig
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.ops.validation import check_positive_int
from nsa_core.model.attention import SparseAttention


@dataclass
class CheckResult:
    name: str
    passed: bool
    value: str  # the measured figure, human readable
    skipped: bool = False
    detail: str = ""
    figures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def randomize_parameters(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * std).to(p.dtype))


# the CLI's dtype names, for every command (bench times the first three)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def tolerance_for(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]


def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def tiny_copy(cfg: NSAConfig) -> NSAConfig:
    """Same flags, small sizes: what gradcheck can afford. Straight-through gates are left out
    (their gradient is by design not the derivative of the forward)."""
    small = max(cfg.compress_block_size, cfg.selection_block_size, cfg.sliding_window_size) <= 8
    kwargs = {}
    if not small:
        overlap = cfg.compress_block_size > cfg.stride
        stride = 2 if overlap else 4
        kwargs = dict(compress_block_size=4, compress_block_sliding_stride=stride,
                      selection_block_size=4 if cfg.selection_block_size >= cfg.stride else 2,
                      sliding_window_size=min(cfg.sliding_window_size, 4))
    return cfg.replace(dim=8, dim_head=4, heads=2, kv_heads=1 if cfg.group_size > 1 else 2,
                       num_selected_blocks=min(cfg.num_selected_blocks, 2), use_diff_topk=False,
                       compress_mlp_expand_factor=1.0, backend="torch", **kwargs)


COMPRESSION_PARAMETERS = ("k_compress.", "v_compress.", "k_intrablock_positions", "v_intrablock_positions")


def compression_unreachable(cfg: NSAConfig, seq_len: int) -> bool:
    """True when no query of a sequence this short attends a compressed block, so the compression
    network and the intra-block positions cannot receive a gradient (the memory tokens still do).

    Compressed block c covers tokens up to (c + 1) * stride - 1 and exists once they do (there are
    seq_len // stride blocks); when causal, query t sees it only if t > (c + 1) * stride - 1
    (nsa_core.reference.compressed_attention.compressed_visibility). So the first block reaches
    a query from seq_len >= stride (not causal) or seq_len > stride (causal)."""
    return seq_len <= cfg.stride if cfg.causal else seq_len < cfg.stride


ProgressCallback = Callable[[float, str], None]  # (fraction done in [0, 1], what runs now)

STEPS = ("forward", "backward", "causality", "cached decoding", "kernel path", "packed documents", "gradcheck")


def run_checks(cfg: NSAConfig, seq_len: int, batch: int = 1, device: str = "cpu", dtype: str = "fp32", seed: int = 0,
               on_progress: ProgressCallback | None = None) -> list[CheckResult]:
    """Build the module with random weights and run every check; dtype is one of DTYPES' names.
    on_progress(fraction done, what runs now) is called as the checks go."""
    def step(name: str, within: float = 0.0) -> None:
        if on_progress is not None:
            on_progress((STEPS.index(name) + within) / len(STEPS), name)

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    dtype = DTYPES[dtype]
    check_positive_int("seq_len", seq_len)
    check_positive_int("batch", batch)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available here; use --device cpu")
    torch.manual_seed(seed)
    module = SparseAttention.from_config(cfg.replace(backend="torch"))
    randomize_parameters(module, seed)
    module = module.to(device=device, dtype=dtype)
    tol = tolerance_for(dtype)
    x = torch.randn(batch, seq_len, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    results = []

    step("forward")
    out = module(x)
    shape_ok = tuple(out.shape) == tuple(x.shape)
    results.append(CheckResult("output shape", shape_ok, f"{tuple(out.shape)}", figures={"shape": list(out.shape)}))
    finite = bool(torch.isfinite(out).all())
    results.append(CheckResult("finite values", finite, "all finite" if finite else "NaN/inf found"))

    step("backward")
    out.backward(torch.randn_like(out))
    results.append(_gradient_check(module, x, cfg, seq_len))

    with torch.no_grad():
        step("causality")
        parallel = out.detach()  # the forward's output: shared by causality and cached decoding
        if cfg.causal and seq_len > 1:
            cut = seq_len // 2
            changed = x.detach().clone()
            changed[:, cut:] = torch.randn_like(changed[:, cut:])
            leak = (module(changed)[:, :cut] - parallel[:, :cut]).abs().max().item()
            results.append(CheckResult("no future leakage", leak == 0.0, f"max change {leak:.1e} before t={cut}", figures={"max_change": leak}))
        else:
            reason = "needs causal=True" if not cfg.causal else "needs seq_len > 1"
            results.append(CheckResult("no future leakage", True, "skipped", skipped=True, detail=reason))

        step("cached decoding")
        if cfg.causal:
            found = compare_decoding(module, x.detach(), parallel, tol,
                                     on_step=lambda within: step("cached decoding", within))
            results.append(CheckResult(DECODE_CHECK, found.passed, found.value, detail=found.detail, figures=found.figures))
        else:
            results.append(CheckResult(DECODE_CHECK, True, "skipped", skipped=True, detail="needs causal=True"))

    step("kernel path")
    results.append(_kernel_check(module, x.detach(), tol))
    step("packed documents")
    results.append(_packed_check(module, x.detach()[:1], tol))
    step("gradcheck")
    results.append(_gradcheck(cfg, seed))
    if on_progress is not None:
        on_progress(1.0, "done")
    return results


def _gradient_check(module: SparseAttention, x: torch.Tensor, cfg: NSAConfig, seq_len: int) -> CheckResult:
    """Every trainable parameter and the input have a finite gradient, except the parameters no
    gradient can reach at this length (see compression_unreachable): those are named in the note."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    # no gradient: none at all, an exact zero everywhere (masked out), or a non-finite one
    missing = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    unreachable = [n for n, _ in params if n.startswith(COMPRESSION_PARAMETERS)] if compression_unreachable(cfg, seq_len) else []
    failing = [n for n in missing if n not in unreachable]
    input_ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
    figure = f"{len(params) - len(missing)}/{len(params)} parameters" + ("" if input_ok else ", input has none")
    notes = []
    if failing:
        notes.append("no gradient: " + ", ".join(failing[:5]) + (", ..." if len(failing) > 5 else ""))
    unreached = [n for n in unreachable if n in missing]
    if unreached:
        first = cfg.stride + 1 if cfg.causal else cfg.stride
        notes.append(f"{len(unreached)} compression parameters (compression MLP, intra-block positions) cannot get "
                     f"a gradient below seq_len {first}: no query attends a compressed block yet")
    return CheckResult("gradients reach input and parameters", input_ok and not failing, figure, detail="; ".join(notes),
                       figures={"missing": failing, "unreachable_at_this_length": unreached})


def _kernel_check(module: SparseAttention, x: torch.Tensor, tol: float) -> CheckResult:
    reason = kernel_unavailable_reason(x.device)
    if reason is not None:
        return CheckResult("kernel path equals reference", True, "skipped", skipped=True, detail=reason)
    kernel_module = copy.deepcopy(module)
    kernel_module.config = module.config.replace(backend="triton")
    try:
        xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref, ker = module(xr), kernel_module(xk)
    except ValueError as err:  # a configuration the kernels do not support
        return CheckResult("kernel path equals reference", True, "skipped", skipped=True, detail=str(err))
    grad = torch.randn_like(ref)
    ref.backward(grad)
    ker.backward(grad)
    err_out, err_grad = max_relative_error(ker, ref), max_relative_error(xk.grad, xr.grad)
    passed = err_out <= 10 * tol and err_grad <= 10 * tol
    return CheckResult("kernel path equals reference", passed, f"rel error out {err_out:.1e}, grad {err_grad:.1e}",
                       figures={"output_rel_error": err_out, "grad_rel_error": err_grad})


def _packed_check(module: SparseAttention, x: torch.Tensor, tol: float) -> CheckResult:
    """The first row cut into uneven documents (a third, one token, an empty one, the rest), packed
    with cu_seqlens: output and input gradient equal running each document alone."""
    n = x.shape[1]
    cu = torch.tensor([0, n // 3, n // 3 + 1, n // 3 + 1, n], device=x.device)
    xp, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    packed = module(xp, cu_seqlens=cu)
    spans = [(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
    alone = torch.cat([module(xs[:, s:e]) for s, e in spans], dim=1)
    grad = torch.randn_like(packed)
    # the input's gradient only: the parameters' gradients (what the gradient check reads) are not computed
    (grad_packed,), (grad_alone,) = torch.autograd.grad(packed, xp, grad), torch.autograd.grad(alone, xs, grad)
    err_out, err_grad = max_relative_error(packed, alone), max_relative_error(grad_packed, grad_alone)
    passed = err_out <= 10 * tol and err_grad <= 10 * tol
    lengths = [e - s for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return CheckResult("packed documents equal separate", passed,
                       f"rel error out {err_out:.1e}, grad {err_grad:.1e}", detail=f"document lengths {lengths}",
                       figures={"output_rel_error": err_out, "grad_rel_error": err_grad, "lengths": lengths})


def _gradcheck(cfg: NSAConfig, seed: int) -> CheckResult:
    tiny_cfg = tiny_copy(cfg)
    tiny = SparseAttention.from_config(tiny_cfg).double()
    randomize_parameters(tiny, seed, std=0.3)
    n = min(2 * max(tiny_cfg.selection_block_size, tiny_cfg.compress_block_size) + 3, 19)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, tiny_cfg.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    try:
        # fast mode compares the analytic and numerical Jacobians along random directions: as
        # sensitive to a wrong gradient, and 10x faster than the full Jacobian (seconds, not 30 s)
        ok = torch.autograd.gradcheck(tiny, (x,), eps=1e-6, atol=1e-5, rtol=1e-4, raise_exception=True, fast_mode=True)
        return CheckResult("gradcheck (tiny float64 copy)", bool(ok), f"passed on (1, {n}, {tiny_cfg.dim})")
    except RuntimeError as err:
        return CheckResult("gradcheck (tiny float64 copy)", False, "mismatch", detail=str(err).splitlines()[0])
