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


def rowwise_err(x: torch.Tensor, ref: torch.Tensor, floor=0.0) -> float:
    """The worst row's max |x - ref| over max(that row's max |ref|, floor), in float64: normwise_err per row
    of a [N, V] gradient. A floor (e.g. 1) for rows whose gradient can nearly vanish (logits of scale 12: |g| ~ 1e-9
    beside a loss of 6), where the error over |g| alone says nothing; a float, or one per row (a tensor [N]:
    grad_terms_scale)."""
    x, ref = x.double(), ref.double()
    floor = torch.as_tensor(floor, dtype=torch.float64, device=ref.device)
    return ((x - ref).abs().amax(-1) / torch.maximum(ref.abs().amax(-1), floor)).max().item()


def grad_terms_scale(s: torch.Tensor, stats: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per row, max_v q_v |K| (q = softmax(s / T), K the op's stats[:, 4]): every gradient element is q_v (u_v - K)
    (the softmax's Jacobian), so where one nearly cancels its rounding is that of terms of this size, not its own
    (a student peaked on one token; tests/cpp test_online_float takes the same floor)."""
    q_max = torch.softmax(s.double().cpu() / temperature, -1).amax(-1)
    return q_max * stats.double().cpu()[:, 4].abs()


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


# ------------------------------------------------------------------------------------------------
# High-precision ground truth (mpmath): where float64 itself is not enough (alpha within ~1e-7 of
# 1, tiny divergences, tiny alpha-beta exponents, float32 relative-error budgets).

def mp_row_loss(s_row, t_row, alpha: float, lam: float, divergence: str = "kl", order: str = "pr",
                ab_alpha: float = 0.2, ab_beta: float = 0.7, temperature: float = 1.0, dps: int = 50):
    """The loss of one row by the spec's definition (shared/docs/amid-math.md §1-2), evaluated in
    ``dps``-digit arithmetic from the given float logits (exactly as stored; -inf = masked entry).

    p = softmax(t/T), q = softmax(s/T); r~ = (lam p^k + (1-lam) q^k)^(1/k), k = (1-alpha)/2, or
    p^lam q^(1-lam) at alpha = 1 (r = q at lam = 0, r = p at lam = 1); r = r~ / sum r~. 'kl' sums
    x (log x - log y) over the entries where neither logit is -inf; 'ab' is
    -(1/(ab)) [sum x^a y^b - a/(a+b) sum x^(a+b) - b/(a+b) sum y^(a+b)]. Returns an mpmath mpf
    (nan for a row whose student or teacher logits are all -inf or not < +inf)."""
    import mpmath as mp

    vals_s = [x if isinstance(x, mp.mpf) else float(x) for x in s_row]
    vals_t = [x if isinstance(x, mp.mpf) else float(x) for x in t_row]
    # Extra digits where the formulas cancel: alpha near 1 (division by k) and small a*b.
    extra = 0
    if alpha != 1.0:
        extra += max(0, int(-math.log10(abs(0.5 * (1.0 - alpha)))) + 1)
    if divergence == "ab":
        extra += max(0, int(-math.log10(ab_alpha * ab_beta)) + 1)
    # Logits of magnitude 10^m spend m digits before the point: log-softmax keeps dps - m of them.
    finite = [abs(x) for x in vals_s + vals_t if math.isfinite(x)]
    extra += max(0, int(math.log10(max(finite + [1.0]) / temperature)) + 1)
    ninf = mp.ninf
    with mp.workdps(dps + extra):
        if any(not (x < math.inf) for x in vals_s + vals_t) or all(x == -math.inf for x in vals_s) \
                or all(x == -math.inf for x in vals_t):
            return mp.nan
        T = mp.mpf(temperature)
        s = [ninf if x == -math.inf else mp.mpf(x) / T for x in vals_s]
        t = [ninf if x == -math.inf else mp.mpf(x) / T for x in vals_t]

        def log_softmax(x):
            m = max(v for v in x if v != ninf)
            lse = m + mp.log(mp.fsum(mp.exp(v - m) for v in x if v != ninf))
            return [ninf if v == ninf else v - lse for v in x]

        lp, lq = log_softmax(t), log_softmax(s)
        lam_ = mp.mpf(lam)
        if lam == 0.0:
            lrt = lq
        elif lam == 1.0:
            lrt = lp
        elif alpha == 1.0:
            lrt = [ninf if ninf in (a, b) else lam_ * a + (1 - lam_) * b for a, b in zip(lp, lq)]
        else:
            k = (1 - mp.mpf(alpha)) / 2
            lrt = []
            for a, b in zip(lp, lq):
                if a != ninf and b != ninf:
                    lrt.append(mp.log(lam_ * mp.exp(k * a) + (1 - lam_) * mp.exp(k * b)) / k)
                elif a != ninf:  # q = 0: r~ = (lam p^k)^(1/k) for k > 0, 0 for k < 0
                    lrt.append(a + mp.log(lam_) / k if k > 0 else ninf)
                elif b != ninf:
                    lrt.append(b + mp.log(1 - lam_) / k if k > 0 else ninf)
                else:
                    lrt.append(ninf)
        finite = [v for v in lrt if v != ninf]
        m = max(finite)
        z = m + mp.log(mp.fsum(mp.exp(v - m) for v in finite))
        lr = [ninf if v == ninf else v - z for v in lrt]
        lx, ly = {"pr": (lp, lr), "qr": (lq, lr), "rp": (lr, lp), "rq": (lr, lq)}[order]
        if divergence == "kl":
            return mp.fsum(mp.exp(x) * (x - y) for x, y, a, b in zip(lx, ly, lp, lq) if a != ninf and b != ninf)
        a, b = mp.mpf(ab_alpha), mp.mpf(ab_beta)
        g = a + b

        def e(v):
            return mp.mpf(0) if v == ninf else mp.exp(v)

        cross = mp.fsum(e(a * x + b * y) if ninf not in (x, y) else 0 for x, y in zip(lx, ly))
        sx = mp.fsum(e(g * x) for x in lx)
        sy = mp.fsum(e(g * y) for y in ly)
        return -(cross - a / g * sx - b / g * sy) / (a * b)


def mp_rows(s: torch.Tensor, t: torch.Tensor, **opts) -> list:
    """mp_row_loss for every row of [N, V] logits (as stored: float32 values are taken exactly)."""
    s64, t64 = s.detach().double().cpu(), t.detach().double().cpu()
    return [mp_row_loss(s64[i].tolist(), t64[i].tolist(), **opts) for i in range(s64.shape[0])]


def mp_row_grad(s_row, t_row, dps: int = 60, **opts) -> list:
    """d(mp_row_loss)/d(student logit v) for one row, by central differences in high precision
    (step 1e-25 at ``dps`` digits: truncation ~1e-50, far below any float64 budget); 0 at -inf."""
    import mpmath as mp

    with mp.workdps(dps):
        h = mp.mpf("1e-25")
        base = [mp.mpf(float(x)) for x in s_row]
        out = []
        for v, x in enumerate(base):
            if x == mp.ninf:
                out.append(0.0)
                continue
            up = base[:v] + [x + h] + base[v + 1:]
            dn = base[:v] + [x - h] + base[v + 1:]
            d = (mp_row_loss(up, t_row, dps=dps, **opts) - mp_row_loss(dn, t_row, dps=dps, **opts)) / (2 * h)
            out.append(float(d))
        return out
