"""Fused LM head + AMiD loss: distil from hidden states without materialising [N, V] logits.

    loss = amid.fused_linear_amid_loss(student_hidden, student_lm_head.weight,
                                       teacher_hidden, teacher_lm_head.weight, labels,
                                       alpha=0.5, lam=0.1, divergence="ab", ce_weight=0.5)

How it works (gradient in the forward, token chunks). The N token rows are processed in chunks of
C rows. For each chunk, with no autograd graph:

1. the two head GEMMs: ``s = h_s W_sᵀ + b_s`` and ``t = h_t W_tᵀ + b_t`` ([C, V] each; the teacher
   is never differentiated);
2. ``torch.ops.amid.amid_loss_fwd(s, t, row_weight, ..., compute_grad=True)`` returns the row
   losses and ``g = d(Σ row losses)/ds`` in one pass; the row weight carries the reduction (mask /
   number of kept rows, or mask / normalizer), the ignored rows, the optional T² and ``kd_weight``;
3. the optional hard-label cross-entropy and z-loss terms add their gradient to ``g`` in place;
4. ``grad_hidden[chunk] = g W_s``, ``grad_W_s += gᵀ h_s``, ``grad_b_s += Σ_rows g``.

The backward only multiplies the stored gradients by ``grad_output`` (a 0-d tensor on the device:
no host sync). So at no time does a tensor of N × V elements exist: the largest temporaries are
the chunk's [C, V] logits and their gradient. With ``reduction='none'`` the gradients depend on
the per-row ``grad_output``, so the forward computes only the row losses and the backward
recomputes the chunks (two more head GEMMs) with the row weights scaled by ``grad_output``.

Chunk size (``chunk_size=None``): see :func:`default_chunk_size`; the live [C, V] temporaries of
one chunk are kept within :data:`DEFAULT_CHUNK_BUDGET_BYTES` (256 MiB).

Weight-gradient accumulation: ``accum_dtype=None`` accumulates ``grad_W_s`` in the weight's
dtype (each chunk's GEMM accumulates in fp32 internally, then adds to the running sum, one
rounding per chunk; Liger's default), which keeps the extra memory at one weight-sized tensor.
``accum_dtype=torch.float32`` keeps an fp32 accumulator and rounds once at the end (costs
4·V·H bytes plus the final cast; recommended for bf16/fp16 heads with many chunks). The bias
gradient (V values) is always accumulated in float32 (float64 for float64 weights).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops as _ops
from .functional import (DEFAULT_ALPHA, DEFAULT_LAM, _base_row_weights, _batchmean_denominator, _check_labels,
                         _check_reduction_args, _check_vocab_size, _error, _normalizer_alias, _shape, _use_kernels)
from .functional import _integer, _jsd_options, _loss_options, _real

__all__ = ["fused_linear_amid_loss", "FusedLinearAMiDLoss", "fused_linear_generalized_jsd", "FusedLinearGeneralizedJSD",
           "default_chunk_size", "DEFAULT_CHUNK_BUDGET_BYTES"]

#: Memory budget for the live [chunk, V] temporaries of one chunk (logits, gradient, CE scratch).
DEFAULT_CHUNK_BUDGET_BYTES = 256 * 1024 * 1024

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Number = Union[int, float]


def default_chunk_size(n: int, vocab: int, dtype: torch.dtype, *, teacher_dtype: Optional[torch.dtype] = None,
                       ce_or_z: bool = False, accum_dtype: Optional[torch.dtype] = None, fused_accum: bool = True,
                       budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one chunk's [C, V] temporaries fit in ``budget_bytes``.

    Bytes per row = V × (3·size(dtype)                  student logits, teacher logits, gradient
                         + size(teacher_dtype)          teacher GEMM output, if cast to ``dtype``
                         + 2·size(loss dtype)           CE / z-loss: upcast copy and log-sum-exp scratch
                         + size(accum_dtype))           upcast gradient, when the weight gradient is
                                                        accumulated in another dtype without a fused GEMM
    C = budget // bytes per row, clamped to [1, n], and rounded down to a multiple of 64 when ≥ 128
    (GEMM-friendly). E.g. V = 32000 fp32 → 640 rows; V = 151936 bf16 → 256 rows.
    """
    isz = torch.empty((), dtype=dtype).element_size()
    ldt = _ops.loss_dtype(dtype)
    lsz = torch.empty((), dtype=ldt).element_size()
    per_elem = 3 * isz
    if teacher_dtype is not None and teacher_dtype != dtype:
        per_elem += torch.empty((), dtype=teacher_dtype).element_size()
    if ce_or_z:
        per_elem += lsz * (2 if ldt != dtype else 1)
    if accum_dtype is not None and accum_dtype != dtype and not fused_accum:
        per_elem += torch.empty((), dtype=accum_dtype).element_size()
    per_row = max(1, vocab) * per_elem
    c = max(1, int(budget_bytes) // per_row)
    if c >= 128:
        c -= c % 64
    return max(1, min(c, max(n, 1)))


# ------------------------------------------------------------------------------------------------
# The chunk loop (no autograd inside: called from the autograd.Function or under no_grad).

@dataclass(frozen=True)
class _Config:
    options: tuple          # (alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant)
    kd_on: bool
    ce_on: bool
    z_on: bool
    chunk: int
    accum_dtype: torch.dtype
    use_kernels: bool
    want: Tuple[bool, bool, bool]  # gradients of (student_hidden, student_weight, student_bias)
    reduction_none: bool
    components: bool = False  # also compute the unweighted kd / ce / z rows (return_components)


def _fused_accum(acc: Tensor, a: Tensor) -> bool:
    # torch.addmm(..., out_dtype=float32) exists for fp16/bf16 inputs on CUDA only.
    return acc.dtype == a.dtype or (acc.device.type == "cuda" and acc.dtype == torch.float32
                                    and a.dtype in (torch.float16, torch.bfloat16))


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, with acc possibly in a wider dtype than a and b (no [V, H] temporary)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif _fused_accum(acc, a):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _kd_chunk(s: Tensor, t: Tensor, w: Tensor, cfg: _Config, compute_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    if cfg.use_kernels:
        loss, _stats, g = torch.ops.amid.amid_loss_fwd.default(s, t, w, *cfg.options, compute_grad)
        return loss, (g if compute_grad else None)
    # No amid kernels for this device in this build: the pure-PyTorch reference on the chunk
    # (amid.functional warned once already); slow, and its temporaries exceed the chunk budget.
    from .reference import amid_loss_rows

    names = ("alpha", "lam", "divergence", "order", "ab_alpha", "ab_beta", "temperature", "detach_assistant")
    ldt = _ops.loss_dtype(s.dtype)
    with torch.enable_grad():
        sx = s.detach().to(ldt).requires_grad_(compute_grad)
        rows = amid_loss_rows(sx, t.to(ldt), **dict(zip(names, cfg.options)))
        rows = torch.where(w != 0, rows * w, torch.zeros_like(rows))
        g = torch.autograd.grad(rows.sum(), sx)[0].to(s.dtype) if compute_grad else None
    return rows.detach(), g


def _ce_z_chunk(s: Tensor, g: Optional[Tensor], y: Optional[Tensor], ce_w: Tensor, z_w: Tensor, cfg: _Config,
                compute_grad: bool, raw: Optional[Tuple[Optional[Tensor], Tensor]] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """Rows ce_w·(lse − s_y) + z_w·lse² and their gradient added to g. Consumes s (in place).
    With ``raw = (ce_raw, z_raw)`` (return_components) also writes the unweighted rows lse − s_y
    (when ``ce_raw`` is not None, i.e. labels were given) and lse² into those chunk views."""
    ldt = _ops.loss_dtype(s.dtype)
    sf = s.to(ldt)  # a copy for low-precision logits; else s itself, which is dead after this
    lse = torch.logsumexp(sf, dim=1)
    rows = torch.zeros_like(lse)
    if raw is not None:
        if raw[0] is not None:
            raw[0].copy_(lse - sf.gather(1, y.unsqueeze(1)).squeeze(1))
        raw[1].copy_(lse * lse)
    if cfg.ce_on:
        rows = rows + ce_w * (lse - sf.gather(1, y.unsqueeze(1)).squeeze(1))
    if cfg.z_on:
        rows = rows + z_w * lse * lse
    # Rows of weight 0 (ignored) are exactly 0, even if their logits are not finite.
    rows = torch.where((ce_w != 0) | (z_w != 0), rows, torch.zeros_like(rows))
    if compute_grad and (cfg.ce_on or cfg.z_on):
        coef = ce_w + 2.0 * z_w * lse if cfg.z_on else ce_w
        p = sf.sub_(lse.unsqueeze(1)).exp_().mul_(coef.unsqueeze(1))  # coef · softmax(s)
        if g is None:
            g = p if p.dtype == s.dtype else p.to(s.dtype)
        else:
            g.add_(p)
        del p
        if cfg.ce_on:
            g.scatter_add_(1, y.unsqueeze(1), (-ce_w).to(g.dtype).unsqueeze(1))
    return rows, g


def _run_chunks(sh: Tensor, sw: Tensor, sb: Optional[Tensor], th: Tensor, tw: Tensor, tb: Optional[Tensor],
                y: Optional[Tensor], kd_w: Tensor, ce_w: Tensor, z_w: Tensor, cfg: _Config,
                want: Tuple[bool, bool, bool], comps: Optional[list] = None):
    n, hs = sh.shape
    v = sw.shape[0]
    dtype = sh.dtype
    ldt = _ops.loss_dtype(dtype)
    want_h, want_w, want_b = want
    compute_grad = want_h or want_w or want_b
    rows = torch.zeros(n, dtype=ldt, device=sh.device)
    gh = torch.zeros((n, hs), dtype=dtype, device=sh.device) if want_h else None
    gw = torch.zeros((v, hs), dtype=cfg.accum_dtype, device=sh.device) if want_w else None
    gb = torch.zeros((v,), dtype=ldt, device=sh.device) if want_b else None
    # return_components: unweighted per-row kd (carries the reduction weight and T², not kd_weight), ce
    # and z rows, filled in below and reduced by the caller. The kd kernel then runs with the
    # unweighted row weight kd_w and its rows and gradient are scaled by kd_weight (comps[3]) here.
    raw = None
    kd_factor = None
    if comps is not None:
        kd_factor = comps[3]
        raw = [torch.zeros(n, dtype=ldt, device=sh.device) if cfg.kd_on else None,
               torch.zeros(n, dtype=ldt, device=sh.device) if y is not None and comps[4] else None,
               torch.zeros(n, dtype=ldt, device=sh.device)]
        comps[:3] = raw
    if not (cfg.kd_on or cfg.ce_on or cfg.z_on or comps is not None):
        return rows, gh, gw, gb
    for c0 in range(0, n, cfg.chunk):
        c1 = min(n, c0 + cfg.chunk)
        h = sh[c0:c1]
        s = F.linear(h, sw, sb)
        g = None
        if cfg.kd_on:
            t = F.linear(th[c0:c1], tw, tb)
            if t.dtype != dtype:
                t = t.to(dtype)
            kd_rows, g = _kd_chunk(s, t, kd_w[c0:c1], cfg, compute_grad)
            del t
            if raw is not None:
                raw[0][c0:c1] = kd_rows
                if not (isinstance(kd_factor, float) and kd_factor == 1.0):
                    kd_rows = kd_rows * kd_factor
                    if g is not None:
                        g.mul_(kd_factor.to(g.dtype) if isinstance(kd_factor, Tensor) else kd_factor)
            rows[c0:c1] += kd_rows
        if cfg.ce_on or cfg.z_on or raw is not None:
            extra, g = _ce_z_chunk(s, g, None if y is None else y[c0:c1], ce_w[c0:c1], z_w[c0:c1], cfg,
                                   compute_grad, None if raw is None else
                                   (None if raw[1] is None else raw[1][c0:c1], raw[2][c0:c1]))
            rows[c0:c1] += extra
        del s
        if compute_grad and g is not None:
            if want_h:
                torch.mm(g, sw, out=gh[c0:c1])
            if want_w:
                _addmm_acc(gw, g.t(), h)
            if want_b:
                gb.add_(g.sum(0, dtype=ldt))
        del g
    return rows, gh, gw, gb


def _finish(g: Optional[Tensor], scale: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """g · scale in ``dtype``, in place when the dtypes agree (no host sync, no extra copy)."""
    if g is None:
        return None
    if g.dtype == dtype:
        return g.mul_(scale) if scale is not None else g
    if scale is None:
        return g.to(dtype)
    return torch.mul(g, scale, out=torch.empty(g.shape, dtype=dtype, device=g.device))


class _FusedLinearAMiD(torch.autograd.Function):
    """Gradients written in the forward (mean / sum) or recomputed chunk by chunk (none)."""

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, y, kd_w, ce_w, z_w, cfg, comps=None):
        ctx.cfg = cfg
        ctx.dtypes = (sh.dtype, sw.dtype, None if sb is None else sb.dtype)
        if cfg.reduction_none:
            rows = _run_chunks(sh, sw, sb, th, tw, tb, y, kd_w, ce_w, z_w, cfg, (False, False, False), comps)[0]
            ctx.kd_factor = None if comps is None else comps[3]
            ctx.save_for_backward(sh, sw, sb, th, tw, tb, y, kd_w, ce_w, z_w)
            return rows
        rows, gh, gw, gb = _run_chunks(sh, sw, sb, th, tw, tb, y, kd_w, ce_w, z_w, cfg, cfg.want, comps)
        ctx.grads = (gh, gw, gb)
        return rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # (@once_differentiable would hand out gradients whose derivative is silently 0)
            raise RuntimeError(
                "amid.fused_linear_amid_loss: create_graph=True (double backward, e.g. Hessian-vector products) is "
                "not supported: the gradients are computed chunk by chunk without a graph; use amid.amid_loss on "
                "the logits with grad_in_forward=False to differentiate its gradient")
        cfg = ctx.cfg
        want = cfg.want
        if cfg.reduction_none:
            sh, sw, sb, th, tw, tb, y, kd_w, ce_w, z_w = ctx.saved_tensors
            go = grad_out.to(kd_w.dtype).reshape(-1)
            if ctx.kd_factor is not None:  # return_components: kd_w is unweighted, kd_weight applied here
                kd_w = kd_w * ctx.kd_factor
            _, gh, gw, gb = _run_chunks(sh, sw, sb, th, tw, tb, y, kd_w * go, ce_w * go, z_w * go, cfg, want)
            scale = None
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "amid.fused_linear_amid_loss: backward ran a second time through a loss whose gradients "
                    "were computed in the forward and already handed out; compute the loss again to "
                    "backpropagate once more")
            gh, gw, gb = ctx.grads
            ctx.grads = None  # the gradients are private to this node: scale in place and hand out
            scale = grad_out
        hd, wd, bd = ctx.dtypes
        gh = _finish(gh, scale, hd) if want[0] else None
        gw = _finish(gw, scale, wd) if want[1] else None
        gb = _finish(gb, scale, bd) if want[2] else None
        return (gh, gw, gb) + (None,) * 9


# ------------------------------------------------------------------------------------------------
# Public API

def _is_zero(x: Union[Number, Tensor]) -> bool:
    return not isinstance(x, Tensor) and float(x) == 0.0


def _check_float(fn: str, name: str, x: Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise _error(fn, f"expected {name} of dtype float16, bfloat16, float32 or float64, but got {x.dtype}")


def _weight_value(fn: str, name: str, x: Union[Number, Tensor]) -> Union[float, Tensor]:
    if isinstance(x, Tensor):
        if x.dim() != 0:
            raise _error(fn, f"expected {name} to be a number or a 0-D tensor, but got shape {_shape(x)}")
        return x.detach()
    x = _real(fn, name, x)
    if not math.isfinite(x):
        raise _error(fn, f"expected a finite {name}, but got {x}")
    return x


def _guard_labels(fn: str, y: Tensor, ce_w: Tensor, v: int, ignore_index: int, on_host: bool):
    """Kept labels ``y`` (ignored rows already 0) must index the vocabulary [0, V). ``on_host`` (CPU
    tensors: no device sync): a ValueError naming the first bad label. Otherwise they are not read
    back; a bad row's label becomes 0 (no out-of-bounds gather) and its CE weight NaN, so that
    row's loss and gradient are NaN rather than silently wrong."""
    bad = (y < 0) | (y >= v)
    if on_host:
        if bool(bad.any()):
            raise _error(fn, f"expected labels in [0, {v}) (the vocabulary) or equal to ignore_index={ignore_index}, "
                             f"but got {int(y[bad][0])}")
        return y, ce_w
    return torch.where(bad, 0, y), torch.where(bad, math.nan, ce_w)


def _fused_linear_amid_loss(fn, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                            student_bias, teacher_bias, alpha, lam, divergence, order, ab_alpha, ab_beta,
                            temperature, scale_by_t2, detach_assistant, ignore_index, reduction, normalizer,
                            kd_weight, ce_weight, z_loss_weight, chunk_size, accum_dtype, num_items_in_batch=None,
                            vocab_size=None, return_components=False):
    # ---- argument checks (messages: "amid.<fn>: expected ..., but got ...")
    named = (("student_hidden", student_hidden), ("student_weight", student_weight),
             ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight))
    for name, x in named:
        if not isinstance(x, Tensor):
            raise _error(fn, f"expected {name} to be a tensor, but got {type(x).__name__}")
    for name, x in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if x is not None and not isinstance(x, Tensor):
            raise _error(fn, f"expected {name} to be a tensor or None, but got {type(x).__name__}")
    for name, x in named + (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if x is not None:
            _check_float(fn, name, x)
    if not torch.compiler.is_compiling() and any(
            isinstance(x, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)
            for _, x in named + (("student_bias", student_bias), ("teacher_bias", teacher_bias), ("labels", labels))):
        raise _error(fn, "torch.func transforms (grad, vjp, jacrev, vmap, jvp) are not supported: the gradients are "
                         "computed chunk by chunk inside the forward; use amid.amid_loss on the logits, which "
                         "supports torch.func.grad, vjp, jacrev and vmap")
    for name, x in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if x.dim() < 1:
            raise _error(fn, f"expected {name} of shape [..., H], but got a 0-D tensor")
    for name, x, h in (("student_weight", student_weight, "Hs"), ("teacher_weight", teacher_weight, "Ht")):
        if x.dim() != 2:
            raise _error(fn, f"expected {name} to be 2-D [V, {h}], but got shape {_shape(x)}")
    if vocab_size is not None:
        vocab_size = _check_vocab_size(fn, vocab_size, student_weight.shape[0], teacher_weight.shape[0],
                                       what="LM-head weights")
        # Cut the heads (and biases, checked below against the cut size) to the shared real vocabulary.
        student_weight, teacher_weight = student_weight[:vocab_size], teacher_weight[:vocab_size]
        if isinstance(student_bias, Tensor) and student_bias.dim() == 1:
            student_bias = student_bias[:vocab_size]
        if isinstance(teacher_bias, Tensor) and teacher_bias.dim() == 1:
            teacher_bias = teacher_bias[:vocab_size]
    v = student_weight.shape[0]
    if teacher_weight.shape[0] != v:
        raise _error(fn, "expected student_weight [V, Hs] and teacher_weight [V, Ht] to have the same vocabulary "
                         f"size V, but got {_shape(student_weight)} and {_shape(teacher_weight)} (heads padded to "
                         "different vocabulary sizes with one tokenizer: pass vocab_size= the real vocabulary size "
                         "to compare the shared part)")
    if v < 1:
        raise _error(fn, f"expected a vocabulary of at least 1 entry, but got student_weight of shape "
                         f"{_shape(student_weight)}")
    if student_hidden.shape[-1] != student_weight.shape[1]:
        raise _error(fn, f"expected student_hidden [..., Hs] to match student_weight [V, Hs], but got "
                         f"{_shape(student_hidden)} and {_shape(student_weight)}")
    if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise _error(fn, f"expected teacher_hidden [..., Ht] to match teacher_weight [V, Ht], but got "
                         f"{_shape(teacher_hidden)} and {_shape(teacher_weight)}")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise _error(fn, "expected student_hidden and teacher_hidden to have the same leading (token) dimensions, "
                         f"but got {_shape(student_hidden)} and {_shape(teacher_hidden)}")
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None and tuple(b.shape) != (v,):
            raise _error(fn, f"expected {name} of shape [{v}], but got {_shape(b)}")
    if student_weight.dtype != student_hidden.dtype or (student_bias is not None
                                                        and student_bias.dtype != student_hidden.dtype):
        raise _error(fn, "expected student_hidden, student_weight and student_bias to have the same dtype, but got "
                         f"{student_hidden.dtype}, {student_weight.dtype} and "
                         f"{None if student_bias is None else student_bias.dtype}")
    if teacher_weight.dtype != teacher_hidden.dtype or (teacher_bias is not None
                                                        and teacher_bias.dtype != teacher_hidden.dtype):
        raise _error(fn, "expected teacher_hidden, teacher_weight and teacher_bias to have the same dtype, but got "
                         f"{teacher_hidden.dtype}, {teacher_weight.dtype} and "
                         f"{None if teacher_bias is None else teacher_bias.dtype}")
    device = student_hidden.device
    for name, x in named + (("student_bias", student_bias), ("teacher_bias", teacher_bias), ("labels", labels)):
        if isinstance(x, Tensor) and x.device != device:
            raise _error(fn, f"expected {name} on device {device} (that of student_hidden), but got {x.device}")
    if torch.is_grad_enabled():
        for name, x in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                        ("teacher_bias", teacher_bias)):
            if x is not None and x.requires_grad:
                raise _error(fn, f"expected {name} not to require grad (no gradient flows to the teacher: detach it, "
                                 "freeze the teacher or run it under torch.no_grad()), but it requires grad")
    normalizer = _normalizer_alias(fn, normalizer, num_items_in_batch)
    _check_reduction_args(fn, reduction, normalizer)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise _error(fn, f"expected chunk_size to be None or an integer >= 1, but got {chunk_size!r}")
    ignore_index = _integer(fn, "ignore_index", ignore_index)
    if accum_dtype is not None and accum_dtype not in (torch.float32, torch.float64, student_weight.dtype):
        raise _error(fn, "expected accum_dtype to be None, torch.float32, torch.float64 or the weight's dtype "
                         f"{student_weight.dtype}, but got {accum_dtype}")
    kd_weight = _weight_value(fn, "kd_weight", kd_weight)
    ce_weight = _weight_value(fn, "ce_weight", ce_weight)
    z_loss_weight = _weight_value(fn, "z_loss_weight", z_loss_weight)
    ce_on, z_on, kd_on = not _is_zero(ce_weight), not _is_zero(z_loss_weight), not _is_zero(kd_weight)
    if labels is not None:
        _check_labels(fn, labels, lead, device, what="hidden states")
    elif ce_on:
        raise _error(fn, "expected labels with ce_weight != 0 (the cross-entropy needs hard labels), but got None")
    # The op's own option checks (same messages as the kernels), also when no chunk calls it.
    options = tuple(_loss_options(fn, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature,
                                  detach_assistant).values())
    _ops.check_options("amid_loss_fwd", *options, student_hidden.dtype)

    # ---- flatten and build the per-row weights (mask, reduction, normaliser, T², term weights)
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    n = sh.shape[0]
    dtype = sh.dtype
    ldt = _ops.loss_dtype(dtype)
    mask = None if labels is None else (labels.reshape(-1) != ignore_index)
    if reduction == "batchmean":
        reduction = "mean"
        if normalizer is None:
            normalizer = _batchmean_denominator(mask, lead)
    base = _base_row_weights(mask, n, reduction, normalizer, ldt, device)
    if base is None:
        base = torch.ones(n, dtype=ldt, device=device)
    t2 = float(temperature) ** 2 if (scale_by_t2 and float(temperature) != 1.0) else 1.0

    def _term(wt):
        return base * (wt.to(device=device, dtype=ldt) if isinstance(wt, Tensor) else float(wt))

    comps = None
    if return_components:
        # [kd rows, ce rows, z rows (filled by the chunk loop), kd_weight, whether to compute ce]
        comps = [None, None, None, kd_weight.to(device=device, dtype=ldt) if isinstance(kd_weight, Tensor)
                 else float(kd_weight), labels is not None]
        kd_w = base * t2 if kd_on else torch.zeros_like(base)  # kd_weight is applied in the chunk loop
    else:
        kd_w = _term(kd_weight) * t2 if kd_on else torch.zeros_like(base)
    ce_w = _term(ce_weight) if ce_on else torch.zeros_like(base)
    z_w = _term(z_loss_weight) if z_on else torch.zeros_like(base)
    y = None
    if ce_on or z_on or (return_components and labels is not None):
        y = (torch.zeros(n, dtype=torch.long, device=device) if labels is None
             else torch.where(mask, labels.reshape(-1), 0).long())
        if labels is not None:
            y, ce_w = _guard_labels(fn, y, ce_w, v, ignore_index,
                                    on_host=device.type == "cpu" and not torch.compiler.is_compiling())

    want = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad
                 for x in (student_hidden, student_weight, student_bias))
    acc = accum_dtype if accum_dtype is not None else student_weight.dtype
    if chunk_size is None:
        probe = torch.empty(0, dtype=dtype, device=device)
        chunk_size = default_chunk_size(
            n, v, dtype, teacher_dtype=teacher_hidden.dtype if kd_on else None, ce_or_z=ce_on or z_on,
            accum_dtype=acc if want[1] else None,
            fused_accum=_fused_accum(torch.empty(0, dtype=acc, device=device), probe))
    cfg = _Config(options=options, kd_on=kd_on, ce_on=ce_on, z_on=z_on, chunk=int(chunk_size), accum_dtype=acc,
                  use_kernels=_use_kernels(device, "auto") if kd_on else True, want=want,
                  reduction_none=(reduction == "none"), components=bool(return_components))
    if any(want):
        out = _FusedLinearAMiD.apply(sh, student_weight, student_bias, th, teacher_weight, teacher_bias, y, kd_w,
                                     ce_w, z_w, cfg, comps)
    else:
        rows = _run_chunks(sh, student_weight, student_bias, th, teacher_weight, teacher_bias, y, kd_w, ce_w, z_w,
                           cfg, (False, False, False), comps)[0]
        out = rows if reduction == "none" else rows.sum()
    out = out.reshape(lead) if reduction == "none" else out
    if not return_components:
        return out

    def _reduce(raw, weight):
        if raw is None:
            return None
        # Ignored rows are exactly 0 (even with non-finite logits there); no gradient (for logging).
        r = torch.where(weight != 0, raw * weight, torch.zeros_like(raw)) if weight is not None else raw
        return r.reshape(lead) if reduction == "none" else r.sum()

    kd_raw, ce_raw, z_raw = comps[:3]
    kd = _reduce(kd_raw, None)  # the kernel's rows already carry the reduction weight and T²
    return out, kd, _reduce(ce_raw, base), _reduce(z_raw, base)


def fused_linear_amid_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    alpha: float = DEFAULT_ALPHA,
    lam: float = DEFAULT_LAM,
    divergence: str = "kl",
    order: str = "pr",
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    detach_assistant: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Optional[Union[float, Tensor]] = None,
    kd_weight: Union[float, Tensor] = 1.0,
    ce_weight: Union[float, Tensor] = 0.0,
    z_loss_weight: Union[float, Tensor] = 0.0,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    num_items_in_batch: Optional[Union[float, Tensor]] = None,
    vocab_size: Optional[int] = None,
    return_components: bool = False,
) -> Union[Tensor, Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]]:
    r"""AMiD distillation loss (plus optional CE and z-loss) from hidden states and LM heads, chunked.

    With student logits :math:`s = h_s W_s^\top + b_s` and teacher logits :math:`t = h_t W_t^\top + b_t`
    (computed chunk by chunk, never all at once), the value is

    .. math:: \text{kd\_weight}\cdot\mathrm{AMiD}(s, t)
              + \text{ce\_weight}\cdot\mathrm{CE}(s, y)
              + \text{z\_loss\_weight}\cdot\operatorname{red}\big(\operatorname{logsumexp}(s)^2\big)

    where AMiD is exactly :func:`amid.amid_loss` on the full logits (same options, same ignored rows,
    reduction, ``normalizer`` and optional T²), and CE and the z-loss use the same kept rows and the
    same reduction / normaliser (``'mean'``: Σ over kept rows / number of kept rows or
    ``normalizer``), on the raw student logits (no temperature, no T²).

    Args:
        student_hidden: ``[..., Hs]`` student hidden states (e.g. the base model's last hidden state,
            shifted like the labels); receives a gradient.
        student_weight: ``[V, Hs]`` student LM-head weight (``model.lm_head.weight``); receives a gradient.
        teacher_hidden: ``[..., Ht]`` teacher hidden states, same leading dims; must not require grad.
        teacher_weight: ``[V, Ht]`` teacher LM-head weight, same V; must not require grad.
        labels: optional ``[...]`` integer labels: rows equal to ``ignore_index`` contribute nothing;
            required when ``ce_weight != 0``.
        student_bias, teacher_bias: optional ``[V]`` head biases.
        alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, scale_by_t2, detach_assistant,
            ignore_index, reduction, normalizer, num_items_in_batch: as in :func:`amid.amid_loss` (defaults
            α = 0.5, λ = 0.1; ``'batchmean'`` without labels divides by the first dimension of
            ``student_hidden``).
        vocab_size: use only the first ``vocab_size`` rows of both heads (and biases): the shared real
            vocabulary of heads padded to different sizes; the student's padded rows get a zero gradient.
            Without it both heads must have the same V; nothing is ever padded.
        kd_weight, ce_weight, z_loss_weight: weights of the three terms (numbers or 0-D tensors, not
            differentiated); a term whose weight is the number 0 is skipped (kd_weight=0 skips the teacher GEMM).
        chunk_size: token rows per chunk; default :func:`default_chunk_size` (≈256 MiB of [chunk, V]
            temporaries).
        accum_dtype: dtype of the weight-gradient accumulator: None = the weight's dtype, or
            ``torch.float32`` / ``torch.float64`` (see the module docstring).
        return_components: also return the three terms, unweighted and without gradient, for logging
            (Liger's ``return_soft_hard_loss``): ``(total, kd, ce, z)`` with
            ``total = kd_weight·kd + ce_weight·ce + z_loss_weight·z``, ``kd`` the AMiD value (None when
            ``kd_weight`` is the number 0: its teacher GEMM is skipped), ``ce`` the cross-entropy (None
            without labels; computed even when ``ce_weight`` is 0) and ``z`` the mean of
            ``logsumexp(s)²`` (likewise), each reduced like the loss. Costs one log-sum-exp per row.

    Returns:
        A scalar (``'mean'``/``'sum'``) or ``[...]`` per-row losses (``'none'``), float32 (float64 for
        float64 inputs); with ``return_components`` the tuple above.

    Shapes and dtypes: hidden and head of one model share a dtype (float16/bfloat16/float32/float64);
    the teacher's logits are cast to the student's dtype chunk by chunk. Gradients are in the
    inputs' dtypes.

    Memory: besides the inputs, the chunk's [C, V] temporaries and, until backward, the gradients of
    the student hidden states, head weight (``accum_dtype``) and bias. With ``reduction='none'``
    nothing of size [N, V] or [V, H] is kept; the backward recomputes the chunks instead.
    """
    return _fused_linear_amid_loss(
        "fused_linear_amid_loss", student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        student_bias=student_bias, teacher_bias=teacher_bias, alpha=alpha, lam=lam, divergence=divergence,
        order=order, ab_alpha=ab_alpha, ab_beta=ab_beta, temperature=temperature, scale_by_t2=scale_by_t2,
        detach_assistant=detach_assistant, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
        kd_weight=kd_weight, ce_weight=ce_weight, z_loss_weight=z_loss_weight, chunk_size=chunk_size,
        accum_dtype=accum_dtype, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size,
        return_components=return_components)


class FusedLinearAMiDLoss(nn.Module):
    r"""Module form of :func:`amid.fused_linear_amid_loss` (see there for the math and every option).

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None, normalizer=None, num_items_in_batch=None)``. The options are
    plain attributes (``loss_fn.lam = schedule.value`` works between steps). No arguments: α = 0.5,
    λ = 0.1, KL(p‖r). ``return_components=True`` makes forward return ``(total, kd, ce, z)``.

    Example (transformers)::

        loss_fn = amid.FusedLinearAMiDLoss(alpha=0.5, lam=0.1, divergence="ab", ce_weight=0.1)
        hs = student.model(input_ids).last_hidden_state[:, :-1]
        with torch.no_grad():
            ht = teacher.model(input_ids).last_hidden_state[:, :-1]
        loss = loss_fn(hs, student.lm_head.weight, ht, teacher.lm_head.weight, labels[:, 1:])
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, lam: float = DEFAULT_LAM, divergence: str = "kl",
                 order: str = "pr", *,
                 ab_alpha: float = 0.2, ab_beta: float = 0.7, temperature: float = 1.0, scale_by_t2: bool = False,
                 detach_assistant: bool = False, ignore_index: int = -100, reduction: str = "mean",
                 kd_weight: float = 1.0, ce_weight: float = 0.0, z_loss_weight: float = 0.0,
                 chunk_size: Optional[int] = None, accum_dtype: Optional[torch.dtype] = None,
                 vocab_size: Optional[int] = None, return_components: bool = False) -> None:
        super().__init__()
        fn = "FusedLinearAMiDLoss"
        self.alpha, self.lam = _real(fn, "alpha", alpha), _real(fn, "lam", lam)
        self.divergence, self.order = divergence, order
        self.ab_alpha, self.ab_beta = _real(fn, "ab_alpha", ab_alpha), _real(fn, "ab_beta", ab_beta)
        self.temperature, self.scale_by_t2 = _real(fn, "temperature", temperature), bool(scale_by_t2)
        self.detach_assistant = bool(detach_assistant)
        self.ignore_index, self.reduction = _integer(fn, "ignore_index", ignore_index), reduction
        self.kd_weight, self.ce_weight, self.z_loss_weight = kd_weight, ce_weight, z_loss_weight
        self.chunk_size, self.accum_dtype = chunk_size, accum_dtype
        self.vocab_size, self.return_components = vocab_size, bool(return_components)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                labels: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, normalizer: Optional[Union[float, Tensor]] = None,
                num_items_in_batch: Optional[Union[float, Tensor]] = None):
        return _fused_linear_amid_loss(
            "FusedLinearAMiDLoss", student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, alpha=self.alpha, lam=self.lam,
            divergence=self.divergence, order=self.order, ab_alpha=self.ab_alpha, ab_beta=self.ab_beta,
            temperature=self.temperature, scale_by_t2=self.scale_by_t2, detach_assistant=self.detach_assistant,
            ignore_index=self.ignore_index, reduction=self.reduction, normalizer=normalizer,
            kd_weight=self.kd_weight, ce_weight=self.ce_weight, z_loss_weight=self.z_loss_weight,
            chunk_size=self.chunk_size, accum_dtype=self.accum_dtype, num_items_in_batch=num_items_in_batch,
            vocab_size=self.vocab_size, return_components=self.return_components)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, lam={self.lam}, divergence='{self.divergence}', order='{self.order}', "
                f"temperature={self.temperature}, reduction='{self.reduction}', kd_weight={self.kd_weight}, "
                f"ce_weight={self.ce_weight}, z_loss_weight={self.z_loss_weight}, chunk_size={self.chunk_size}")


# ------------------------------------------------------------------------------------------------
# The generalized JSD from hidden states (Liger's LigerFusedLinearJSDLoss, with amid's options)

def _fused_linear_jsd(fn, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *, beta, endpoints,
                      kd_weight, **kwargs):
    opts = _jsd_options(fn, beta, endpoints)
    if opts is None:  # 'limit' at beta = 0 or 1: the KD term is identically 0 (skipped, as kd_weight=0)
        opts, kd_weight = dict(alpha=-1.0, lam=0.0, divergence="kl", order="jsd"), 0.0
    return _fused_linear_amid_loss(fn, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                   ab_alpha=0.2, ab_beta=0.7, detach_assistant=False, kd_weight=kd_weight,
                                   **opts, **kwargs)


def fused_linear_generalized_jsd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Optional[Tensor] = None,
    *,
    beta: float = 0.5,
    endpoints: str = "kl",
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Optional[Union[float, Tensor]] = None,
    kd_weight: Union[float, Tensor] = 1.0,
    ce_weight: Union[float, Tensor] = 0.0,
    z_loss_weight: Union[float, Tensor] = 0.0,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    num_items_in_batch: Optional[Union[float, Tensor]] = None,
    vocab_size: Optional[int] = None,
    return_components: bool = False,
) -> Union[Tensor, Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]]:
    r"""GKD's generalized JSD(β) (plus optional CE and z-loss) from hidden states and LM heads, chunked:
    :func:`amid.generalized_jsd` of the logits :math:`h_s W_s^\top + b_s` and :math:`h_t W_t^\top + b_t`,
    never materialised whole (Liger's ``LigerFusedLinearJSDLoss``).

    The KD term is :math:`\beta\,\mathrm{KL}(p\|m)+(1-\beta)\,\mathrm{KL}(q\|m)`, m = βp + (1-β)q
    (teacher p, student q), computed for both terms in one pass over each chunk's logits (op order
    ``'jsd'``). ``beta`` and ``endpoints`` as in :func:`amid.generalized_jsd`: by default β = 0 is
    the forward KL(p‖q) and β = 1 the reverse KL(q‖p) (TRL's and Liger's convention); with
    ``endpoints='limit'`` both ends are the textbook 0 (the KD term is then skipped, as with
    ``kd_weight=0``: no teacher GEMM, ``kd`` None in the components).

    Every other argument as in :func:`amid.fused_linear_amid_loss`. Porting Liger's
    ``LigerFusedLinearJSDLoss(weight_hard_loss=a, weight_soft_loss=b, beta=β, temperature=T)``:
    ``fused_linear_generalized_jsd(hs, ws, ht, wt, labels, beta=β, temperature=T, kd_weight=b, ce_weight=a)``
    (the same value: both reduce the KD sum and the CE over the kept tokens).
    """
    fn = "fused_linear_generalized_jsd"
    return _fused_linear_jsd(
        fn, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta=beta, endpoints=endpoints,
        student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature, scale_by_t2=scale_by_t2,
        ignore_index=ignore_index, reduction=reduction, normalizer=normalizer, kd_weight=kd_weight,
        ce_weight=ce_weight, z_loss_weight=z_loss_weight, chunk_size=chunk_size, accum_dtype=accum_dtype,
        num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, return_components=return_components)


class FusedLinearGeneralizedJSD(nn.Module):
    r"""Module form of :func:`amid.fused_linear_generalized_jsd` (Liger's ``LigerFusedLinearJSDLoss``).

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None, normalizer=None, num_items_in_batch=None)``. Options are
    plain attributes (``loss_fn.beta = 0.3`` works between steps).

    Example::

        loss_fn = amid.FusedLinearGeneralizedJSD(beta=0.5, temperature=1.0, kd_weight=0.5, ce_weight=0.5)
        loss = loss_fn(hs, student.lm_head.weight, ht, teacher.lm_head.weight, labels[:, 1:])
    """

    def __init__(self, beta: float = 0.5, *, endpoints: str = "kl", temperature: float = 1.0,
                 scale_by_t2: bool = False, ignore_index: int = -100, reduction: str = "mean",
                 kd_weight: float = 1.0, ce_weight: float = 0.0, z_loss_weight: float = 0.0,
                 chunk_size: Optional[int] = None, accum_dtype: Optional[torch.dtype] = None,
                 vocab_size: Optional[int] = None, return_components: bool = False) -> None:
        super().__init__()
        fn = "FusedLinearGeneralizedJSD"
        self.beta, self.endpoints = _real(fn, "beta", beta), endpoints
        self.temperature, self.scale_by_t2 = _real(fn, "temperature", temperature), bool(scale_by_t2)
        self.ignore_index, self.reduction = _integer(fn, "ignore_index", ignore_index), reduction
        self.kd_weight, self.ce_weight, self.z_loss_weight = kd_weight, ce_weight, z_loss_weight
        self.chunk_size, self.accum_dtype = chunk_size, accum_dtype
        self.vocab_size, self.return_components = vocab_size, bool(return_components)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                labels: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, normalizer: Optional[Union[float, Tensor]] = None,
                num_items_in_batch: Optional[Union[float, Tensor]] = None):
        return _fused_linear_jsd(
            "FusedLinearGeneralizedJSD", student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            beta=self.beta, endpoints=self.endpoints, student_bias=student_bias, teacher_bias=teacher_bias,
            temperature=self.temperature, scale_by_t2=self.scale_by_t2, ignore_index=self.ignore_index,
            reduction=self.reduction, normalizer=normalizer, kd_weight=self.kd_weight, ce_weight=self.ce_weight,
            z_loss_weight=self.z_loss_weight, chunk_size=self.chunk_size, accum_dtype=self.accum_dtype,
            num_items_in_batch=num_items_in_batch, vocab_size=self.vocab_size,
            return_components=self.return_components)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, endpoints='{self.endpoints}', temperature={self.temperature}, "
                f"reduction='{self.reduction}', kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, "
                f"z_loss_weight={self.z_loss_weight}, chunk_size={self.chunk_size}")
