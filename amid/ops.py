"""The ``torch.ops.amid`` ops: typed wrappers, fake (meta) kernels and autograd.

Schemas and kernels are in C++ (csrc/ops.cpp, csrc/cpu, csrc/cuda). This module adds, per op:
the wrapper, the fake kernel (so torch.compile can trace the op; its checks repeat the C++
messages of csrc/checks.h word for word), and for the forward op the autograd formula.

Autograd design (gradient in the forward): when the student requires grad, ``amid_loss_fwd`` is
called with ``compute_grad=True`` and writes ``d(sum loss)/d student_logits`` in the same pass
that computes the loss, so the logits are read once. The backward then only applies
``grad_loss`` to that stored gradient in place (``scale_grad_``, which leaves rows whose
``grad_loss`` is exactly 1 untouched and needs no host sync) and returns it. Without a stored
gradient the backward recomputes it from the logits and the per-row stats (``amid_loss_bwd``).

Higher derivatives. The stored gradient is a constant, so the gradient-in-forward path refuses
create_graph=True (CREATE_GRAPH_ERROR) rather than hand out a gradient whose derivative would be
silently zero. The recomputing path (``grad_in_forward=False``; the op with ``compute_grad=False``)
is differentiable to every order: its gradient comes from ``amid_loss_bwd`` (LossGrad), whose own
derivatives (Hessian-vector products) are taken by torch.func through the pure-PyTorch reference.
The autograd.Functions used by amid.amid_loss (GradInForward, RecomputeGrad, LossGrad) work under
torch.func.grad / vjp / jacrev / vmap; forward mode (jvp) is refused in amid.amid_loss.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _library

_library.load()

__all__ = ["amid_loss_fwd", "amid_loss_bwd", "scale_grad_", "GradInForward", "RecomputeGrad", "LossGrad", "NUM_STATS",
           "DIVERGENCES", "ORDERS", "amid_loss_topk_fwd", "amid_loss_topk_bwd", "TopkGradInForward", "TAILS",
           "amid_partial_lse", "amid_partial_mix", "amid_partial_sums"]

NUM_STATS = 8  # [A_max, B_max, Z, S_G, K, A_log, B_log, Z2] per row; csrc/amid_math.h kNumStats
MIN_AB_EXPONENT = 1e-30  # csrc/checks.h kMinAbExponent
DIVERGENCES = ("kl", "ab")
ORDERS = ("pr", "qr", "rp", "rq", "jsd")  # "jsd": lam D(p||r) + (1 - lam) D(q||r), one pass
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# c10's names for dtypes (what C++ messages print), so fake-kernel messages match word for word.
_DTYPE_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
                torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
                torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def loss_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the loss, stats, row weights and grad_loss: float64 for float64 logits, else float32."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Checks mirroring csrc/checks.h (used by the fake kernels and by the pure-PyTorch reference).

def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def _dt(d: torch.dtype) -> str:
    return _DTYPE_NAMES.get(d, str(d).replace("torch.", ""))


def _fmt_float(x: float) -> str:
    # C++ streams print doubles with 6 significant digits (%g).
    return "%g" % x


def _check(cond, op: str, msg) -> None:
    torch._check(cond, lambda: f"amid::{op}: {msg() if callable(msg) else msg}")


def check_logits_pair(op: str, s: Tensor, t: Tensor) -> None:
    _check(s.dim() == 2, op, lambda: f"expected student_logits to be 2-D [N, V], but got a {s.dim()}-D tensor of shape {_shape(s)}")
    _check(t.dim() == 2, op, lambda: f"expected teacher_logits to be 2-D [N, V], but got a {t.dim()}-D tensor of shape {_shape(t)}")
    _check(s.shape == t.shape, op, lambda: f"expected student_logits and teacher_logits to have the same shape, but got {_shape(s)} and {_shape(t)}")
    _check(s.size(1) >= 1, op, lambda: f"expected a vocabulary of at least 1 entry, but got student_logits of shape {_shape(s)}")
    _check(s.dtype == t.dtype, op, lambda: f"expected student_logits and teacher_logits to have the same dtype, but got {_dt(s.dtype)} and {_dt(t.dtype)}")
    _check(s.dtype in _DTYPES, op, lambda: f"expected student_logits of dtype float16, bfloat16, float32 or float64, but got {_dt(s.dtype)}")
    _check(s.device == t.device, op, lambda: f"expected student_logits and teacher_logits on the same device, but got {s.device} and {t.device}")
    _check(s.size(1) <= 1 or s.numel() == 0 or s.stride(1) == 1, op, lambda: f"expected student_logits to have stride 1 in the last dimension, but got stride {s.stride(1)}")
    _check(t.size(1) <= 1 or t.numel() == 0 or t.stride(1) == 1, op, lambda: f"expected teacher_logits to have stride 1 in the last dimension, but got stride {t.stride(1)}")


def check_row_vector(op: str, name: str, x: Tensor, logits: Tensor) -> None:
    want = loss_dtype(logits.dtype)
    _check(x.dim() == 1 and x.size(0) == logits.size(0), op, lambda: f"expected {name} of shape [{logits.size(0)}], but got {_shape(x)}")
    _check(x.dtype == want, op, lambda: f"expected {name} of dtype {_dt(want)}, but got {_dt(x.dtype)}")
    _check(x.device == logits.device, op, lambda: f"expected {name} on device {logits.device}, but got {x.device}")


def check_options(op: str, alpha: float, lam: float, divergence: str, order: str, ab_alpha: float,
                  ab_beta: float, temperature: float, detach_assistant: bool,
                  math_dtype: torch.dtype = torch.float32) -> None:
    import math
    _check(math.isfinite(alpha), op, lambda: f"expected a finite alpha, but got {_fmt_float(alpha)}")
    _check(0.0 <= lam <= 1.0, op, lambda: f"expected lam in [0, 1], but got {_fmt_float(lam)}")
    _check(math.isfinite(temperature) and temperature > 0.0, op, lambda: f"expected temperature > 0, but got {_fmt_float(temperature)}")
    # The kernels multiply by 1/T in the math dtype (float64 for float64 logits, else float32).
    fmax = torch.finfo(torch.float64 if math_dtype == torch.float64 else torch.float32).max
    _check(1.0 / temperature <= fmax, op, lambda: (
        f"expected temperature >= {_fmt_float(1.0 / fmax)} (its inverse must be finite in "
        f"{'float64' if math_dtype == torch.float64 else 'float32'} math), but got {_fmt_float(temperature)}"))
    _check(divergence in DIVERGENCES, op, lambda: f"expected divergence to be one of 'kl', 'ab', but got '{divergence}'")
    _check(order in ORDERS, op, lambda: f"expected order to be one of 'pr', 'qr', 'rp', 'rq', 'jsd', but got '{order}'")
    if divergence == "ab":
        _check(math.isfinite(ab_alpha) and ab_alpha > 0.0, op, lambda: f"expected ab_alpha > 0 for the alpha-beta divergence, but got {_fmt_float(ab_alpha)}")
        _check(math.isfinite(ab_beta) and ab_beta > 0.0, op, lambda: f"expected ab_beta > 0 for the alpha-beta divergence, but got {_fmt_float(ab_beta)}")
        _check(ab_alpha >= MIN_AB_EXPONENT, op, lambda: f"expected ab_alpha >= {_fmt_float(MIN_AB_EXPONENT)} for the alpha-beta divergence, but got {_fmt_float(ab_alpha)}")
        _check(ab_beta >= MIN_AB_EXPONENT, op, lambda: f"expected ab_beta >= {_fmt_float(MIN_AB_EXPONENT)} for the alpha-beta divergence, but got {_fmt_float(ab_beta)}")
    _check(not detach_assistant or order != "jsd", op, lambda: (
        "expected detach_assistant=False with order 'jsd' (a detached assistant is supported for 'qr' and 'rq' "
        "only), but got detach_assistant=True"))
    _check(not detach_assistant or order in ("qr", "rq"), op, lambda: (
        f"expected order 'qr' or 'rq' with detach_assistant=True (in '{order}' the student enters only "
        f"through the assistant, so detaching it leaves no gradient), but got order '{order}'"))


# ------------------------------------------------------------------------------------------------
# amid_loss_fwd

def amid_loss_fwd(student_logits: Tensor, teacher_logits: Tensor, row_weight: Optional[Tensor], alpha: float,
                  lam: float, divergence: str, order: str, ab_alpha: float, ab_beta: float, temperature: float,
                  detach_assistant: bool, compute_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row AMiD loss; see the schema comment in csrc/ops.cpp. Returns (loss [N], stats [N, NUM_STATS], grad)."""
    return torch.ops.amid.amid_loss_fwd.default(student_logits, teacher_logits, row_weight, float(alpha), float(lam),
                                                divergence, order, float(ab_alpha), float(ab_beta), float(temperature),
                                                bool(detach_assistant), bool(compute_grad))


@torch.library.register_fake("amid::amid_loss_fwd")
def _amid_loss_fwd_fake(student_logits, teacher_logits, row_weight, alpha, lam, divergence, order, ab_alpha, ab_beta,
                        temperature, detach_assistant, compute_grad):
    op = "amid_loss_fwd"
    check_logits_pair(op, student_logits, teacher_logits)
    if row_weight is not None:
        check_row_vector(op, "row_weight", row_weight, student_logits)
    check_options(op, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant,
                  student_logits.dtype)
    n, v = student_logits.shape
    ldt = loss_dtype(student_logits.dtype)
    loss = student_logits.new_empty((n,), dtype=ldt)
    stats = student_logits.new_empty((n, NUM_STATS), dtype=ldt)
    grad = student_logits.new_empty((n, v) if compute_grad else (0,))
    return loss, stats, grad


def _fwd_setup_context(ctx, inputs, output):
    (student_logits, teacher_logits, row_weight, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature,
     detach_assistant, compute_grad) = inputs
    _loss, stats, grad = output
    ctx.mark_non_differentiable(stats, grad)
    ctx.set_materialize_grads(False)  # no zeros for the unused gradients of stats and the [N, V] grad
    ctx.compute_grad = compute_grad
    ctx.options = (alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant)
    if compute_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(student_logits, teacher_logits, row_weight, stats)


def _check_backward_inputs(ctx) -> None:
    if ctx.needs_input_grad[1]:
        raise RuntimeError("amid::amid_loss_fwd: gradients with respect to teacher_logits are not supported; "
                           "detach the teacher (compute it under torch.no_grad())")
    if ctx.needs_input_grad[2]:
        raise RuntimeError("amid::amid_loss_fwd: gradients with respect to row_weight are not supported; "
                           "pass a row_weight that does not require grad")


#: Raised when a gradient written in the forward (a constant) would be differentiated again.
CREATE_GRAPH_ERROR = (
    "amid::amid_loss_fwd: create_graph=True (double backward, e.g. Hessian-vector products) through a loss whose "
    "gradient was computed in the forward (grad_in_forward=True, the default when the student requires grad) is "
    "not supported: that gradient is a constant, so its derivatives would be silently wrong; call the loss with "
    "grad_in_forward=False to differentiate its gradient")


FORWARD_AD_ERROR = (
    "forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not supported; use reverse "
    "mode (torch.func.grad, vjp, jacrev; torch.autograd.grad with grad_in_forward=False for second derivatives)")


def forward_ad_active(x: Tensor) -> bool:
    """Whether ``x`` carries a forward-mode tangent (torch.func.jvp or torch.autograd.forward_ad)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        if any(i.key() == torch._C._functorch.TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
            return True
    import torch.autograd.forward_ad as fwad

    return fwad._current_level >= 0 and fwad.unpack_dual(x).tangent is not None


def _functorch_level() -> Optional[int]:
    """The torch.func transform level of the current call (None outside torch.func)."""
    if torch.compiler.is_compiling():
        return None
    return torch._C._functorch.maybe_current_level()


def _refuse_create_graph(level: Optional[int]) -> None:
    """In the backward of a gradient written in the forward (recorded at torch.func ``level``):
    raise CREATE_GRAPH_ERROR when that backward is itself being differentiated, i.e. under
    create_graph=True, or when a differentiating torch.func transform other than the one that
    recorded the node is active (nested grad / vjp / jacrev). One torch.func.grad or vjp alone runs
    its backward with create_graph=True as well, but differentiates only once: allowed."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    diff = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    others = [i for i in retrieve_all_functorch_interpreters() if i.key() in diff and i.level() != level]
    if level is None or others:
        raise RuntimeError(CREATE_GRAPH_ERROR)


def _is_functorch_wrapped(x: torch.Tensor) -> bool:
    """x is a torch.func (vmap / grad) wrapper, where the in-place scale_grad_ has no batching rule."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x)


def _scaled_copy(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad * grad_loss[:, None] in grad's dtype, without the fp32 [N, V] temporary that multiplying a
    bf16 / fp16 gradient by an fp32 vector makes: a copy scaled in place by the scale_grad_ op (fp32 math per
    element, as the product). Out of place under torch.func.vmap (no batching rule for the in-place op)."""
    if _is_functorch_wrapped(grad):
        return (grad * grad_loss.unsqueeze(-1)).to(grad.dtype)
    out = grad.clone()
    torch.ops.amid.scale_grad_.default(out, grad_loss.contiguous())
    return out


def _fwd_backward(ctx, grad_loss, _grad_stats, _grad_grad):
    # The op-level formula is functional (the gradient output may be held by the caller, so it is
    # never modified); amid.amid_loss uses the in-place fast path of GradInForward below.
    nones = (None,) * 11
    if grad_loss is None:  # only the non-differentiable outputs were used
        return (None,) + nones
    _check_backward_inputs(ctx)
    if not ctx.needs_input_grad[0]:
        return (None,) + nones
    if ctx.compute_grad:
        (grad,) = ctx.saved_tensors
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # (never under torch.func)
            raise RuntimeError(CREATE_GRAPH_ERROR)
        return (_scaled_copy(grad, grad_loss),) + nones
    student_logits, teacher_logits, row_weight, stats = ctx.saved_tensors
    # Differentiable (create_graph=True): LossGrad's backward is the reference's second derivative.
    grad = LossGrad.apply(grad_loss, student_logits, teacher_logits, row_weight, stats, *ctx.options)
    return (grad,) + nones


torch.library.register_autograd("amid::amid_loss_fwd", _fwd_backward, setup_context=_fwd_setup_context)


def _grad_in_forward_setup(ctx, output) -> None:
    """setup_context of the gradient-in-forward nodes (GradInForward, TopkGradInForward): output is
    (loss, grad), grad the op's gradient, saved to be handed out once."""
    _loss, grad = output
    ctx.mark_non_differentiable(grad)
    # No zeros for the unused gradient of the `grad` output: materialised, that is one more [N, V]
    # tensor (measured: the step's peak memory doubled).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    ctx.grad_consumed = False
    ctx.functorch_level = _functorch_level()


def _hand_out_grad(ctx, grad_loss: Tensor, op: str) -> Tensor:
    """Backward of a gradient-in-forward node of op: the saved gradient scaled by grad_loss, in place
    (out of place under torch.func.vmap, see _scaled_copy), once; a second backward or create_graph=True
    raise."""
    if ctx.grad_consumed:
        raise RuntimeError(
            f"amid::{op}: backward ran a second time through a loss whose gradient was computed in "
            "the forward and already handed out; call the loss with grad_in_forward=False to backpropagate "
            "through it more than once")
    try:
        _refuse_create_graph(ctx.functorch_level)
    except RuntimeError:
        raise RuntimeError(CREATE_GRAPH_ERROR.replace("amid::amid_loss_fwd", f"amid::{op}")) from None
    ctx.grad_consumed = True
    (grad,) = ctx.saved_tensors
    if _is_functorch_wrapped(grad):
        return _scaled_copy(grad, grad_loss)
    torch.ops.amid.scale_grad_.default(grad, grad_loss.contiguous())
    return grad


class GradInForward(torch.autograd.Function):
    """Training fast path of amid.amid_loss: the op writes the gradient in the forward (one read of
    the logits); the backward applies grad_loss to it in place (rows with grad_loss == 1 are not
    touched, no host sync) and hands it out. The gradient is private to this node, so the in-place
    update is invisible to the caller; a second backward through the node is refused, and so is
    create_graph=True (CREATE_GRAPH_ERROR: the handed-out gradient is a constant).

    ``apply(...)`` returns (loss, grad); callers use only the loss. The forward/setup_context split
    makes it usable under torch.func transforms (torch.func.grad, vjp, jacrev)."""

    generate_vmap_rule = True  # torch.func.vmap runs the ops once per sample

    @staticmethod
    def forward(student_logits, teacher_logits, row_weight, alpha, lam, divergence, order, ab_alpha, ab_beta,
                temperature, detach_assistant):
        loss, _stats, grad = torch.ops.amid.amid_loss_fwd.default(
            student_logits, teacher_logits, row_weight, alpha, lam, divergence, order, ab_alpha, ab_beta,
            temperature, detach_assistant, True)
        return loss, grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        _grad_in_forward_setup(ctx, output)

    @staticmethod
    def backward(ctx, grad_loss, _grad_grad):
        if grad_loss is None:  # only the non-differentiable `grad` output was used
            return (None,) * 11
        _check_backward_inputs(ctx)
        return (_hand_out_grad(ctx, grad_loss, "amid_loss_fwd"),) + (None,) * 10


class RecomputeGrad(torch.autograd.Function):
    """amid.amid_loss with grad_in_forward=False: the forward keeps the logits and the per-row stats,
    the backward recomputes the gradient with amid_loss_bwd (through LossGrad, so the gradient is
    itself differentiable: create_graph=True, Hessian-vector products). The same formula as the
    op's registered autograd, as a torch.func-compatible Function. ``apply`` returns (loss, stats)."""

    generate_vmap_rule = True  # torch.func.vmap runs the ops once per sample

    @staticmethod
    def forward(student_logits, teacher_logits, row_weight, alpha, lam, divergence, order, ab_alpha, ab_beta,
                temperature, detach_assistant):
        loss, stats, _grad = torch.ops.amid.amid_loss_fwd.default(
            student_logits, teacher_logits, row_weight, alpha, lam, divergence, order, ab_alpha, ab_beta,
            temperature, detach_assistant, False)
        return loss, stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        student_logits, teacher_logits, row_weight = inputs[:3]
        ctx.options = tuple(inputs[3:])
        _loss, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(student_logits, teacher_logits, row_weight, stats)

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        _check_backward_inputs(ctx)
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        student_logits, teacher_logits, row_weight, stats = ctx.saved_tensors
        grad = LossGrad.apply(grad_loss, student_logits, teacher_logits, row_weight, stats, *ctx.options)
        return (grad,) + (None,) * 10


_OPTION_NAMES = ("alpha", "lam", "divergence", "order", "ab_alpha", "ab_beta", "temperature", "detach_assistant")


def _reference_grad_vjp(grad_loss: Tensor, student_logits: Tensor, teacher_logits: Tensor,
                        row_weight: Optional[Tensor], v: Tensor, options: tuple, need_grad_loss: bool,
                        need_student: bool):
    """Derivatives of <v, G> with G = d(sum grad_loss * row_weight * L)/d student_logits (what
    amid_loss_bwd returns), w.r.t. grad_loss and student_logits: the second derivative of the loss,
    by torch.func through the pure-PyTorch reference (amid.reference) in the loss dtype. It is
    itself differentiable (create_graph=True again, or nested torch.func transforms), so every
    order works."""
    from .reference import amid_loss_rows

    ldt = loss_dtype(student_logits.dtype)
    opts = dict(zip(_OPTION_NAMES, options))
    t = teacher_logits.detach().to(ldt)
    rw = None if row_weight is None else row_weight.detach()
    zero = torch.zeros((), dtype=ldt, device=student_logits.device)

    def grad_of_loss(s: Tensor, gl: Tensor) -> Tensor:
        w = gl if rw is None else gl * rw
        keep = w != 0

        def total(s_: Tensor) -> Tensor:
            # Skipped rows (weight 0) may hold anything (NaN logits): they enter as zeros, as in the kernels.
            sx = torch.where(keep.unsqueeze(-1), s_.to(ldt), zero)
            tx = torch.where(keep.unsqueeze(-1), t, zero)
            rows = amid_loss_rows(sx, tx, **opts)
            return torch.where(keep, rows * w, torch.zeros_like(rows)).sum()

        return torch.func.grad(total)(s)

    _g, vjp_fn = torch.func.vjp(grad_of_loss, student_logits, grad_loss)
    g_s, g_gl = vjp_fn(v.to(student_logits.dtype))
    return (g_gl if need_grad_loss else None), (g_s if need_student else None)


class LossGrad(torch.autograd.Function):
    """G = amid_loss_bwd(grad_loss, student_logits, ...) as a differentiable function of grad_loss and
    student_logits: the value from the kernel, its derivatives (second derivatives of the loss:
    Hessian-vector products, create_graph=True) from the reference (_reference_grad_vjp)."""

    generate_vmap_rule = True  # torch.func.vmap runs the ops once per sample

    @staticmethod
    def forward(grad_loss, student_logits, teacher_logits, row_weight, stats, alpha, lam, divergence, order,
                ab_alpha, ab_beta, temperature, detach_assistant):
        return torch.ops.amid.amid_loss_bwd.default(grad_loss, student_logits, teacher_logits, row_weight, stats,
                                                    alpha, lam, divergence, order, ab_alpha, ab_beta, temperature,
                                                    detach_assistant)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_loss, student_logits, teacher_logits, row_weight = inputs[:4]
        ctx.options = tuple(inputs[5:])
        ctx.save_for_backward(grad_loss, student_logits, teacher_logits, row_weight)

    @staticmethod
    def backward(ctx, v):
        if ctx.needs_input_grad[2]:
            raise RuntimeError("amid::amid_loss_bwd: gradients with respect to teacher_logits are not supported; "
                               "detach the teacher (compute it under torch.no_grad())")
        if ctx.needs_input_grad[3]:
            raise RuntimeError("amid::amid_loss_bwd: gradients with respect to row_weight are not supported; "
                               "pass a row_weight that does not require grad")
        grad_loss, student_logits, teacher_logits, row_weight = ctx.saved_tensors
        g_gl, g_s = _reference_grad_vjp(grad_loss, student_logits, teacher_logits, row_weight, v, ctx.options,
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (g_gl, g_s) + (None,) * 11


# ------------------------------------------------------------------------------------------------
# amid_loss_bwd

def amid_loss_bwd(grad_loss: Tensor, student_logits: Tensor, teacher_logits: Tensor, row_weight: Optional[Tensor],
                  stats: Tensor, alpha: float, lam: float, divergence: str, order: str, ab_alpha: float,
                  ab_beta: float, temperature: float, detach_assistant: bool) -> Tensor:
    """Gradient of sum(grad_loss * loss) w.r.t. student_logits, from the stats of amid_loss_fwd."""
    return torch.ops.amid.amid_loss_bwd.default(grad_loss, student_logits, teacher_logits, row_weight, stats,
                                                float(alpha), float(lam), divergence, order, float(ab_alpha),
                                                float(ab_beta), float(temperature), bool(detach_assistant))


@torch.library.register_fake("amid::amid_loss_bwd")
def _amid_loss_bwd_fake(grad_loss, student_logits, teacher_logits, row_weight, stats, alpha, lam, divergence, order,
                        ab_alpha, ab_beta, temperature, detach_assistant):
    op = "amid_loss_bwd"
    check_logits_pair(op, student_logits, teacher_logits)
    check_row_vector(op, "grad_loss", grad_loss, student_logits)
    if row_weight is not None:
        check_row_vector(op, "row_weight", row_weight, student_logits)
    want = loss_dtype(student_logits.dtype)
    n = student_logits.size(0)
    _check(stats.dim() == 2 and stats.size(0) == n and stats.size(1) == NUM_STATS, op,
           lambda: f"expected stats of shape [{n}, {NUM_STATS}], but got {_shape(stats)}")
    _check(stats.dtype == want, op, lambda: f"expected stats of dtype {_dt(want)}, but got {_dt(stats.dtype)}")
    _check(stats.device == student_logits.device, op,
           lambda: f"expected stats on device {student_logits.device}, but got {stats.device}")
    check_options(op, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant,
                  student_logits.dtype)
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


def _bwd_setup_context(ctx, inputs, output):
    grad_loss, student_logits, teacher_logits, row_weight = inputs[:4]
    ctx.options = tuple(inputs[5:])
    ctx.save_for_backward(grad_loss, student_logits, teacher_logits, row_weight)


def _bwd_backward(ctx, v):
    # The op called directly and differentiated (create_graph=True): same formula as LossGrad.
    return LossGrad.backward(ctx, v)


torch.library.register_autograd("amid::amid_loss_bwd", _bwd_backward, setup_context=_bwd_setup_context)


# ------------------------------------------------------------------------------------------------
# scale_grad_

def scale_grad_(grad: Tensor, grad_loss: Tensor) -> None:
    """In place ``grad[n, :] *= grad_loss[n]``; rows with grad_loss exactly 1 are not touched."""
    torch.ops.amid.scale_grad_.default(grad, grad_loss)


@torch.library.register_fake("amid::scale_grad_")
def _scale_grad_fake(grad, grad_loss):
    op = "scale_grad_"
    _check(grad.dim() == 2 and grad.is_contiguous(), op,
           lambda: f"expected grad to be a contiguous 2-D [N, V] tensor, but got shape {_shape(grad)}")
    _check(grad.dtype in _DTYPES, op,
           lambda: f"expected grad of dtype float16, bfloat16, float32 or float64, but got {_dt(grad.dtype)}")
    check_row_vector(op, "grad_loss", grad_loss, grad)
    return None


# ------------------------------------------------------------------------------------------------
# amid_loss_topk_fwd / amid_loss_topk_bwd: AMiD against a sparse (top-k) teacher (docs/topk.md).
# Autograd as for amid_loss_fwd: with compute_grad the forward wrote the gradient (the backward
# scales a copy; amid.amid_loss_topk scales it in place through TopkGradInForward), else the
# backward recomputes it with amid_loss_topk_bwd. Second derivatives are not supported.

TAILS = ("renorm", "bucket")
_INDEX_DTYPES = (torch.int32, torch.int64)
#: Whether the loaded native library has the sparse-teacher ops (a library built before them has not:
#: amid.amid_loss_topk then runs its dense-op path).
HAS_TOPK_OP = hasattr(torch.ops.amid, "amid_loss_topk_fwd")
#: Whether the op has CUDA kernels (csrc/cuda/amid_topk_cuda.cu, in every build with the CUDA kernels; a build
#: without them registers an error stub at CUDA, and amid.amid_loss_topk runs its dense-op path on CUDA tensors).
HAS_TOPK_CUDA = HAS_TOPK_OP and _library.has_kernel("cuda")


def check_topk_args(op: str, s: Tensor, lp: Tensor, idx: Tensor, tail_logmass: Optional[Tensor],
                    row_weight: Optional[Tensor], tail: str, temperature: float) -> None:
    """csrc/cpu/amid_loss_cpu.cpp check_topk_args (parse_tail first), message for message."""
    _check(tail in TAILS, op, lambda: f"expected tail to be one of 'renorm', 'bucket', but got '{tail}'")
    _check(s.dim() == 2, op, lambda: f"expected student_logits to be 2-D [N, V], but got a {s.dim()}-D tensor of shape {_shape(s)}")
    _check(s.size(1) >= 1, op, lambda: f"expected a vocabulary of at least 1 entry, but got student_logits of shape {_shape(s)}")
    _check(s.dtype in _DTYPES, op, lambda: f"expected student_logits of dtype float16, bfloat16, float32 or float64, but got {_dt(s.dtype)}")
    _check(s.size(1) <= 1 or s.numel() == 0 or s.stride(1) == 1, op, lambda: f"expected student_logits to have stride 1 in the last dimension, but got stride {s.stride(1)}")
    n, v = s.shape
    _check(lp.dim() == 2 and lp.size(0) == n and 1 <= lp.size(1) <= v, op,
           lambda: f"expected teacher_logprobs of shape [N, k] with N = {n} and 1 <= k <= V = {v}, but got {_shape(lp)}")
    want = loss_dtype(s.dtype)
    _check(lp.dtype == want, op, lambda: f"expected teacher_logprobs of dtype {_dt(want)}, but got {_dt(lp.dtype)}")
    _check(lp.device == s.device, op, lambda: f"expected teacher_logprobs on device {s.device}, but got {lp.device}")
    _check(idx.shape == lp.shape, op, lambda: f"expected teacher_indices of shape {_shape(lp)}, but got {_shape(idx)}")
    _check(idx.dtype in _INDEX_DTYPES, op, lambda: f"expected teacher_indices of dtype Int or Long, but got {_dt(idx.dtype)}")
    _check(idx.device == s.device, op, lambda: f"expected teacher_indices on device {s.device}, but got {idx.device}")
    if tail_logmass is not None:
        _check(tail == "bucket", op, "expected teacher_tail_logmass only with tail 'bucket', but got it with tail 'renorm'")
        check_row_vector(op, "teacher_tail_logmass", tail_logmass, s)
    if row_weight is not None:
        check_row_vector(op, "row_weight", row_weight, s)
    _check(tail != "bucket" or temperature == 1.0, op, lambda: (
        "expected temperature 1 with tail 'bucket' (the teacher's tail mass at another temperature is not "
        f"determined by its top-k log-probabilities), but got {_fmt_float(temperature)}"))


def amid_loss_topk_fwd(student_logits: Tensor, teacher_logprobs: Tensor, teacher_indices: Tensor,
                       teacher_tail_logmass: Optional[Tensor], row_weight: Optional[Tensor], tail: str, alpha: float,
                       lam: float, divergence: str, order: str, ab_alpha: float, ab_beta: float, temperature: float,
                       detach_assistant: bool, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """Per-row sparse-teacher AMiD; see the schema comment in csrc/ops.cpp. Returns (loss [N], grad)."""
    return torch.ops.amid.amid_loss_topk_fwd.default(
        student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tail, float(alpha),
        float(lam), divergence, order, float(ab_alpha), float(ab_beta), float(temperature), bool(detach_assistant),
        bool(compute_grad))


def _amid_loss_topk_fwd_fake(student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight,
                             tail, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant,
                             compute_grad):
    op = "amid_loss_topk_fwd"
    check_topk_args(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tail,
                    temperature)
    check_options(op, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant,
                  student_logits.dtype)
    n, v = student_logits.shape
    loss = student_logits.new_empty((n,), dtype=loss_dtype(student_logits.dtype))
    grad = student_logits.new_empty((n, v) if compute_grad else (0,))
    return loss, grad


def _topk_check_backward_inputs(ctx, op: str) -> None:
    for i, name in ((1, "teacher_logprobs"), (3, "teacher_tail_logmass"), (4, "row_weight")):
        if ctx.needs_input_grad[i]:
            raise RuntimeError(f"amid::{op}: gradients with respect to {name} are not supported; pass a {name} "
                               "that does not require grad")


def _topk_fwd_setup_context(ctx, inputs, output):
    student_logits, lp, idx, tl, row_weight = inputs[:5]
    _loss, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.compute_grad = inputs[-1]
    ctx.options = tuple(inputs[5:-1])  # tail, alpha, ..., detach_assistant
    if ctx.compute_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(student_logits, lp, idx, tl, row_weight)


def _topk_fwd_backward(ctx, grad_loss, _grad_grad):
    _topk_check_backward_inputs(ctx, "amid_loss_topk_fwd")
    nones = (None,) * 14
    if not ctx.needs_input_grad[0]:
        return (None,) + nones
    if ctx.compute_grad:
        (grad,) = ctx.saved_tensors
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(CREATE_GRAPH_ERROR.replace("amid::amid_loss_fwd", "amid::amid_loss_topk_fwd"))
        return (_scaled_copy(grad, grad_loss),) + nones
    student_logits, lp, idx, tl, row_weight = ctx.saved_tensors
    grad = torch.ops.amid.amid_loss_topk_bwd.default(grad_loss.contiguous(), student_logits, lp, idx, tl, row_weight,
                                                     *ctx.options)
    return (grad,) + nones




def amid_loss_topk_bwd(grad_loss: Tensor, student_logits: Tensor, teacher_logprobs: Tensor, teacher_indices: Tensor,
                       teacher_tail_logmass: Optional[Tensor], row_weight: Optional[Tensor], tail: str, alpha: float,
                       lam: float, divergence: str, order: str, ab_alpha: float, ab_beta: float, temperature: float,
                       detach_assistant: bool) -> Tensor:
    """Gradient of sum(grad_loss * loss) of amid_loss_topk_fwd w.r.t. student_logits (recomputed)."""
    return torch.ops.amid.amid_loss_topk_bwd.default(
        grad_loss, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tail,
        float(alpha), float(lam), divergence, order, float(ab_alpha), float(ab_beta), float(temperature),
        bool(detach_assistant))


def _amid_loss_topk_bwd_fake(grad_loss, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass,
                             row_weight, tail, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature,
                             detach_assistant):
    op = "amid_loss_topk_bwd"
    check_topk_args(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tail,
                    temperature)
    check_row_vector(op, "grad_loss", grad_loss, student_logits)
    check_options(op, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant,
                  student_logits.dtype)
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


#: Raised when the recomputed sparse-teacher gradient is differentiated again.
TOPK_DOUBLE_BACKWARD_ERROR = (
    "amid::amid_loss_topk_bwd: second derivatives (create_graph=True, Hessian-vector products) of the sparse-teacher "
    "loss are not supported")


def _topk_bwd_setup_context(ctx, inputs, output):
    pass


def _topk_bwd_backward(ctx, _v):
    raise RuntimeError(TOPK_DOUBLE_BACKWARD_ERROR)


if HAS_TOPK_OP:
    torch.library.register_fake("amid::amid_loss_topk_fwd")(_amid_loss_topk_fwd_fake)
    torch.library.register_autograd("amid::amid_loss_topk_fwd", _topk_fwd_backward,
                                    setup_context=_topk_fwd_setup_context)
    torch.library.register_fake("amid::amid_loss_topk_bwd")(_amid_loss_topk_bwd_fake)
    torch.library.register_autograd("amid::amid_loss_topk_bwd", _topk_bwd_backward,
                                    setup_context=_topk_bwd_setup_context)


class TopkGradInForward(torch.autograd.Function):
    """amid.amid_loss_topk's training path: the op writes the gradient in the forward; the backward
    scales it in place (rows with grad_loss == 1 untouched, no host sync) and hands it out once, as
    GradInForward does for the dense op. ``apply(...)`` returns (loss, grad)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tail, alpha,
                lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant):
        return torch.ops.amid.amid_loss_topk_fwd.default(
            student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tail, alpha, lam,
            divergence, order, ab_alpha, ab_beta, temperature, detach_assistant, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _grad_in_forward_setup(ctx, output)

    @staticmethod
    def backward(ctx, grad_loss, _grad_grad):
        if grad_loss is None:  # only the non-differentiable `grad` output was used
            return (None,) * 14
        _topk_check_backward_inputs(ctx, "amid_loss_topk_fwd")
        return (_hand_out_grad(ctx, grad_loss, "amid_loss_topk_fwd"),) + (None,) * 13


# ------------------------------------------------------------------------------------------------
# Vocab-parallel partial rows: amid_partial_lse (R1), amid_partial_mix (R2), amid_partial_sums (R3).
# Per-row states of a vocabulary slice, float64, merged across slices by amid.parallel. Not
# differentiable themselves (amid.parallel's autograd.Function takes the gradient with
# amid_loss_bwd from the merged stats).

NUM_PARTIAL_LSE = 5   # [t_max, t_sum, s_max, s_sum, bad]
NUM_PARTIAL_MIX = 3   # [lt_max, lt_sum, tau_sum]
NUM_PARTIAL_SUMS = 8  # [L, S_G, S_Gw, S_H, Wbar, bound_l, sum_l1, abs_l1]


def amid_partial_lse(student_logits: Tensor, teacher_logits: Tensor, row_weight: Optional[Tensor],
                     temperature: float) -> Tensor:
    """R1 of a vocabulary slice: [N, 5] float64 (t_max, t_sum, s_max, s_sum, bad); see csrc/ops.cpp."""
    return torch.ops.amid.amid_partial_lse.default(student_logits, teacher_logits, row_weight, float(temperature))


@torch.library.register_fake("amid::amid_partial_lse")
def _amid_partial_lse_fake(student_logits, teacher_logits, row_weight, temperature):
    op = "amid_partial_lse"
    check_logits_pair(op, student_logits, teacher_logits)
    if row_weight is not None:
        check_row_vector(op, "row_weight", row_weight, student_logits)
    check_options(op, 0.0, 0.0, "kl", "pr", 0.2, 0.7, temperature, False, student_logits.dtype)
    return student_logits.new_empty((student_logits.size(0), NUM_PARTIAL_LSE), dtype=torch.float64)


def _partial_pass_fake(op: str, cols: int, student_logits, teacher_logits, row_weight, stats, alpha, lam, divergence,
                       order, ab_alpha, ab_beta, temperature, detach_assistant):
    check_logits_pair(op, student_logits, teacher_logits)
    if row_weight is not None:
        check_row_vector(op, "row_weight", row_weight, student_logits)
    n = student_logits.size(0)
    _check(stats.dim() == 2 and stats.size(0) == n and stats.size(1) == NUM_STATS, op,
           lambda: f"expected stats of shape [{n}, {NUM_STATS}], but got {_shape(stats)}")
    _check(stats.dtype == torch.float64, op, lambda: f"expected stats of dtype Double, but got {_dt(stats.dtype)}")
    _check(stats.device == student_logits.device, op,
           lambda: f"expected stats on device {student_logits.device}, but got {stats.device}")
    check_options(op, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant,
                  student_logits.dtype)
    return student_logits.new_empty((n, cols), dtype=torch.float64)


def amid_partial_mix(student_logits: Tensor, teacher_logits: Tensor, row_weight: Optional[Tensor], stats: Tensor,
                     alpha: float, lam: float, divergence: str, order: str, ab_alpha: float, ab_beta: float,
                     temperature: float, detach_assistant: bool) -> Tensor:
    """R2 of a vocabulary slice from the merged A, B in ``stats`` [N, 8] float64: [N, 3] (lt_max, lt_sum, tau_sum)."""
    return torch.ops.amid.amid_partial_mix.default(student_logits, teacher_logits, row_weight, stats, float(alpha),
                                                   float(lam), divergence, order, float(ab_alpha), float(ab_beta),
                                                   float(temperature), bool(detach_assistant))


@torch.library.register_fake("amid::amid_partial_mix")
def _amid_partial_mix_fake(*args):
    return _partial_pass_fake("amid_partial_mix", NUM_PARTIAL_MIX, *args)


def amid_partial_sums(student_logits: Tensor, teacher_logits: Tensor, row_weight: Optional[Tensor], stats: Tensor,
                      alpha: float, lam: float, divergence: str, order: str, ab_alpha: float, ab_beta: float,
                      temperature: float, detach_assistant: bool) -> Tensor:
    """R3 of a vocabulary slice from the merged A, B, Z in ``stats``: [N, 8] row sums (L, S_G, S_Gw, S_H, Wbar,
    bound_l, sum_l1, abs_l1)."""
    return torch.ops.amid.amid_partial_sums.default(student_logits, teacher_logits, row_weight, stats, float(alpha),
                                                    float(lam), divergence, order, float(ab_alpha), float(ab_beta),
                                                    float(temperature), bool(detach_assistant))


@torch.library.register_fake("amid::amid_partial_sums")
def _amid_partial_sums_fake(*args):
    return _partial_pass_fake("amid_partial_sums", NUM_PARTIAL_SUMS, *args)


# Last, once every fake kernel above is registered: key torch.compile's caches on them.
_library.tag_compile_caches([__file__])
