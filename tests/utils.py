"""Shared test helpers: input generators, float64 ground truths, tolerances."""
from __future__ import annotations

import math
from typing import Optional

import torch

# The grid of the issue: alpha from the far left of the family to the harmonic mean (k = -1), lam
# over both ends and the interior, and all eight divergence/order pairs.
ALPHAS = [-5.0, -3.0, -1.0, -0.5, 0.0, 0.5, 0.9, 0.999, 1.0, 1.5, 3.0]
LAMS = [0.0, 0.1, 0.5, 0.9, 1.0]
PAIRS = [(d, o) for d in ("kl", "ab") for o in ("pr", "qr", "rp", "rq")]

# (atol, rtol) on losses and normwise relative error on gradients, per input dtype, against a
# float64 reference computed from the same (rounded) inputs. Measured errors are 10-100x below.
# Loss: (atol, rtol); gradient: normwise relative error; per input dtype, against a float64
# reference computed from the same (rounded) inputs. In float32 the loss is accurate to ~2e-6
# absolute (the small-divergence regime of spec §5.6 loses relative accuracy, not absolute);
# bf16/fp16 gradients are limited by rounding the output to the input dtype (2^-9 for bf16).
LOSS_TOL = {torch.float64: (1e-11, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 1e-4),
            torch.float16: (1e-5, 1e-4)}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 2e-3}

def make_logits(n: int, v: int, dtype=torch.float64, device="cpu", scale: float = 3.0, generator=None):
    """Random, never-zero (student, teacher) logits: N(0, scale^2) plus a per-row offset."""
    g = generator
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale + torch.randn(n, 1, generator=g, dtype=torch.float64)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale + torch.randn(n, 1, generator=g, dtype=torch.float64)
    return s.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)


def normwise_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """||x - ref||_inf / max(||ref||_inf, floor), in float64. The floor keeps the measure meaningful
    where the exact gradient is identically zero (e.g. qr / rq at lam = 0, where r = q)."""
    if ref.numel() == 0:
        return 0.0
    x, ref = x.double(), ref.double()
    return (x - ref).abs().max().item() / max(ref.abs().max().item(), floor)


def assert_loss_close(x: torch.Tensor, ref: torch.Tensor, dtype, msg=""):
    atol, rtol = LOSS_TOL[dtype]
    torch.testing.assert_close(x.double(), ref.double(), atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


def assert_grad_close(g: torch.Tensor, ref: torch.Tensor, dtype, msg="", floor: float = 1e-6):
    err = normwise_err(g, ref, floor)
    assert err <= GRAD_TOL[dtype], f"{msg}: normwise gradient error {err:.3g} > {GRAD_TOL[dtype]:.3g}"


def op_opts(alpha, lam, div, order, **kw):
    """Every option of the op, as keywords: the defaults below, overridden by kw."""
    opts = dict(alpha=alpha, lam=lam, divergence=div, order=order, ab_alpha=0.2, ab_beta=0.7, temperature=1.0,
                detach_assistant=False)
    opts.update(kw)
    return opts


def ref_rows_and_grad(s: torch.Tensor, t: torch.Tensor, weight: Optional[torch.Tensor] = None, **opts):
    """float64 reference per-row losses and d(sum(weight * rows))/ds via autograd."""
    import amid

    s64 = s.detach().double().requires_grad_(True)
    rows = amid.reference.amid_loss_rows(s64, t.detach().double(), **opts)
    w = torch.ones_like(rows) if weight is None else weight.double()
    total = torch.where(w != 0, rows * w, torch.zeros_like(rows)).sum()
    if not total.requires_grad:  # e.g. lam = 1 with 'pr': the loss does not depend on the student
        return rows.detach(), torch.zeros_like(s64)
    (g,) = torch.autograd.grad(total, s64, allow_unused=True)
    return rows.detach(), (torch.zeros_like(s64) if g is None else g)


# ------------------------------------------------------------------------------------------------
# Independent ground truths

def paper_rows(s: torch.Tensor, t: torch.Tensor, alpha: float, lam: float, divergence: str, order: str,
               ab_alpha: float = 0.2, ab_beta: float = 0.7) -> torch.Tensor:
    """The paper's definition written literally in probability space (float64; finite logits only)."""
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    if alpha == 1.0:
        rt = p ** lam * q ** (1 - lam)
    else:
        k = (1 - alpha) / 2
        rt = (lam * p ** k + (1 - lam) * q ** k) ** (1 / k)
    r = rt / rt.sum(-1, keepdim=True)
    x, y = {"pr": (p, r), "qr": (q, r), "rp": (r, p), "rq": (r, q)}[order]
    if divergence == "kl":
        return (x * (x.log() - y.log())).sum(-1)
    a, b = ab_alpha, ab_beta
    g = a + b
    return -((x ** a * y ** b).sum(-1) - a / g * (x ** g).sum(-1) - b / g * (y ** g).sum(-1)) / (a * b)


# The official code's formula lives in the package (the benchmarks use it too).
from amid.reference import official_amid_loss as official_amid  # noqa: E402,F401
