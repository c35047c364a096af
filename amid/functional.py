"""User-facing AMiD losses on logits.

All losses here run on the same op, ``torch.ops.amid.amid_loss_fwd``; the named special cases
(forward / reverse KL, DistiLLM's skew KLs, GKD's generalized JSD, TAID, ABKD) only choose its
options. Reductions, ignored rows, the normaliser and the optional T^2 scale are folded into a
per-row weight computed here with torch ops (no host sync), so the kernel writes the final
gradient in its single pass.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from . import _library
from . import ops as _ops

__all__ = [
    "amid_loss", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd", "taid_loss",
    "ab_divergence",
]

_REDUCTIONS = ("mean", "batchmean", "sum", "none")

#: Defaults of ``alpha`` and ``lam`` (functions and modules): λ = 0.1 is the paper's setting for its
#: main table (D_AB) and its task-specific runs (D_KL); the paper does not report α per table, and
#: α = 0.5 is the official code's default (an intermediate α ∈ (-1, 1), which the paper finds best).
DEFAULT_ALPHA = 0.5
DEFAULT_LAM = 0.1
_warned_fallback = set()


def _error(fn: str, msg: str) -> ValueError:
    return ValueError(f"amid.{fn}: {msg}")


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def _real(fn: str, name: str, x) -> float:
    """A real-valued option (a Python or numpy number, or a one-element tensor) as a float."""
    if not isinstance(x, (str, bytes, bool)) and x is not None:
        try:
            return float(x)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise _error(fn, f"expected {name} to be a real number, but got {x!r}")


def _integer(fn: str, name: str, x) -> int:
    """An integer option (Python or numpy integer) in the int64 range (what labels hold) as an int."""
    if isinstance(x, numbers.Integral) and not isinstance(x, bool) and -2 ** 63 <= int(x) < 2 ** 63:
        return int(x)
    raise _error(fn, f"expected {name} to be an integer in the int64 range, but got {x!r}")


def _option_str(fn: str, name: str, x, allowed: tuple) -> str:
    """A string option; its value is checked by the op (same message), its type here."""
    if not isinstance(x, str):
        raise _error(fn, f"expected {name} to be one of {', '.join(repr(a) for a in allowed)}, but got {x!r}")
    return x


def _loss_options(fn: str, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant) -> dict:
    """The op's options with their Python types checked (their ranges are checked by the op)."""
    return dict(alpha=_real(fn, "alpha", alpha), lam=_real(fn, "lam", lam),
                divergence=_option_str(fn, "divergence", divergence, _ops.DIVERGENCES),
                order=_option_str(fn, "order", order, _ops.ORDERS), ab_alpha=_real(fn, "ab_alpha", ab_alpha),
                ab_beta=_real(fn, "ab_beta", ab_beta), temperature=_real(fn, "temperature", temperature),
                detach_assistant=bool(detach_assistant))


def _use_kernels(device: torch.device, backend: str) -> bool:
    if backend == "reference":
        return False
    if _library.has_kernel(device.type):
        return True
    if backend == "kernels":
        raise RuntimeError(f"amid: this build of amid has no kernels for device type '{device.type}' "
                           f"(build info: {_library.build_info()})")
    if device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        warnings.warn(f"amid: no amid kernels for device type '{device.type}' in this build; using the "
                      "pure-PyTorch reference (slow, memory-hungry)", stacklevel=3)
    return False


def _check_reduction_args(fn: str, reduction: str, normalizer) -> None:
    if reduction not in _REDUCTIONS:
        raise _error(fn, f"expected reduction to be one of 'mean', 'batchmean', 'sum', 'none', but got '{reduction}'")
    if normalizer is not None and reduction not in ("mean", "batchmean"):
        raise _error(fn, f"expected normalizer only with reduction='mean' or 'batchmean', but got "
                         f"reduction='{reduction}'")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise _error(fn, f"expected normalizer to be a number or a 0-D tensor, but got shape {_shape(normalizer)}")
        if normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
            raise _error(fn, f"expected a real normalizer tensor, but got dtype {normalizer.dtype}")
        # A CPU value costs no device sync: checked here like a number. On an accelerator (or while
        # compiling or under torch.func) it is not read back: _base_row_weights turns a value that is
        # not finite and > 0 into a NaN loss and gradient instead.
        if (normalizer.device.type == "cpu" and not torch.compiler.is_compiling()
                and not torch._C._functorch.is_functorch_wrapped_tensor(normalizer)):
            value = normalizer.detach().reshape(()).item()
            if not (math.isfinite(value) and value > 0):
                raise _error(fn, f"expected normalizer > 0, but got {value} (a tensor)")
    elif normalizer is not None:
        if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
            raise _error(fn, f"expected normalizer to be a number or a 0-D tensor, but got {normalizer!r}")
        if not (math.isfinite(normalizer) and normalizer > 0):
            raise _error(fn, f"expected normalizer > 0, but got {normalizer}")


def _normalizer_alias(fn: str, normalizer, num_items_in_batch):
    """``num_items_in_batch`` (the name HF Trainer, TRL and DistillKit use) is ``normalizer``."""
    if num_items_in_batch is None:
        return normalizer
    if normalizer is not None:
        raise _error(fn, "expected at most one of normalizer and num_items_in_batch (the same argument under "
                         "two names), but got both")
    return num_items_in_batch


def _is_dtensor(x) -> bool:
    """x is a torch.distributed.tensor.DTensor (no import of that module when it is not loaded)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def _batchmean_denominator(mask: Optional[Tensor], lead: torch.Size) -> Optional[int]:
    """'batchmean' divides by the number of kept rows when labels are given (= 'mean'), else by the
    size of the first dimension of the [B, ..., V] input, as torch.nn.functional.kl_div and TRL do
    (B sequences of [B, S, V] logits, N rows of [N, V]; 1 for a single row [V])."""
    if mask is not None:
        return None
    return max(int(lead[0]), 1) if len(lead) >= 1 else 1


def _check_vocab_size(fn: str, vocab_size, student_v: int, teacher_v: int, what: str = "logits") -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise _error(fn, f"expected vocab_size to be None or an integer >= 1, but got {vocab_size!r}")
    if vocab_size > min(student_v, teacher_v):
        raise _error(fn, f"expected vocab_size <= the student's and the teacher's vocabulary sizes ({student_v} and "
                         f"{teacher_v} in the {what}), but got {vocab_size}")
    return vocab_size


def _check_labels(fn: str, labels: Tensor, lead: torch.Size, device: torch.device, what: str = "logits") -> None:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise _error(fn, f"expected labels to be an integer tensor, but got {got}")
    if labels.shape != lead:
        raise _error(fn, f"expected labels of shape [{', '.join(map(str, lead))}] (the {what}' leading "
                         f"dimensions), but got {_shape(labels)}")
    if labels.device != device:
        raise _error(fn, f"expected labels on device {device}, but got {labels.device}")


def _base_row_weights(mask: Optional[Tensor], n: int, reduction: str, normalizer, dtype: torch.dtype,
                      device: torch.device) -> Optional[Tensor]:
    """Per-row weights of the reduction, computed with torch ops (no host sync): 1 / 0 for kept /
    ignored rows, divided for 'mean' by the normaliser or the number of kept rows (at least 1, so
    all-ignored gives 0, never NaN). None means all ones."""
    weight = None if mask is None else mask.to(dtype)
    if reduction == "mean":
        if isinstance(normalizer, Tensor):
            denom = normalizer.detach().reshape(()).to(device=device, dtype=dtype)
            # Not checked on the host (no sync): a value that is not finite and > 0 gives NaN, never
            # a silently wrong finite loss (0 -> inf, -2 -> a negated loss).
            denom = torch.where((denom > 0) & torch.isfinite(denom), denom, torch.full_like(denom, math.nan))
        elif normalizer is not None:
            denom = float(normalizer)
        elif mask is not None:
            denom = mask.sum().clamp_min(1).to(dtype)
        else:
            denom = float(max(n, 1))
        weight = (weight if weight is not None else torch.ones(n, dtype=dtype, device=device)) / denom
    return weight



def _row_weights(labels: Optional[Tensor], ignore_index: int, reduction: str, normalizer, lead: torch.Size, n: int,
                 dtype: torch.dtype, device, t2: float = 1.0) -> Optional[Tensor]:
    """The per-row weights of a loss in one [N] vector: the reduction ("batchmean" is "mean" over the
    batch's first dimension unless a normalizer is given), the ignored rows and the T^2 scale ``t2``;
    None when every weight is 1."""
    mask = None if labels is None else (labels.reshape(-1) != ignore_index)
    if reduction == "batchmean":
        reduction = "mean"
        if normalizer is None:
            normalizer = _batchmean_denominator(mask, lead)
    weight = _base_row_weights(mask, n, reduction, normalizer, dtype, device)
    if t2 != 1.0:
        weight = weight * t2 if weight is not None else torch.full((n,), t2, dtype=dtype, device=device)
    return weight

def amid_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
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
    grad_in_forward: Optional[bool] = None,
    backend: str = "auto",
    num_items_in_batch: Optional[Union[float, Tensor]] = None,
    vocab_size: Optional[int] = None,
    _fn: str = "amid_loss",
) -> Tensor:
    r"""AMiD distillation loss: a divergence between two of teacher, student and their α-mixture.

    With teacher :math:`p=\mathrm{softmax}(t/T)` and student :math:`q=\mathrm{softmax}(s/T)`, the
    assistant is the α-mixture

    .. math:: r \propto \big(\lambda p^{k} + (1-\lambda) q^{k}\big)^{1/k},\quad k=\tfrac{1-\alpha}{2}
              \qquad (r \propto p^{\lambda} q^{1-\lambda} \text{ at } \alpha=1),

    for every real α (the paper's definition; the official code maps every α ≥ 1 to α = 1). The
    row loss is ``divergence(x‖y)`` with (x, y) = (p, r), (q, r), (r, p) or (r, q) for ``order``
    'pr', 'qr', 'rp', 'rq', and λ·divergence(p‖r) + (1-λ)·divergence(q‖r) for ``order='jsd'`` (both
    orders against the one assistant, in one pass; at α = -1 with kl, GKD's generalized JSD(β = λ)):
    ``'kl'`` is :math:`\sum x (\log x - \log y)`, ``'ab'`` the α-β divergence
    :math:`-\frac{1}{ab}\sum(x^a y^b - \frac{a}{a+b}x^{a+b} - \frac{b}{a+b}y^{a+b})` with
    a = ``ab_alpha``, b = ``ab_beta``.

    Args:
        student_logits: ``[..., V]`` student logits (the tensor that receives the gradient).
        teacher_logits: ``[..., V]`` teacher logits, same shape, dtype and device; must not require grad.
        labels: optional ``[...]`` integer labels; rows equal to ``ignore_index`` contribute nothing
            (zero loss, zero gradient) and are skipped by the kernels.
        alpha: α of the mixture (any real number); default 0.5. lam: λ ∈ [0, 1], the teacher's weight in
            the mixture; default 0.1. (λ = 0.1 is the paper's setting in its main table, with D_AB, and
            in its task-specific runs, with D_KL; the paper does not state α per table and reports its
            best results at α ∉ {-1, 1}: 0.5 is the official code's default.)
        divergence: ``'kl'`` or ``'ab'``. order: ``'pr'``, ``'qr'``, ``'rp'``, ``'rq'`` or ``'jsd'``.
        ab_alpha, ab_beta: the α-β divergence exponents (> 0), defaults (0.2, 0.7) as in AMiD/ABKD.
        temperature: T > 0; both logits are divided by T. scale_by_t2: multiply the loss by T².
        detach_assistant: no gradient through the student inside r (TAID); only for 'qr' / 'rq'.
        reduction: ``'mean'`` over non-ignored rows (0 when all are ignored); ``'batchmean'``: with
            labels the same as ``'mean'``, without labels the sum divided by the first dimension of the
            ``[B, ..., V]`` input (``torch.nn.functional.kl_div``'s and TRL's meaning: per sequence for
            ``[B, S, V]``, per row for ``[N, V]``); ``'sum'``; or ``'none'`` (per-row losses of shape
            ``[...]``, zero on ignored rows). None of them divides by V (TRL's and ``kl_div``'s
            ``'mean'`` do; see the README's table of reductions).
        normalizer: with ``'mean'``, divide the sum by this (a number or a 0-d tensor) instead of the
            number of non-ignored rows in this call: pass the number of non-ignored tokens of the
            whole accumulated batch so that gradient accumulation over micro-batches gives the
            gradient of one big batch. Also with ``'batchmean'``. It must be finite and > 0: a number
            or a CPU tensor is checked (ValueError); a tensor on an accelerator is not read back (no
            host sync), and a value that is not finite and > 0 makes the loss and gradient NaN.
        num_items_in_batch: another name for ``normalizer`` (HF Trainer's, TRL's and DistillKit's); give
            at most one of the two.
        vocab_size: compare only the first ``vocab_size`` entries of the vocabulary: both logits are
            cut to ``[..., :vocab_size]`` (the shared real vocabulary of heads padded to different
            sizes, e.g. 151936 vs 152064 in the Qwen family; the padded student columns get a zero
            gradient). Without it the two last dimensions must be equal; nothing is ever padded.
        grad_in_forward: write the gradient in the forward pass (one read of the logits, the backward
            only scales it in place). Default: when grad is enabled and ``student_logits`` requires
            grad. With ``False`` the backward recomputes it from the logits (kept alive until then).
        backend: ``'auto'`` (kernels when this build has them for the device, else the reference
            with a warning), ``'kernels'`` or ``'reference'``.

    Returns:
        A scalar (``'mean'``/``'sum'``) or ``[...]`` tensor, float32 (float64 for float64 logits).

    Teacher log-probabilities (what vLLM and SGLang return) can be passed as ``teacher_logits``: the
    loss depends on each row only up to an additive constant, so ``log_softmax(t)`` gives the same
    loss and gradient as ``t``, at any ``temperature`` (log-probabilities sampled at temperature T'
    are the logits ``t / T'``, not ``t``).

    Shapes and dtypes: logits may be float16, bfloat16, float32 or float64; math and accumulation
    are in float32 (float64 for float64); the gradient has the logits' dtype. NaN or +inf logits in
    a non-ignored row make that row's loss and gradient NaN (as do rows whose teacher or student
    logits are all -inf); -inf logits are masked vocabulary entries and give finite gradients.

    Memory: with the gradient written in the forward, the op keeps only that gradient (the size
    of ``student_logits``) until backward; nothing else of size [N, V].

    DTensor logits sharded on the last dimension over a 1-D ``DeviceMesh`` (placements
    ``[Shard(-1)]``) take the vocab-parallel path (:func:`amid.parallel.vocab_parallel_amid_loss`:
    exact, O(N) communication, no gathered logits); the loss is returned as a plain tensor, the same
    on every rank.
    """
    fn = _fn
    if not isinstance(student_logits, Tensor) or not isinstance(teacher_logits, Tensor):
        raise _error(fn, "expected student_logits and teacher_logits to be tensors")
    if not torch.compiler.is_compiling() and (_is_dtensor(student_logits) or _is_dtensor(teacher_logits)):
        from .parallel import dtensor_amid_loss  # the vocabulary is sharded over a DeviceMesh

        return dtensor_amid_loss(
            student_logits, teacher_logits, labels, alpha=alpha, lam=lam, divergence=divergence, order=order,
            ab_alpha=ab_alpha, ab_beta=ab_beta, temperature=temperature, scale_by_t2=scale_by_t2,
            detach_assistant=detach_assistant, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
            grad_in_forward=grad_in_forward, backend=backend, num_items_in_batch=num_items_in_batch,
            vocab_size=vocab_size, _fn=fn)
    if student_logits.dim() < 1:
        raise _error(fn, "expected student_logits of shape [..., V], but got a 0-D tensor")
    if vocab_size is not None and student_logits.dim() == teacher_logits.dim() \
            and student_logits.shape[:-1] == teacher_logits.shape[:-1]:
        vocab_size = _check_vocab_size(fn, vocab_size, student_logits.shape[-1], teacher_logits.shape[-1])
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    if student_logits.shape != teacher_logits.shape:
        hint = ""
        if student_logits.dim() == teacher_logits.dim() and student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            hint = (" (heads padded to different vocabulary sizes with one tokenizer: pass vocab_size= the real "
                    "vocabulary size to compare the shared part)")
        raise _error(fn, "expected student_logits and teacher_logits to have the same shape, but got "
                         f"{_shape(student_logits)} and {_shape(teacher_logits)}{hint}")
    if student_logits.shape[-1] < 1:
        raise _error(fn, "expected a vocabulary of at least 1 entry (logits of shape [..., V] with V >= 1), but "
                         f"got student_logits of shape {_shape(student_logits)}")
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise _error(fn, "expected teacher_logits not to require grad (detach the teacher or run it under "
                         "torch.no_grad()), but it requires grad")
    options = _loss_options(fn, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant)
    ignore_index = _integer(fn, "ignore_index", ignore_index)
    normalizer = _normalizer_alias(fn, normalizer, num_items_in_batch)
    _check_reduction_args(fn, reduction, normalizer)
    if backend not in ("auto", "kernels", "reference"):
        raise _error(fn, f"expected backend to be one of 'auto', 'kernels', 'reference', but got '{backend}'")
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    if labels is not None:
        _check_labels(fn, labels, lead, student_logits.device)

    s = student_logits.reshape(-1, V)
    t = teacher_logits.reshape(-1, V)
    # The kernels need unit stride along V (any row stride): copy only when that is not the case
    # (an empty tensor counts as contiguous whatever its strides, so it is re-strided by clone).
    if V > 1 and s.stride(-1) != 1:
        s = s.contiguous() if s.numel() else s.clone(memory_format=torch.contiguous_format)
    if V > 1 and t.stride(-1) != 1:
        t = t.contiguous() if t.numel() else t.clone(memory_format=torch.contiguous_format)
    n = s.shape[0]
    ldt = _ops.loss_dtype(s.dtype)

    t2 = options["temperature"] ** 2 if scale_by_t2 else 1.0
    weight = _row_weights(labels, ignore_index, reduction, normalizer, lead, n, ldt, s.device, t2)

    if _ops.forward_ad_active(s):
        raise _error(fn, _ops.FORWARD_AD_ERROR)
    if _use_kernels(s.device, backend):
        wants_grad = torch.is_grad_enabled() and s.requires_grad
        if wants_grad and grad_in_forward is not False:
            rows = _ops.GradInForward.apply(s, t, weight, *options.values())[0]
        elif wants_grad:  # the backward recomputes the gradient, differentiably (create_graph=True)
            rows = _ops.RecomputeGrad.apply(s, t, weight, *options.values())[0]
        else:
            rows = _ops.amid_loss_fwd(s, t, weight, compute_grad=False, **options)[0]
    else:
        from .reference import amid_loss_rows

        rows = amid_loss_rows(s.to(ldt), t.to(ldt), **options)
        if weight is not None:
            # Ignored rows are exactly zero even when their logits are NaN (as in the kernels).
            rows = torch.where(weight != 0, rows * weight, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead)
    return rows.sum()


# ------------------------------------------------------------------------------------------------
# Named special cases (spec §6). Each is one setting of amid_loss, checked against its own
# textbook / peer definition in tests/test_special_cases.py.

def _check_unit(fn: str, name: str, x: float) -> None:
    if not (0.0 <= float(x) <= 1.0):
        raise _error(fn, f"expected {name} in [0, 1], but got {x}")


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    r"""Forward KL :math:`\mathrm{KL}(p\|q)=\sum p(\log p-\log q)` (teacher p, student q): AMiD with λ = 0, kl, 'pr'.

    ``kwargs``: temperature, scale_by_t2, ignore_index, reduction, normalizer, grad_in_forward, backend.
    """
    return amid_loss(student_logits, teacher_logits, labels, alpha=1.0, lam=0.0, divergence="kl", order="pr",
                     _fn="forward_kl", **kwargs)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    r"""Reverse KL :math:`\mathrm{KL}(q\|p)`: AMiD with λ = 0, kl, 'rp'."""
    return amid_loss(student_logits, teacher_logits, labels, alpha=1.0, lam=0.0, divergence="kl", order="rp",
                     _fn="reverse_kl", **kwargs)


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                    skew: float = 0.1, **kwargs) -> Tensor:
    r"""DistiLLM's skew forward KL :math:`\mathrm{KL}(p\,\|\,\text{skew}\,p+(1-\text{skew})\,q)`.

    AMiD with α = -1 (arithmetic mixture), λ = skew, kl, 'pr'; gradient through the mixture. DistiLLM's
    code returns the cross-entropy form, which differs from this value by the constant H(p).
    """
    _check_unit("skew_forward_kl", "skew", skew)
    return amid_loss(student_logits, teacher_logits, labels, alpha=-1.0, lam=float(skew), divergence="kl",
                     order="pr", _fn="skew_forward_kl", **kwargs)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                    skew: float = 0.1, **kwargs) -> Tensor:
    r"""DistiLLM's skew reverse KL :math:`\mathrm{KL}(q\,\|\,(1-\text{skew})\,p+\text{skew}\,q)`.

    AMiD with α = -1, λ = 1 - skew (note the flip), kl, 'qr'.
    """
    _check_unit("skew_reverse_kl", "skew", skew)
    return amid_loss(student_logits, teacher_logits, labels, alpha=-1.0, lam=1.0 - float(skew), divergence="kl",
                     order="qr", _fn="skew_reverse_kl", **kwargs)


def _jsd_options(fn: str, beta, endpoints: str) -> Optional[dict]:
    """The op options of the generalized JSD(β) (teacher weight β in the mixture; TRL / Liger), or None
    for the identically-zero loss (β = 0 or 1 with ``endpoints='limit'``)."""
    beta = _real(fn, "beta", beta)
    _check_unit(fn, "beta", beta)
    if endpoints not in ("kl", "limit"):
        raise _error(fn, f"expected endpoints to be 'kl' or 'limit', but got {endpoints!r}")
    if beta == 0.0 or beta == 1.0:
        if endpoints == "limit":
            return None
        # TRL / Liger: beta = 0 -> KL(p || q), beta = 1 -> KL(q || p) (lam = 0: r = q).
        return dict(alpha=1.0, lam=0.0, divergence="kl", order="pr" if beta == 0.0 else "rp")
    # One pass of the op for both terms: order 'jsd' is lam KL(p || r) + (1 - lam) KL(q || r).
    return dict(alpha=-1.0, lam=beta, divergence="kl", order="jsd")


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                    beta: float = 0.5, endpoints: str = "kl", **kwargs) -> Tensor:
    r"""GKD's generalized JSD(β) :math:`\beta\,\mathrm{KL}(p\|m)+(1-\beta)\,\mathrm{KL}(q\|m)`, m = βp + (1-β)q.

    Teacher p, student q. For 0 < β < 1 this is AMiD(α=-1, λ=β, kl, order ``'jsd'``), i.e.
    β·AMiD(α=-1, λ=β, kl, 'pr') + (1-β)·AMiD(α=-1, λ=β, kl, 'qr') computed in one pass over the logits
    (the two terms share the mixture m; each keeps its own small-divergence accuracy), exactly TRL's
    ``generalized_jsd_loss`` and Liger's ``LigerJSD`` (same β, same mixture weights).

    ``endpoints``: what β = 0 and β = 1 mean.

    - ``'kl'`` (default; TRL's and Liger's convention): β = 0 is the forward KL :math:`\mathrm{KL}(p\|q)`
      and β = 1 the reverse KL :math:`\mathrm{KL}(q\|p)`, so code ported from TRL / Liger with
      ``beta=0`` or ``beta=1`` trains on the same objective. (Not continuous: as β → 0 or 1 the JSD
      itself goes to 0.)
    - ``'limit'``: the textbook value, the limit of the formula, which is identically 0 at both ends
      (zero loss and zero gradient).

    ``kwargs``: as :func:`amid_loss` (temperature, scale_by_t2, ignore_index, reduction, normalizer /
    num_items_in_batch, vocab_size, grad_in_forward, backend).
    """
    fn = "generalized_jsd"
    opts = _jsd_options(fn, beta, endpoints)
    if opts is None:  # m equals one of the two distributions: both terms vanish identically
        return 0.0 * amid_loss(student_logits, teacher_logits, labels, alpha=-1.0, lam=float(beta), divergence="kl",
                               order="pr", _fn=fn, **kwargs)
    return amid_loss(student_logits, teacher_logits, labels, _fn=fn, **opts, **kwargs)


def taid_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
              tau: float, **kwargs) -> Tensor:
    r"""TAID's loss :math:`\mathrm{KL}(p_\tau\|q)`, :math:`p_\tau=\mathrm{softmax}(\tau t+(1-\tau)\,\mathrm{sg}(s))`.

    AMiD with α = 1 (geometric mixture), λ = τ, kl, 'rq' and the assistant detached; its gradient is
    q - p_τ. TAID's code returns the cross-entropy form, which differs by the constant H(p_τ).
    ``tau`` is the interpolation time (see :class:`amid.distill.TAIDSchedule` for TAID's adaptive schedule).
    """
    _check_unit("taid_loss", "tau", tau)
    return amid_loss(student_logits, teacher_logits, labels, alpha=1.0, lam=float(tau), divergence="kl",
                     order="rq", detach_assistant=True, _fn="taid_loss", **kwargs)


def ab_divergence(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                  ab_alpha: float = 0.2, ab_beta: float = 0.7, **kwargs) -> Tensor:
    r"""ABKD's α-β divergence :math:`D_{AB}^{(a,b)}(p\|q)`: AMiD with λ = 0, ab, 'pr'."""
    return amid_loss(student_logits, teacher_logits, labels, alpha=1.0, lam=0.0, divergence="ab", order="pr",
                     ab_alpha=ab_alpha, ab_beta=ab_beta, _fn="ab_divergence", **kwargs)
