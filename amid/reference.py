"""Pure-PyTorch reference of the AMiD loss: the same semantics as the ``torch.ops.amid`` kernels,
spelled out with torch ops and differentiated by autograd.

Used by the tests (in float64, as the ground truth the kernels are compared with), by the
benchmarks, and as the fallback on devices for which amid has no kernels. It is exact but slow
and memory-hungry: it materialises several [N, V] tensors.

Semantics (spec: ../shared/docs/amid-math.md):
* teacher p = softmax(t / T), student q = softmax(s / T), assistant r ∝ (lam p^k + (1-lam) q^k)^(1/k)
  with k = (1 - alpha)/2 for every real alpha != 1, and r ∝ p^lam q^(1-lam) at alpha = 1;
* ``kl``: KL between two of p, q, r in the given order; elements where a logit is -inf are dropped
  from the sum (their assistant mass stays in the normaliser);
* ``ab``: the alpha-beta divergence D(x||y) = -1/(ab) sum(x^a y^b - a/(a+b) x^(a+b) - b/(a+b) y^(a+b));
* order ``jsd``: lam D(p||r) + (1 - lam) D(q||r) (GKD's generalized JSD(beta = lam) at alpha = -1, kl);
* ``detach_assistant``: the student inside r is treated as a constant (TAID), ``qr``/``rq`` only;
* NaN / +inf logits, or a row whose teacher or student logits are all -inf, give a NaN row loss.

Every formula is written so that -inf logits give finite gradients ("double where": unselected
branches only ever see finite values).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import ops as _ops

__all__ = ["amid_loss_rows", "amid_loss", "mixture_log", "official_amid_loss", "amid_loss_topk_rows"]


def _log_mix_neg(y: Tensor, a: float, log_a: float, log_b: float) -> Tensor:
    """log(b + a e^y) for y <= 0, with b = 1 - a (log_a, log_b their logs): log1p(a expm1(y)), except where
    that sum 1 + u is below 1/2 (a or b tiny and |y| large: a = 1e-20 kept nothing of a), where the
    log-sum-exp of the two weighted terms is accurate instead (its error is eps |result|, > log 2 there)."""
    u = a * torch.expm1(y)
    # (the clamp keeps the unselected form finite, so that its gradient is not 0 * inf)
    return torch.where(u >= -0.5, torch.log1p(torch.clamp(u, min=-0.5)),
                       torch.logaddexp(log_a + y, torch.full_like(y, log_b)))


def mixture_log(lp: Tensor, lq: Tensor, alpha: float, lam: float) -> Tensor:
    """log r~ (unnormalised log assistant) from teacher / student log-probabilities (may be -inf)."""
    if lam == 0.0:
        return lq
    if lam == 1.0:
        return lp
    fp, fq = torch.isfinite(lp), torch.isfinite(lq)
    lp0 = torch.where(fp, lp, torch.zeros_like(lp))
    lq0 = torch.where(fq, lq, torch.zeros_like(lq))
    neg_inf = torch.full_like(lp, -math.inf)
    if alpha == 1.0:
        mix = lam * lp0 + (1.0 - lam) * lq0
        return torch.where(fp & fq, mix, neg_inf)
    k = 0.5 * (1.0 - alpha)
    x = k * (lp0 - lq0)
    # Stable power mean: r~ = q e^(hn/k) with hn = log((1-lam) + lam e^x) for x <= 0, and r~ = p e^(hp/k)
    # with hp = log(lam + (1-lam) e^-x) for x > 0: the larger of p^k, q^k is the reference.
    xn, xp = torch.clamp(x, max=0.0), torch.clamp(x, min=0.0)
    hn = _log_mix_neg(xn, lam, math.log(lam), math.log1p(-lam))
    hp = _log_mix_neg(-xp, 1.0 - lam, math.log1p(-lam), math.log(lam))
    q_ref = lq0 + hn / k
    p_ref = lp0 + hp / k
    both = torch.where(x <= 0, q_ref, p_ref)
    # One side masked: p = 0 gives r~ = (1-lam)^(1/k) q for k > 0 and 0 for k < 0 (and vice versa).
    only_q = lq0 + math.log1p(-lam) / k if k > 0 else neg_inf
    only_p = lp0 + math.log(lam) / k if k > 0 else neg_inf
    out = torch.where(fp & fq, both, neg_inf)
    out = torch.where(~fp & fq, only_q, out)
    out = torch.where(fp & ~fq, only_p, out)
    return out


def amid_loss_rows(student_logits: Tensor, teacher_logits: Tensor, *, alpha: float, lam: float,
                   divergence: str = "kl", order: str = "pr", ab_alpha: float = 0.2, ab_beta: float = 0.7,
                   temperature: float = 1.0, detach_assistant: bool = False) -> Tensor:
    """Per-row AMiD loss of [N, V] logits, in their dtype (use float64 for a ground truth).

    Same options and checks as ``torch.ops.amid.amid_loss_fwd``; returns the unweighted row losses [N].
    """
    op = "amid_loss_fwd"
    _ops.check_logits_pair(op, student_logits, teacher_logits)
    _ops.check_options(op, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant,
                       student_logits.dtype)
    if order == "jsd":  # lam D(p||r) + (1 - lam) D(q||r): both orders against the one assistant
        kw = dict(alpha=alpha, lam=lam, divergence=divergence, ab_alpha=ab_alpha, ab_beta=ab_beta,
                  temperature=temperature)
        return (lam * amid_loss_rows(student_logits, teacher_logits, order="pr", **kw)
                + (1.0 - lam) * amid_loss_rows(student_logits, teacher_logits, order="qr", **kw))
    s = student_logits / temperature
    t = teacher_logits / temperature
    bad_t = ~(t < math.inf).all(-1) | (t == -math.inf).all(-1)  # NaN / +inf / all -inf rows
    bad_s = ~(s < math.inf).all(-1) | (s == -math.inf).all(-1)
    lp = torch.log_softmax(t, -1)
    lq = torch.log_softmax(s, -1)
    lq_mix = lq.detach() if detach_assistant else lq
    lt = mixture_log(lp, lq_mix, alpha, lam)
    lr = torch.log_softmax(lt, -1)
    p, q, r = lp.exp(), lq.exp(), lr.exp()
    if divergence == "kl":
        keep = torch.isfinite(lp) & torch.isfinite(lq)
        zero = torch.zeros_like(lp)
        lp0, lq0, lr0 = (torch.where(keep, x, zero) for x in (lp, lq, lr))
        x, lx, ly = {
            "pr": (p, lp0, lr0), "qr": (q, lq0, lr0), "rp": (r, lr0, lp0), "rq": (r, lr0, lq0),
        }[order]
        loss = torch.where(keep, x * (lx - ly), zero).sum(-1)
    else:
        a, b = ab_alpha, ab_beta
        g = a + b
        lx, ly = {"pr": (lp, lr), "qr": (lq, lr), "rp": (lr, lp), "rq": (lr, lq)}[order]
        loss = -((a * lx + b * ly).exp().sum(-1) - (a / g) * (g * lx).exp().sum(-1)
                 - (b / g) * (g * ly).exp().sum(-1)) / (a * b)
    return torch.where(bad_t | bad_s, torch.full_like(loss, math.nan), loss)


def amid_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """:func:`amid.amid_loss` computed with the pure-PyTorch reference instead of the kernels."""
    from .functional import amid_loss as _amid_loss

    return _amid_loss(student_logits, teacher_logits, labels, backend="reference", **kwargs)


def official_amid_loss(logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, lam: float,
                       div_name: str = "fkl", order: str = "pr") -> Tensor:
    """The official code's formula, transcribed (aailab-kaist/AMiD ``distillm/losses.py::amid``, snapshot
    a963105; spec §1.3, §2): eager PyTorch, every alpha >= 1 mapped to the geometric mixture, ``fkl``
    masked by isinf, ``ab`` with its hard-coded (0.2, 0.7), mean over rows with label != -100.

    Kept as the baseline of the benchmarks and as an independent check in the tests; it computes in
    the logits' dtype (the official code does not upcast) and its backward is NaN with -inf logits.
    """
    p = torch.softmax(teacher_logits, -1)
    logp = torch.log_softmax(teacher_logits, -1)
    q = torch.softmax(logits, -1)
    logq = torch.log_softmax(logits, -1)
    if lam <= 0:
        logr = logq
    elif lam >= 1:
        logr = logp
    elif alpha >= 1:
        logr = torch.log_softmax(lam * logp + (1 - lam) * logq, -1)
    else:
        k = 0.5 * (1 - alpha)
        logr = (2 / (1 - alpha)) * torch.logaddexp(math.log(lam) + k * logp, math.log(1 - lam) + k * logq)
        logr = torch.log_softmax(logr, -1)
    r = logr.exp()
    mask = (labels != -100).int()
    xs = {"pr": (p, logp, logr), "qr": (q, logq, logr), "rp": (r, logr, logp), "rq": (r, logr, logq)}
    if div_name == "fkl":
        inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
        x, lx, ly = xs[order]
        prod = (x * (lx - ly)).masked_fill(inf_mask, 0)
        per_row = prod.sum(-1)
        return (per_row * mask).sum() / mask.sum()
    a, b = 0.2, 0.7
    g = a + b
    lx, ly = {"pr": (logp, logr), "qr": (logq, logr), "rp": (logr, logp), "rq": (logr, logq)}[order]
    t1 = torch.logsumexp(a * lx + b * ly, -1).exp()
    t2 = torch.logsumexp(g * lx, -1).exp()
    t3 = torch.logsumexp(g * ly, -1).exp()
    per_row = -(t1 - a / g * t2 - b / g * t3) / (a * b)
    per_row = torch.where(torch.isfinite(per_row), per_row, torch.zeros_like(per_row))
    return (per_row * mask).sum() / mask.sum()


def amid_loss_topk_rows(student_logits: Tensor, teacher_logprobs: Tensor, teacher_indices: Tensor, *,
                        tail: str = "bucket", teacher_tail_logmass: Optional[Tensor] = None, **options) -> Tensor:
    """Per-row :func:`amid.amid_loss_topk` ([N, V] student, [N, k] teacher), spelled out in torch ops
    (docs/topk.md): ``renorm`` is the dense loss with teacher log-probabilities -inf outside the top-k;
    ``bucket`` the dense loss on the k + 1 bins (top-k tokens, then the tail), both distributions
    coarsened in probability space: log q of the bins is [log q_I, log(sum of q outside I)].
    ``options`` as in :func:`amid_loss_rows`."""
    n, v = student_logits.shape
    idx = teacher_indices.long()
    lp = teacher_logprobs.to(student_logits.dtype)
    if tail == "renorm":
        t = torch.full((n, v), -math.inf, dtype=student_logits.dtype, device=student_logits.device)
        return amid_loss_rows(student_logits, t.scatter(1, idx, lp), **options)
    lq = torch.log_softmax(student_logits, -1)
    in_top = torch.zeros((n, v), dtype=torch.bool, device=student_logits.device).scatter(1, idx, True)
    rest = torch.where(in_top, torch.full_like(lq, -math.inf), lq)
    empty = (rest == -math.inf).all(-1, keepdim=True)
    q_tail = torch.where(empty, torch.full_like(lq[:, :1], -math.inf),
                         torch.logsumexp(torch.where(empty, torch.zeros_like(rest), rest), -1, keepdim=True))
    if teacher_tail_logmass is None:
        mass = lp.exp().sum(-1, keepdim=True)
        p_tail = torch.where(mass < 1, torch.log(torch.clamp(1 - mass, min=1e-300)), torch.full_like(mass, -math.inf))
    else:
        p_tail = teacher_tail_logmass.to(lp.dtype).reshape(n, 1)
    cs = torch.cat([lq.gather(1, idx), q_tail], -1)
    ct = torch.cat([lp, p_tail], -1)
    return amid_loss_rows(cs, ct, **options)
