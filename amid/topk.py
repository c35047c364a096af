"""Sparse-teacher AMiD: dense student logits, a teacher given by its top-k log-probabilities.

    loss = amid.amid_loss_topk(student_logits, teacher_logprobs, teacher_indices, labels,
                               tail="bucket", alpha=0.5, lam=0.1)

Math and gradients: docs/topk.md. Two documented tail rules:

* ``tail="renorm"``: the teacher renormalised on its k tokens, zero elsewhere; exactly the dense
  loss with teacher logits −inf outside the top-k (for α ≥ 1 the assistant's support is then the
  top-k; for α < 1 the student's mass outside it stays in the assistant's normaliser).
* ``tail="bucket"``: teacher and student coarsened to k + 1 bins, the k teacher tokens plus one
  tail bin (the teacher's tail mass ``teacher_tail_logmass``, or 1 − Σ top-k; the student's
  Σ_{v ∉ top-k} q_v), and AMiD taken exactly on those bins.

Implementation: the dedicated op ``torch.ops.amid.amid_loss_topk_fwd`` (C++ CPU kernel, gradient
written in the forward; ``amid_loss_topk_bwd`` recomputes it when the forward stored none). No
[N, V] teacher tensor is built: ``renorm`` runs the dense row math on a per-thread [V] row (the
top-k log-probabilities, −inf elsewhere), ``bucket`` on k + 1 bins built from a gather and the
student's tail log-sum-exp, and spreads the tail bin's gradient over the tail tokens. CUDA tensors
run the op's CUDA kernel (csrc/cuda/amid_topk_cuda.cu: one CTA per row, the same row math; compiled
for sm_90a but not yet run on a GPU, tests/test_topk_cuda.py). Without a kernel for the device (a
build without CUDA kernels, other devices) and with ``backend="dense"`` the loss runs the original
path on the dense op, ``amid_loss_topk_dense`` (renorm: an [N, V] teacher with −inf outside the
top-k; bucket: coarsened [N, k + 1] logits; autograd for the gradient), which is also the tests'
reference.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _library
from . import functional as _F
from . import ops as _ops
from .functional import DEFAULT_ALPHA, DEFAULT_LAM, amid_loss

__all__ = ["amid_loss_topk", "amid_loss_topk_dense", "topk_tail_mass", "TAILS"]

TAILS = ("renorm", "bucket")


def _err(msg: str) -> ValueError:
    return ValueError(f"amid.amid_loss_topk: {msg}")


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def check_topk_inputs(student_logits: Tensor, teacher_logprobs: Tensor, teacher_indices: Tensor,
                      teacher_tail_logmass: Optional[Tensor], tail: str, validate: bool = True) -> None:
    """Shape / dtype / value checks (values: one host sync, skipped with ``validate=False``)."""
    if tail not in TAILS:
        raise _err(f"expected tail to be one of 'renorm', 'bucket', but got {tail!r}")
    s, lp, idx = student_logits, teacher_logprobs, teacher_indices
    if not isinstance(s, Tensor) or s.dim() < 1 or s.shape[-1] < 1:
        raise _err(f"expected student_logits of shape [..., V] with V >= 1, but got "
                   f"{_shape(s) if isinstance(s, Tensor) else type(s).__name__}")
    if not s.is_floating_point():
        raise _err(f"expected floating-point student_logits, but got {s.dtype}")
    if not isinstance(lp, Tensor) or not lp.is_floating_point():
        raise _err(f"expected floating-point teacher_logprobs, but got "
                   f"{lp.dtype if isinstance(lp, Tensor) else type(lp).__name__}")
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise _err(f"expected teacher_indices of dtype int32 or int64, but got "
                   f"{idx.dtype if isinstance(idx, Tensor) else type(idx).__name__}")
    v = s.shape[-1]
    if lp.shape != idx.shape or lp.dim() != s.dim() or lp.shape[:-1] != s.shape[:-1]:
        raise _err(f"expected teacher_logprobs and teacher_indices of shape [..., k] with the leading dims of "
                   f"student_logits {_shape(s)}, but got {_shape(lp)} and {_shape(idx)}")
    k = lp.shape[-1]
    if not 1 <= k <= v:
        raise _err(f"expected 1 <= k <= V = {v} teacher tokens per row, but got k = {k}")
    if lp.device != s.device or idx.device != s.device:
        raise _err(f"expected every tensor on the device of student_logits ({s.device}), but got teacher_logprobs on "
                   f"{lp.device} and teacher_indices on {idx.device}")
    if teacher_tail_logmass is not None:
        if tail != "bucket":
            raise _err("teacher_tail_logmass is only used with tail='bucket'; expected None with tail='renorm'")
        t = teacher_tail_logmass
        if not isinstance(t, Tensor) or t.shape != s.shape[:-1] or not t.is_floating_point():
            want = "[" + ", ".join(str(d) for d in s.shape[:-1]) + "]"
            raise _err(f"expected a floating-point teacher_tail_logmass of shape {want}, but got "
                       f"{_shape(t) if isinstance(t, Tensor) else type(t).__name__}")
    if not validate or idx.numel() == 0 or torch.compiler.is_compiling():  # (the op checks indices itself)
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= v:
        raise _err(f"expected teacher_indices in [0, {v}), but got values from {lo} to {hi}")
    if k > 1:
        srt = idx.reshape(-1, k).sort(dim=-1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(-1)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            raise _err(f"expected distinct teacher_indices in each row, but row {row} repeats an index")
    if bool(torch.isnan(lp).any()) or bool((lp == math.inf).any()):
        raise _err("expected teacher_logprobs to be log-probabilities (finite or -inf), but got NaN or +inf")


def _masked_tail_lse(x: Tensor, idx: Tensor) -> Tensor:
    """log Σ_{v ∉ idx} exp(x_v) per row ([N, V], [N, k] -> [N]); -inf for an empty (or all -inf) tail,
    with a finite gradient (0) in that case."""
    masked = x.scatter(1, idx, float("-inf"))
    empty = ~(masked > float("-inf")).any(-1)
    safe = torch.where(empty.unsqueeze(-1), torch.zeros_like(masked), masked)
    lse = torch.logsumexp(safe, dim=-1)
    return torch.where(empty, torch.full_like(lse, float("-inf")), lse)


def _teacher_tail(lp: Tensor, tail_logmass: Optional[Tensor]) -> Tensor:
    """log(teacher tail mass): given, or log(1 − Σ_k exp(lp)) (-inf when the top-k hold all the mass)."""
    if tail_logmass is not None:
        return tail_logmass.reshape(-1).to(lp.dtype)
    top = torch.logsumexp(lp, dim=-1)
    return torch.where(top < 0, torch.log(-torch.expm1(torch.clamp(top, max=0.0))),
                       torch.full_like(top, float("-inf")))


def coarsen(student_logits: Tensor, teacher_logprobs: Tensor, teacher_indices: Tensor,
            teacher_tail_logmass: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The ``bucket`` bins as logits ([N, k + 1] each, in the loss dtype): the student's
    ``[s_I, LSE(s_{∉I})]`` (differentiable) and the teacher's ``[lp_I, log tail]``."""
    ldt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.to(ldt)
    idx = teacher_indices.long()
    cs = torch.cat([s.gather(1, idx), _masked_tail_lse(s, idx).unsqueeze(-1)], dim=-1)
    lp = teacher_logprobs.to(ldt)
    ct = torch.cat([lp, _teacher_tail(lp, teacher_tail_logmass).unsqueeze(-1)], dim=-1)
    return cs, ct


def renorm_teacher_logits(teacher_logprobs: Tensor, teacher_indices: Tensor, vocab: int,
                          dtype: torch.dtype) -> Tensor:
    """Dense [N, V] teacher logits: the top-k log-probabilities at their indices, -inf elsewhere."""
    t = torch.full((teacher_logprobs.shape[0], vocab), float("-inf"), dtype=dtype, device=teacher_logprobs.device)
    return t.scatter_(1, teacher_indices.long(), teacher_logprobs.to(dtype))


def amid_loss_topk_dense(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_indices: Tensor,
    labels: Optional[Tensor] = None,
    *,
    tail: str = "bucket",
    teacher_tail_logmass: Optional[Tensor] = None,
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
    num_items_in_batch: Optional[Union[float, Tensor]] = None,
    grad_in_forward: Optional[bool] = None,
    validate: bool = True,
) -> Tensor:
    r""":func:`amid_loss_topk` on the dense op (no dedicated kernel): the path on devices without the
    sparse-teacher op, and the reference the op is tested against. Same arguments.

    AMiD loss against a sparse teacher: its top-k log-probabilities and their token indices.

    Args:
        student_logits: ``[..., V]`` student logits (receives the gradient).
        teacher_logprobs: ``[..., k]`` teacher log-probabilities (of the full softmax; any float dtype,
            e.g. float16 from a cache), 1 ≤ k ≤ V.
        teacher_indices: ``[..., k]`` their token ids (int32 / int64), distinct per row, in [0, V).
        labels: optional ``[...]`` labels; rows equal to ``ignore_index`` contribute nothing.
        tail: ``'renorm'`` or ``'bucket'`` (module docstring, docs/topk.md).
        teacher_tail_logmass: ``[...]`` log of the teacher's mass outside its top-k (``'bucket'``;
            default log(1 − Σ exp(teacher_logprobs))).
        alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, scale_by_t2, detach_assistant,
            ignore_index, reduction, normalizer, num_items_in_batch, grad_in_forward: as in
            :func:`amid.amid_loss`. ``'bucket'`` needs temperature 1 (the tail mass at another
            temperature is not determined by the top-k).
        validate: check index range / duplicates and log-probability values (one host sync).

    Returns the reduced loss (float32, float64 for float64 logits), like :func:`amid.amid_loss`.
    """
    check_topk_inputs(student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, tail, validate)
    if tail == "bucket" and float(temperature) != 1.0:
        raise _err(f"expected temperature 1 with tail='bucket' (the teacher's tail mass at another temperature is not "
                   f"determined by its top-k log-probabilities), but got {float(temperature)}; use tail='renorm'")
    v, k = student_logits.shape[-1], teacher_logprobs.shape[-1]
    s = student_logits.reshape(-1, v)
    lp = teacher_logprobs.reshape(-1, k).detach()
    idx = teacher_indices.reshape(-1, k)
    tl = None if teacher_tail_logmass is None else teacher_tail_logmass.reshape(-1).detach()
    opts = dict(alpha=alpha, lam=lam, divergence=divergence, order=order, ab_alpha=ab_alpha, ab_beta=ab_beta,
                temperature=temperature, scale_by_t2=scale_by_t2, detach_assistant=detach_assistant,
                ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                num_items_in_batch=num_items_in_batch, grad_in_forward=grad_in_forward)
    y = None if labels is None else labels.reshape(-1)
    lead = student_logits.shape[:-1]
    if tail == "renorm":
        t = renorm_teacher_logits(lp, idx, v, s.dtype)
        out = amid_loss(s, t, y, _fn="amid_loss_topk", **opts)
    else:
        cs, ct = coarsen(s, lp, idx, tl)
        out = amid_loss(cs, ct, y, _fn="amid_loss_topk", **opts)
    return out.reshape(lead) if reduction == "none" else out


@torch.no_grad()
def topk_tail_mass(student_logits: Tensor, teacher_logprobs: Tensor, teacher_indices: Tensor,
                   teacher_tail_logmass: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-row tail shares (for logging): the teacher's mass outside its top-k and the student's
    mass on those same tokens, each ``[...]`` in float32."""
    v, k = student_logits.shape[-1], teacher_logprobs.shape[-1]
    s = student_logits.reshape(-1, v).float()
    idx = teacher_indices.reshape(-1, k).long()
    lp = teacher_logprobs.reshape(-1, k).float()
    t_tail = _teacher_tail(lp, None if teacher_tail_logmass is None else teacher_tail_logmass.float()).exp()
    s_tail = (_masked_tail_lse(s, idx) - torch.logsumexp(s, -1)).exp()
    lead = student_logits.shape[:-1]
    return t_tail.reshape(lead), s_tail.reshape(lead)


def amid_loss_topk(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_indices: Tensor,
    labels: Optional[Tensor] = None,
    *,
    tail: str = "bucket",
    teacher_tail_logmass: Optional[Tensor] = None,
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
    num_items_in_batch: Optional[Union[float, Tensor]] = None,
    grad_in_forward: Optional[bool] = None,
    validate: bool = True,
    backend: str = "auto",
) -> Tensor:
    r"""AMiD loss against a sparse teacher: its top-k log-probabilities and their token indices.

    Args:
        student_logits: ``[..., V]`` student logits (receives the gradient).
        teacher_logprobs: ``[..., k]`` teacher log-probabilities (of the full softmax; any float dtype,
            e.g. float16 from a cache; the op reads them in float32, float64 for float64 logits), 1 ≤ k ≤ V.
        teacher_indices: ``[..., k]`` their token ids (int32 / int64), distinct per row, in [0, V).
        labels: optional ``[...]`` labels; rows equal to ``ignore_index`` contribute nothing (and are
            not read by the op).
        tail: ``'renorm'`` or ``'bucket'`` (module docstring, docs/topk.md).
        teacher_tail_logmass: ``[...]`` log of the teacher's mass outside its top-k (``'bucket'``;
            default log(1 − Σ exp(teacher_logprobs))).
        alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, scale_by_t2, detach_assistant,
            ignore_index, reduction, normalizer, num_items_in_batch, grad_in_forward: as in
            :func:`amid.amid_loss`. ``'bucket'`` needs temperature 1 (the tail mass at another
            temperature is not determined by the top-k).
        validate: check index range / duplicates and log-probability values up front with a
            ValueError (one host sync). The op checks indices itself as it reads each kept row
            (RuntimeError naming the row), so ``validate=False`` is still safe.
        backend: ``'auto'`` (the sparse-teacher op on CPU tensors, and on CUDA tensors when amid was
            built with its CUDA kernels; the dense-op path elsewhere), ``'op'`` or ``'dense'``
            (:func:`amid_loss_topk_dense`).

    Returns the reduced loss (float32, float64 for float64 logits), like :func:`amid.amid_loss`.
    """
    fn = "amid_loss_topk"
    if backend not in ("auto", "op", "dense"):
        raise _err(f"expected backend to be one of 'auto', 'op', 'dense', but got {backend!r}")
    if backend == "op" and not _ops.HAS_TOPK_OP:
        raise _err(f"backend='op': the loaded native library has no amid_loss_topk_fwd op (build info: "
                   f"{_library.build_info()}); rebuild amid")
    use_op = backend == "op" or (backend == "auto" and _ops.HAS_TOPK_OP and isinstance(student_logits, Tensor)
                                 and (student_logits.device.type == "cpu"
                                      or (student_logits.device.type == "cuda" and _ops.HAS_TOPK_CUDA)))
    if not use_op:
        return amid_loss_topk_dense(
            student_logits, teacher_logprobs, teacher_indices, labels, tail=tail,
            teacher_tail_logmass=teacher_tail_logmass, alpha=alpha, lam=lam, divergence=divergence, order=order,
            ab_alpha=ab_alpha, ab_beta=ab_beta, temperature=temperature, scale_by_t2=scale_by_t2,
            detach_assistant=detach_assistant, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
            num_items_in_batch=num_items_in_batch, grad_in_forward=grad_in_forward, validate=validate)
    check_topk_inputs(student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, tail, validate)
    if tail == "bucket" and float(temperature) != 1.0:
        raise _err(f"expected temperature 1 with tail='bucket' (the teacher's tail mass at another temperature is not "
                   f"determined by its top-k log-probabilities), but got {float(temperature)}; use tail='renorm'")
    options = _F._loss_options(fn, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant)
    ignore_index = _F._integer(fn, "ignore_index", ignore_index)
    normalizer = _F._normalizer_alias(fn, normalizer, num_items_in_batch)
    _F._check_reduction_args(fn, reduction, normalizer)
    lead = student_logits.shape[:-1]
    v, k = student_logits.shape[-1], teacher_logprobs.shape[-1]
    if labels is not None:
        _F._check_labels(fn, labels, lead, student_logits.device)
    s = student_logits.reshape(-1, v)
    if v > 1 and s.stride(-1) != 1:
        s = s.contiguous() if s.numel() else s.clone(memory_format=torch.contiguous_format)
    n = s.shape[0]
    ldt = _ops.loss_dtype(s.dtype)
    lp = teacher_logprobs.detach().reshape(-1, k).to(ldt).contiguous()
    idx = teacher_indices.reshape(-1, k).contiguous()
    tl = None if teacher_tail_logmass is None else teacher_tail_logmass.detach().reshape(-1).to(ldt).contiguous()

    t2 = options["temperature"] ** 2 if scale_by_t2 else 1.0
    weight = _F._row_weights(labels, ignore_index, reduction, normalizer, lead, n, ldt, s.device, t2)

    if _ops.forward_ad_active(s):
        raise _err(_ops.FORWARD_AD_ERROR)
    wants_grad = torch.is_grad_enabled() and s.requires_grad
    if wants_grad and grad_in_forward is not False:
        rows = _ops.TopkGradInForward.apply(s, lp, idx, tl, weight, tail, *options.values())[0]
    else:  # without grad: the loss only; with grad_in_forward=False: the op's autograd recomputes it
        rows = _ops.amid_loss_topk_fwd(s, lp, idx, tl, weight, tail, compute_grad=False, **options)[0]
    if reduction == "none":
        return rows.reshape(lead)
    return rows.sum()
