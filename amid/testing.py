"""Conformance checks for distillation losses: does a loss function compute what it claims?

    from amid.testing import assert_matches
    assert_matches(my_jsd, "gjsd", beta=0.5, conventions=dict(layout="batched", reduction="batchmean"))

:func:`assert_matches` runs ``loss_fn`` on random and adversarial inputs (peaked teachers, tiny
divergences, huge logits, ignored rows, all rows ignored, a vocabulary masked with ``-inf``) and
compares its value and its gradient with respect to the student with amid's float64 reference
(:mod:`amid.reference`, autograd). On the first mismatch it raises :class:`ConformanceError`,
naming the case, what differs (value or gradient, by how much) and, where one explains it, the
likely cause: the KL direction swapped, the β endpoints of the generalized JSD, another reduction,
the temperature or T² not applied, ignored rows not masked, a cross-entropy form (the divergence
minus a constant). :func:`check` returns the per-case results instead of raising.

Kinds (the loss's claimed definition; teacher p, student q, T the temperature):

==================  ===========================================================================
``"forward_kl"``    KL(p‖q)
``"reverse_kl"``    KL(q‖p)
``"gjsd"``          β·KL(p‖m) + (1-β)·KL(q‖m), m = βp + (1-β)q (``beta=``); at β = 0 / 1 the
                    forward / reverse KL (TRL's and Liger's convention), or 0 with
                    ``endpoints="limit"``
``"skew_kl"``       DistiLLM's skew forward KL, KL(p‖skew·p + (1-skew)·q) (``skew=``, default 0.1)
``"skew_rkl"``      DistiLLM's skew reverse KL, KL(q‖(1-skew)·p + skew·q)
``"taid"``          TAID's KL(p_τ‖q), p_τ = softmax(τ·t + (1-τ)·sg(s)) (``tau=``)
``"ab"``            ABKD's α-β divergence D_AB(p‖q) (``ab_alpha=``, ``ab_beta=``)
``"amid"``          any AMiD setting (``alpha=, lam=, divergence=, order=, ...``)
==================  ===========================================================================

Conventions (how ``loss_fn`` is called and reduces; a dict or :class:`Conventions`):

- ``call``: ``"student_teacher"`` (default): ``loss_fn(student, teacher, labels)``, or
  ``"teacher_student"``;
- ``inputs``: ``"logits"`` (default) or ``"log_probs"`` (both passed through ``log_softmax`` at
  temperature 1 first, as ``F.kl_div`` and Liger's ``LigerJSD`` expect);
- ``layout``: ``"flat"`` ``[N, V]`` (default) or ``"batched"`` ``[B, S, V]``;
- ``labels``: whether ``loss_fn`` takes labels (``-100`` = ignored); without them the cases with
  ignored rows are skipped and no labels are passed;
- ``reduction``: ``"mean"`` over kept rows (default), ``"batchmean"`` (sum / first dimension),
  ``"sum"``, ``"vocab_mean"`` (sum / (kept rows · V), TRL's and ``kl_div``'s ``"mean"``) or
  ``"none"`` (per-row losses);
- ``temperature`` (default 1) and ``scale_by_t2`` (default False): what ``loss_fn`` applies.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["assert_matches", "check", "Conventions", "ConformanceError", "CaseResult", "KINDS", "CASES"]

KINDS = ("forward_kl", "reverse_kl", "gjsd", "skew_kl", "skew_rkl", "taid", "ab", "amid")
_REDUCTIONS = ("mean", "batchmean", "sum", "vocab_mean", "none")


class ConformanceError(AssertionError):
    """A loss function disagrees with amid's reference; the message names the case and the cause."""


@dataclasses.dataclass(frozen=True)
class Conventions:
    call: str = "student_teacher"
    inputs: str = "logits"
    layout: str = "flat"
    labels: bool = True
    reduction: str = "mean"
    temperature: float = 1.0
    scale_by_t2: bool = False

    def __post_init__(self):
        for name, allowed in (("call", ("student_teacher", "teacher_student")), ("inputs", ("logits", "log_probs")),
                              ("layout", ("flat", "batched")), ("reduction", _REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"amid.testing: expected conventions {name} to be one of "
                                 f"{', '.join(repr(a) for a in allowed)}, but got {getattr(self, name)!r}")
        if not (self.temperature > 0):
            raise ValueError(f"amid.testing: expected conventions temperature > 0, but got {self.temperature}")


@dataclasses.dataclass
class CaseResult:
    case: str
    ok: bool
    skipped: bool = False
    value_err: float = 0.0
    grad_err: float = 0.0
    message: str = ""
    cause: str = ""  # short form of the mismatch: the diagnosed cause, or the size of the error


# ------------------------------------------------------------------------------------------------
# Inputs. B x S = 3 x 5 rows, V = 37: small enough for float64 autograd everywhere.

_B, _S, _V = 3, 5, 37


def _case_inputs(name: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (_B, _S, _V)

    def rnd(scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    labels = torch.randint(0, _V, (_B, _S), generator=g)
    if name == "random":
        s, t = rnd(2.0), rnd(2.0) + 0.3
    elif name == "peaked_teacher":  # nearly one-hot teacher: p underflows in most entries
        s, t = rnd(1.0), rnd(12.0)
    elif name == "tiny_divergence":  # student within 1e-3 of the teacher: losses of ~1e-7
        t = rnd(2.0)
        s = t + rnd(1e-3)
    elif name == "huge_logits":  # per-row offsets of 1e4 (the losses are shift invariant)
        s = rnd(2.0) + 1e4 * torch.randn(_B, _S, 1, generator=g, dtype=torch.float64)
        t = rnd(2.0) - 1e4 * torch.randn(_B, _S, 1, generator=g, dtype=torch.float64)
    elif name == "ignored_rows":
        s, t = rnd(2.0), rnd(2.0)
        labels[0, :3] = -100
        labels[2, 4] = -100
        s[0, 0] = float("nan")  # an ignored row may hold anything
    elif name == "all_ignored":
        s, t = rnd(2.0), rnd(2.0)
        labels[:] = -100
    elif name == "masked_vocab":  # the same entries masked with -inf in both (e.g. a padded or banned vocab)
        s, t = rnd(2.0), rnd(2.0)
        cols = torch.tensor([0, 5, 6, 30])
        s[..., cols] = -math.inf
        t[..., cols] = -math.inf
    else:
        raise ValueError(f"amid.testing: unknown case {name!r}")
    return s, t, labels


#: The cases, in the order they are run.
CASES = ("random", "peaked_teacher", "tiny_divergence", "huge_logits", "ignored_rows", "all_ignored",
         "masked_vocab")
_LABEL_CASES = ("ignored_rows", "all_ignored")


# ------------------------------------------------------------------------------------------------
# The reference: per-row float64 losses of the claimed kind (autograd through amid.reference).

def _kind_rows(kind: str, s: Tensor, t: Tensor, T: float, p: Dict[str, Any]) -> Tensor:
    from .reference import amid_loss_rows

    def rows(**o):
        return amid_loss_rows(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), temperature=T,
                              **o).reshape(s.shape[:-1])

    if kind == "forward_kl":
        return rows(alpha=1.0, lam=0.0, order="pr")
    if kind == "reverse_kl":
        return rows(alpha=1.0, lam=0.0, order="rp")
    if kind == "gjsd":
        beta = float(p.get("beta", 0.5))
        if beta in (0.0, 1.0):
            if p.get("endpoints", "kl") == "limit":
                return 0.0 * rows(alpha=1.0, lam=0.0, order="pr")
            return rows(alpha=1.0, lam=0.0, order="pr" if beta == 0.0 else "rp")
        return (beta * rows(alpha=-1.0, lam=beta, order="pr")
                + (1 - beta) * rows(alpha=-1.0, lam=beta, order="qr"))
    if kind == "skew_kl":
        return rows(alpha=-1.0, lam=float(p.get("skew", 0.1)), order="pr")
    if kind == "skew_rkl":
        return rows(alpha=-1.0, lam=1.0 - float(p.get("skew", 0.1)), order="qr")
    if kind == "taid":
        return rows(alpha=1.0, lam=float(p["tau"]), order="rq", detach_assistant=True)
    if kind == "ab":
        return rows(alpha=1.0, lam=0.0, divergence="ab", order="pr", ab_alpha=float(p.get("ab_alpha", 0.2)),
                    ab_beta=float(p.get("ab_beta", 0.7)))
    if kind == "amid":
        keys = ("alpha", "lam", "divergence", "order", "ab_alpha", "ab_beta", "detach_assistant")
        return rows(**{k: p[k] for k in keys if k in p})
    raise ValueError(f"amid.testing: expected kind to be one of {', '.join(KINDS)}, but got {kind!r}")


def _reduce(rows: Tensor, mask: Tensor, reduction: str, V: int, first_dim: int) -> Tensor:
    rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(first_dim, 1)
    kept = max(int(mask.sum()), 1)
    return total / (kept * V if reduction == "vocab_mean" else kept)


def _entropy_rows(x: Tensor, T: float) -> Tensor:
    lp = torch.log_softmax(x / T, -1)
    return -torch.where(torch.isfinite(lp), lp.exp() * lp, torch.zeros_like(lp)).sum(-1)


# ------------------------------------------------------------------------------------------------

def _call(loss_fn, conv: Conventions, s: Tensor, t: Tensor, labels: Optional[Tensor]):
    if conv.layout == "flat":
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        labels = None if labels is None else labels.reshape(-1)
    if conv.inputs == "log_probs":
        s, t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    args = (s, t) if conv.call == "student_teacher" else (t, s)
    return loss_fn(*args, labels) if conv.labels else loss_fn(*args)


def _close(a: Tensor, b: Tensor, atol: float, rtol: float) -> bool:
    if a.shape != b.shape:
        return False
    return bool(torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=False))


def _err(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    d = (a.double() - b.double()).abs()
    return float(d.max()) if d.numel() else 0.0


def _diagnose(got: Tensor, ref: Tensor, kind: str, s: Tensor, t: Tensor, mask: Tensor, conv: Conventions, p: Dict[str, Any],
              atol: float, rtol: float) -> str:
    """Which plausible mistake reproduces the value ``got``."""
    V = s.shape[-1]
    first = s.shape[0] if conv.layout == "batched" else s.shape[0] * s.shape[1]
    T = conv.temperature
    t2 = T * T if conv.scale_by_t2 else 1.0
    with torch.no_grad():
        def val(rows, reduction=conv.reduction, m=mask, scale=t2):
            return _reduce(rows, m, reduction, V, first) * scale

        hyps = []
        swapped = {"forward_kl": ("reverse_kl", {}), "reverse_kl": ("forward_kl", {}),
                   "skew_kl": ("skew_rkl", {}), "skew_rkl": ("skew_kl", {})}.get(kind)
        if kind == "gjsd":
            b = float(p.get("beta", 0.5))
            swapped = ("gjsd", dict(p, beta=1.0 - b))
            if b in (0.0, 1.0):
                other = "kl" if p.get("endpoints", "kl") == "limit" else "limit"
                hyps.append((f"the beta endpoints: at beta = {b:g} it computes "
                             + ("0 (the textbook limit)" if other == "limit" else
                                ("KL(p||q)" if b == 0.0 else "KL(q||p)"))
                             + ", amid's reference (endpoints='" + p.get("endpoints", "kl") + "') does not",
                             val(_kind_rows("gjsd", s, t, T, dict(p, endpoints=other)))))
        if kind == "amid":
            sw = {"pr": "rp", "rp": "pr", "qr": "rq", "rq": "qr"}[p.get("order", "pr")]
            swapped = ("amid", dict(p, order=sw))
        rows = _kind_rows(kind, s, t, T, p)
        if swapped is not None:
            hyps.append(("the direction swapped (the divergence's arguments in the other order)",
                         val(_kind_rows(swapped[0], s, t, T, swapped[1]))))
            hyps.append(("the student and the teacher swapped", val(_kind_rows(kind, t, s, T, p))))
        for red in _REDUCTIONS:
            if red != conv.reduction and red != "none" and conv.reduction != "none":
                hyps.append((f"another reduction: it reduces like reduction='{red}', the conventions say "
                             f"'{conv.reduction}'", val(rows, reduction=red)))
        if T != 1.0:
            hyps.append((f"the temperature: it ignores temperature={T:g}", val(_kind_rows(kind, s, t, 1.0, p))))
            hyps.append(("the T² scale " + ("missing" if conv.scale_by_t2 else "applied (scale_by_t2)"),
                         val(rows, scale=1.0 if conv.scale_by_t2 else T * T)))
        hyps.append(("ignored rows not masked (labels == -100 rows are counted)",
                     val(rows, m=torch.ones_like(mask))))
        if kind in ("forward_kl", "skew_kl", "taid", "gjsd"):
            ent = _entropy_rows(t, T) if kind != "taid" else None
            if ent is not None:
                hyps.append(("a cross-entropy form: the divergence plus the teacher entropy H(p) (same gradient)",
                             val(rows + ent)))
        for why, v in hyps:
            # a cause must reproduce the value and be distinguishable from the reference
            if torch.isfinite(v).all() and _close(got.detach().to(v.dtype), v, atol, rtol) \
                    and not _close(v, ref, 10 * atol, 10 * rtol):
                return why
    return ""


def check(loss_fn: Callable, kind: str, *, conventions: Union[None, Dict[str, Any], Conventions] = None,
          cases=CASES, atol: float = 1e-6, rtol: float = 1e-5, check_grad: bool = True, dtype=torch.float64,
          seed: int = 0, **params) -> List[CaseResult]:
    """Run ``loss_fn`` on every case and compare with the reference; returns one :class:`CaseResult`
    per case (no exception for a mismatch). ``dtype``: what the inputs are cast to before calling
    ``loss_fn`` (the reference is float64 of the same rounded inputs); ``params``: the kind's
    parameters (``beta``, ``endpoints``, ``skew``, ``tau``, ``ab_alpha``, ``ab_beta``, or the AMiD
    options)."""
    if kind not in KINDS:
        raise ValueError(f"amid.testing: expected kind to be one of {', '.join(KINDS)}, but got {kind!r}")
    conv = conventions if isinstance(conventions, Conventions) else Conventions(**(conventions or {}))
    results = []
    for i, name in enumerate(cases):
        if name not in CASES:
            raise ValueError(f"amid.testing: expected cases among {', '.join(CASES)}, but got {name!r}")
        if name in _LABEL_CASES and not conv.labels:
            results.append(CaseResult(name, True, skipped=True, message="loss_fn takes no labels"))
            continue
        s, t, labels = _case_inputs(name, seed + 1000 * i)
        s, t = s.to(dtype).double(), t.to(dtype).double()  # the reference sees the rounded inputs
        mask = labels != -100 if conv.labels else torch.ones(labels.shape, dtype=torch.bool)
        V = s.shape[-1]
        first = s.shape[0] if conv.layout == "batched" else s.shape[0] * s.shape[1]
        T = conv.temperature
        # reference value and gradient (autograd, float64)
        xs = s.clone().requires_grad_(True)
        ref_rows = _kind_rows(kind, xs, t, T, params)
        ref = _reduce(ref_rows, mask, conv.reduction, V, first) * (T * T if conv.scale_by_t2 else 1.0)
        (ref_grad,) = torch.autograd.grad(ref.sum(), xs)
        ref_grad = torch.where(mask.unsqueeze(-1), ref_grad, torch.zeros_like(ref_grad))
        ref = ref.detach()
        if conv.layout == "flat" and conv.reduction == "none":
            ref = ref.reshape(-1)
        # the function under test
        xg = s.to(dtype).clone().requires_grad_(True)
        try:
            out = _call(loss_fn, conv, xg, t.to(dtype), labels if conv.labels else None)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            results.append(CaseResult(name, False, message=f"raised {type(e).__name__}: {e}",
                                      cause=f"raised {type(e).__name__}"))
            continue
        if not isinstance(out, Tensor):
            results.append(CaseResult(name, False, message=f"returned {type(out).__name__}, expected a tensor"))
            continue
        got = out.detach().double()
        verr = _err(got, ref)
        # tiny divergences (~1e-7): an absolute tolerance would accept any small number
        v_atol = atol * 1e-3 if name == "tiny_divergence" else atol
        if not _close(got, ref, v_atol, rtol):
            if got.shape != ref.shape:
                why = f"shape {list(got.shape)} instead of {list(ref.shape)}"
            elif not torch.isfinite(got).all():
                why = "a non-finite value" + (": ignored rows not masked (an ignored row holds NaN logits)"
                                              if name == "ignored_rows" else "")
            else:
                why = _diagnose(got, ref, kind, s, t, mask, conv, params, v_atol, rtol)
            rel = verr / max(float(ref.abs().max()), 1e-300) if torch.isfinite(got).all() else math.nan
            msg = (f"value {[float(f'{x:.6g}') for x in got.flatten()[:3].tolist()]} vs reference "
                   f"{[float(f'{x:.6g}') for x in ref.flatten()[:3].tolist()]}, relative error {rel:.2g}")
            results.append(CaseResult(name, False, value_err=verr, message=msg + (f" ({why})" if why else ""),
                                      cause=why or f"value off by {rel:.2g} (relative)"))
            continue
        gerr = 0.0
        if check_grad:
            if not out.requires_grad:
                results.append(CaseResult(name, False, value_err=verr, message="no gradient to the student"))
                continue
            (g,) = torch.autograd.grad(out.sum(), xg, allow_unused=True)
            g = torch.zeros_like(xg) if g is None else g
            g = torch.where(mask.unsqueeze(-1), g.double(), torch.zeros_like(ref_grad))  # ignored rows: anything
            gerr = _err(g, ref_grad)
            scale = max(float(ref_grad.abs().max()), 1e-30)
            if not (torch.isfinite(g).all() and gerr <= atol + rtol * scale):
                why = "non-finite gradient" if not torch.isfinite(g).all() else f"max |difference| {gerr:.3g}"
                results.append(CaseResult(name, False, value_err=verr, grad_err=gerr,
                                          message=f"gradient differs from the reference ({why})",
                                          cause=f"gradient off by {gerr / scale:.2g} (relative)"))
                continue
        results.append(CaseResult(name, True, value_err=verr, grad_err=gerr))
    return results


def assert_matches(loss_fn: Callable, kind: str, *, conventions: Union[None, Dict[str, Any], Conventions] = None,
                   cases=CASES, atol: float = 1e-6, rtol: float = 1e-5, check_grad: bool = True,
                   dtype=torch.float64, seed: int = 0, **params) -> List[CaseResult]:
    """Check that ``loss_fn`` computes ``kind`` (see the module docstring) under ``conventions``, on
    every case: value and gradient against amid's float64 reference within ``atol + rtol·|ref|``.

    Raises :class:`ConformanceError` at the first mismatch, e.g.::

        amid.testing: loss_fn does not match 'forward_kl' on case 'random': value [0.93] vs reference
        [1.02] (the direction swapped (the divergence's arguments in the other order))

    Returns the per-case results when everything matches.
    """
    results = check(loss_fn, kind, conventions=conventions, cases=cases, atol=atol, rtol=rtol,
                    check_grad=check_grad, dtype=dtype, seed=seed, **params)
    for r in results:
        if not r.ok:
            desc = kind + "".join(f", {k}={v}" for k, v in sorted(params.items()))
            raise ConformanceError(f"amid.testing: loss_fn does not match '{desc}' on case '{r.case}': {r.message}")
    return results


# ------------------------------------------------------------------------------------------------
# Peers: the published losses of TRL and Liger-Kernel, as far as they are installed and run here
# (``python -m amid.testing`` prints the table the README shows).

def peer_losses() -> Dict[str, dict]:
    """Named peer losses to check: ``{name: dict(fn=, kind=, params=, conventions=, dtype=, atol=, rtol=)}``.
    Fused-linear losses are called with identity heads (hidden = logits, W = I), so they see the
    same logits as everything else. Entries whose package is missing are left out."""
    peers: Dict[str, dict] = {}
    eye = {}
    from . import functional as _amid

    peers["amid.generalized_jsd beta=0.5"] = dict(
        fn=lambda s, t, y: _amid.generalized_jsd(s, t, y, beta=0.5), kind="gjsd", params=dict(beta=0.5),
        conventions={})
    peers["amid.generalized_jsd beta=0.5 (fp32)"] = dict(
        fn=lambda s, t, y: _amid.generalized_jsd(s, t, y, beta=0.5), kind="gjsd", params=dict(beta=0.5),
        conventions={}, dtype=torch.float32, atol=1e-5, rtol=1e-4)

    def identity(v: int, dtype) -> Tensor:
        key = (v, dtype)
        if key not in eye:
            eye[key] = torch.eye(v, dtype=dtype)
        return eye[key]

    peers["torch F.kl_div(batchmean)"] = dict(
        fn=lambda s, t: F.kl_div(s, t, reduction="batchmean", log_target=True), kind="forward_kl", params={},
        conventions=dict(inputs="log_probs", labels=False, reduction="batchmean"))
    try:
        import os
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
            peers[f"TRL GKD generalized_jsd_loss beta={beta:g}"] = dict(
                fn=lambda s, t, y, b=beta: GKDTrainer.generalized_jsd_loss(s, t, y, beta=b), kind="gjsd",
                params=dict(beta=beta), conventions=dict(layout="batched"))
        peers["TRL GKD generalized_jsd_loss beta=0.5 T=2"] = dict(
            fn=lambda s, t, y: GKDTrainer.generalized_jsd_loss(s, t, y, beta=0.5, temperature=2.0), kind="gjsd",
            params=dict(beta=0.5), conventions=dict(layout="batched", temperature=2.0))
        peers["TRL GKD generalized_jsd_loss beta=0.5 reduction='mean'"] = dict(
            fn=lambda s, t, y: GKDTrainer.generalized_jsd_loss(s, t, y, beta=0.5, reduction="mean"), kind="gjsd",
            params=dict(beta=0.5), conventions=dict(layout="batched", reduction="mean"))
    except Exception:  # noqa: BLE001 - TRL not installed or not importable here
        pass
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        for beta in (0.0, 0.5, 1.0):
            peers[f"TRL DistillationTrainer chunked loss beta={beta:g} (fp32)"] = dict(
                fn=lambda s, t, y, b=beta: _chunked_divergence_loss(
                    s, t, identity(s.shape[-1], s.dtype), identity(s.shape[-1], s.dtype), (y != -100).long(), b)[0],
                kind="gjsd", params=dict(beta=beta), conventions=dict(layout="batched"), dtype=torch.float32,
                atol=1e-5, rtol=1e-4)
    except Exception:  # noqa: BLE001
        pass
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        for beta, temp in ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.5, 2.0)):
            mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=temp,
                                          compiled=False)
            peers[f"Liger LigerFusedLinearJSDLoss beta={beta:g}" + (f" T={temp:g}" if temp != 1.0 else "")] = dict(
                fn=lambda s, t, y, m=mod: m(s, identity(s.shape[-1], s.dtype), t, identity(s.shape[-1], s.dtype), y),
                kind="gjsd", params=dict(beta=beta), conventions=dict(temperature=temp))
    except Exception:  # noqa: BLE001
        pass
    return peers


def check_peer(entry: dict) -> List[CaseResult]:
    return check(entry["fn"], entry["kind"], conventions=entry["conventions"], dtype=entry.get("dtype", torch.float64),
                 atol=entry.get("atol", 1e-6), rtol=entry.get("rtol", 1e-5), **entry["params"])


def _main() -> None:  # python -m amid.testing: the conformance table of the installed peers, in Markdown
    import importlib.metadata as md

    vers = []
    for pkg in ("torch", "trl", "liger-kernel"):
        try:
            vers.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    print(f"Conformance against amid's float64 reference ({', '.join(vers)}); cases: {', '.join(CASES)}.\n")
    print("| loss | checked as | cases passed | mismatches |")
    print("|---|---|---|---|")
    for name, e in peer_losses().items():
        res = check_peer(e)
        run = [r for r in res if not r.skipped]
        ok = [r for r in run if r.ok]
        bad = [r for r in run if not r.ok]
        what = e["kind"] + "".join(f" {k}={v:g}" for k, v in e["params"].items())
        conv = {k: v for k, v in e["conventions"].items()}
        what += "".join(f", {k}={v}" for k, v in conv.items())
        groups: Dict[str, List[str]] = {}
        for r in bad:
            groups.setdefault(r.cause or r.message, []).append(r.case)
        fails = "; ".join(f"{', '.join(c)}: {why}" for why, c in groups.items()) if bad else "–"
        print(f"| {name} | {what} | {len(ok)}/{len(run)} | {fails.replace('|', '/')} |")


if __name__ == "__main__":
    _main()
