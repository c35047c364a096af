"""The edges of the valid domain (issue 15, items 2-6), against a 50-digit evaluation (utils.mp_row_loss):
lam within 1e-8 of 0 or 1, float32 accuracy at small lam, tiny alpha-beta exponents, logits near
the float range, tiny temperatures. Each case here gave inf / NaN / 0 / a wrong sign or a relative
error of 1e-4 - 1e-2 before the kernels were reformulated."""
import math

import pytest
import torch

import amid
from utils import PAIRS, mp_row_loss, normwise_err


def _rows(s, t, **opts):
    return amid.amid_loss(s, t, reduction="none", **opts)


def _assert_rows_close(got, s, t, rtol, **opts):
    for n in range(s.shape[0]):
        want = float(mp_row_loss(s[n].tolist(), t[n].tolist(), **opts))
        g = float(got[n])
        assert math.isfinite(g), f"{opts}: row {n} is {g}, expected {want}"
        assert abs(g - want) <= rtol * abs(want) + 1e-30, f"{opts}: row {n}: {g} vs {want} (rel {abs(g - want) / abs(want):.3g})"


def test_issue_repro_lam_near_zero():
    """float32, lam = 1e-8: KL(p||r) was inf and KL(r||p) NaN (1 - lam rounded to 1, log1p(-1))."""
    s = torch.tensor([[0.0, 100.0, 1.0]])
    t = torch.tensor([[0.0, 0.0, 1.0]])
    for order, want in (("pr", 57.731030755), ("rp", 1.5514447139)):
        got = amid.amid_loss(s, t, alpha=0.5, lam=1e-8, order=order, reduction="sum").item()
        assert got == pytest.approx(want, rel=1e-6), order


@pytest.mark.parametrize("lam", [1e-8, 1e-12, 1 - 1e-8, 1 - 1e-15])
@pytest.mark.parametrize("alpha", [-10.0, -3.0, 0.5, 3.0, 10.0])
def test_lam_extremes_float32(lam, alpha):
    """Every order and both divergences stay finite and accurate to 1e-5 (kl) / 1e-4 (ab) in float32
    with lam a hair from 0 or 1 and logits of scale 8 (where 74 of 768 such cases were inf / NaN)."""
    g = torch.Generator().manual_seed(int(1e3 * alpha) + int(lam < 0.5))
    s = (torch.randn(2, 24, generator=g) * 8).float()
    t = (torch.randn(2, 24, generator=g) * 8).float()
    for div, order in PAIRS:
        opts = dict(alpha=alpha, lam=lam, divergence=div, order=order)
        rows = _rows(s, t, **opts)
        _assert_rows_close(rows, s.double(), t.double(), 1e-5 if div == "kl" else 1e-4, **opts)


@pytest.mark.parametrize("lam", [1e-3, 1e-5, 1e-7])
def test_float32_accuracy_small_lam(lam):
    """alpha = -3, KL(p||r), logits x 8: the float32 error grew like eps / lam (1.9e-6, 1.2e-4, 1.1e-2)."""
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(4, 40, generator=g) * 8).float()
    t = (torch.randn(4, 40, generator=g) * 8).float()
    rows = _rows(s, t, alpha=-3.0, lam=lam, order="pr")
    _assert_rows_close(rows, s.double(), t.double(), 1e-5, alpha=-3.0, lam=lam, order="pr")


def test_lam_extremes_gradient_float32():
    """The float32 gradient at lam = 1e-8 and 1 - 1e-8 matches the float64 op (whose formulas are the
    same, evaluated in double) to 1e-4 normwise."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 32, generator=g) * 8).double()
    t = (torch.randn(3, 32, generator=g) * 8).double()
    for lam in (1e-8, 1 - 1e-8):
        for alpha in (-3.0, 0.5, 3.0):
            for div, order in PAIRS:
                opts = dict(alpha=alpha, lam=lam, divergence=div, order=order, reduction="sum")
                grads = []
                for dtype in (torch.float32, torch.float64):
                    x = s.to(dtype).detach().clone().requires_grad_()
                    amid.amid_loss(x, t.to(dtype), **opts).backward()
                    grads.append(x.grad.double())
                assert torch.isfinite(grads[0]).all(), opts
                assert normwise_err(grads[0], grads[1], 1e-6) <= 1e-4, opts


@pytest.mark.parametrize("dtype,lam", [(torch.float64, 5e-324), (torch.float64, 1e-310), (torch.float32, 1e-42),
                                       (torch.float32, 1e-39)])
def test_subnormal_lam_with_masked_student_has_finite_gradient(dtype, lam):
    """lam below the normal range of the math type and student logits at -inf: the assistant's weight
    w = e / (e + lam / (1 - lam)) has a subnormal denominator there, whose reciprocal overflowed (0 * inf:
    a NaN gradient row, found by test_properties' hypothesis search). The gradient equals the float64
    reference's."""
    s = torch.tensor([[3.2244, -2.2789, -7.9350, -math.inf, -math.inf],
                      [0.5, -math.inf, 1.5, -2.0, -math.inf]], dtype=torch.float64)
    t = torch.tensor([[1.3921, 2.6961, -1.9757, -1.0280, -1.6079],
                      [-0.7, 2.2, 0.1, 1.0, -3.0]], dtype=torch.float64)
    for div, order in PAIRS:
        opts = dict(alpha=0.5, lam=lam, divergence=div, order=order, temperature=0.5, reduction="sum")
        x = s.to(dtype).detach().clone().requires_grad_()
        amid.amid_loss(x, t.to(dtype), **opts).backward()
        xr = s.detach().clone().requires_grad_()
        amid.reference.amid_loss(xr, t, **opts).backward()
        assert torch.isfinite(x.grad).all(), opts
        assert normwise_err(x.grad.double(), xr.grad, 1e-6) <= (1e-9 if dtype == torch.float64 else 1e-4), opts


@pytest.mark.parametrize("order", ["pr", "qr", "rp", "rq"])
def test_tiny_ab_exponents(order):
    """ab_alpha = 1e-20 (float64) gave exactly 0, ab_beta = 1e-8 (float32) a wrong sign in rp."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 30, generator=g, dtype=torch.float64)
    t = torch.randn(2, 30, generator=g, dtype=torch.float64)
    for a, b in ((1e-20, 0.7), (0.2, 1e-20), (1e-8, 1e-8)):
        opts = dict(alpha=0.5, lam=0.3, divergence="ab", order=order, ab_alpha=a, ab_beta=b)
        _assert_rows_close(_rows(s, t, **opts), s, t, 1e-9, **opts)
    for a, b in ((0.2, 1e-8), (1e-8, 0.7), (1e-6, 1e-6), (1e-25, 0.5)):
        opts = dict(alpha=0.5, lam=0.3, divergence="ab", order=order, ab_alpha=a, ab_beta=b)
        _assert_rows_close(_rows(s.float(), t.float(), **opts), s, t, 1e-4, **opts)


def test_tiny_ab_exponent_gradient():
    """The gradient at a tiny exponent is the limit's, finite, in float32 as in float64."""
    g = torch.Generator().manual_seed(12)
    s = torch.randn(3, 20, generator=g, dtype=torch.float64)
    t = torch.randn(3, 20, generator=g, dtype=torch.float64)
    for order in ("pr", "qr", "rp", "rq"):
        opts = dict(alpha=0.5, lam=0.3, divergence="ab", order=order, ab_alpha=1e-12, ab_beta=0.7,
                    reduction="sum")
        grads = []
        for dtype in (torch.float32, torch.float64):
            x = s.to(dtype).detach().clone().requires_grad_()
            amid.amid_loss(x, t.to(dtype), **opts).backward()
            grads.append(x.grad.double())
        assert torch.isfinite(grads[0]).all()
        assert normwise_err(grads[0], grads[1], 1e-6) <= 1e-4, order


def test_ab_exponent_below_minimum_is_rejected():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(RuntimeError, match=r"amid::amid_loss_fwd: expected ab_alpha >= 1e-30 for the alpha-beta "
                                           r"divergence, but got 1e-40"):
        amid.amid_loss(s, t, alpha=0.5, lam=0.5, divergence="ab", ab_alpha=1e-40)


@pytest.mark.parametrize("big", [1.5e38, 1e30, 1e10])
def test_extreme_finite_logits(big):
    """Logits of opposite signs near the float range: (t - s) - (A - B) overflowed (loss 0 at 3e38) or
    cancelled (0.082 vs 0.1095 at 1e30). Finite inputs give finite, accurate results wherever the
    assistant's mass sits on log-probabilities of moderate size: always for alpha < 1, and for
    alpha >= 1 when the supports meet (row 1). For alpha >= 1 with (numerically) disjoint supports
    the assistant lives on log-probabilities of -big, whose float32 ulp is eps * big: finite only."""
    s = torch.tensor([[big, -big, 0.0, 1.0], [big, big, -big, 2.0]])
    t = torch.tensor([[-big, big, 0.5, 0.0], [big, 0.0, big, -big]])
    for div, order in PAIRS:
        for alpha, lam in ((0.5, 0.5), (-1.0, 0.1), (1.0, 0.3), (3.0, 0.7)):
            opts = dict(alpha=alpha, lam=lam, divergence=div, order=order)
            rows = _rows(s, t, **opts)
            assert torch.isfinite(rows).all(), opts
            keep = slice(0, 2) if alpha < 1 else slice(1, 2)
            _assert_rows_close(rows[keep], s[keep].double(), t[keep].double(), 1e-5 if div == "kl" else 1e-4, **opts)
            x = s.clone().requires_grad_()
            amid.amid_loss(x, t, **opts).backward()
            assert torch.isfinite(x.grad).all(), opts


def test_logits_at_the_float_limit_stay_finite():
    """At +-3e38 differences of logits exceed float32's range: log-probabilities saturate at -3.4e38
    (documented), never -inf (which would read as a masked entry), inf or NaN."""
    big = 3e38
    s = torch.tensor([[big, -big, 0.0, 1.0], [big, big, -big, 2.0]])
    t = torch.tensor([[-big, big, 0.5, 0.0], [big, 0.0, big, -big]])
    for div, order in PAIRS:
        for alpha, lam in ((0.5, 0.5), (-1.0, 0.1), (1.0, 0.3), (3.0, 0.7)):
            x = s.clone().requires_grad_()
            rows = amid.amid_loss(x, t, alpha=alpha, lam=lam, divergence=div, order=order, reduction="none")
            rows.sum().backward()
            assert torch.isfinite(rows).all() and torch.isfinite(x.grad).all(), (div, order, alpha)
    # The issue's row: KL(p || r) at alpha 0.5, lam 0.5 is log 2 (p one-hot where q is 0).
    got = amid.amid_loss(s[:1], t[:1], alpha=0.5, lam=0.5, reduction="sum").item()
    assert got == pytest.approx(math.log(2), rel=1e-6)


def test_offset_invariance_at_large_scale():
    """Shifting a row by 1e6 (float32: ulp 0.0625) leaves the loss as accurate as unshifted: log p is
    formed as (x - max) - log(sum), not x - LSE (whose rounding is eps * 1e6)."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 50, generator=g) * 4
    t = torch.randn(3, 50, generator=g) * 4
    s = s.float().double()  # exactly representable after the shift below: multiples of 1/16
    s, t = (s * 16).round() / 16, (t * 16).round() / 16
    for div, order in PAIRS:
        opts = dict(alpha=0.5, lam=0.3, divergence=div, order=order)
        rows = _rows((s + 1e6).float(), (t - 1e6).float(), **opts)
        _assert_rows_close(rows, s, t, 1e-5 if div == "kl" else 1e-4, **opts)


def test_tiny_temperature_is_rejected_for_its_math_dtype():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(RuntimeError, match=r"amid::amid_loss_fwd: expected temperature >= 2\.93874e-39 \(its "
                                           r"inverse must be finite in float32 math\), but got 1e-40"):
        amid.amid_loss(s, t, alpha=0.5, lam=0.5, temperature=1e-40)
    # float64 math has the range: the same temperature is valid there (and gives a finite loss).
    loss = amid.amid_loss(s.double() * 1e-40, t.double() * 1e-40, alpha=0.5, lam=0.5, temperature=1e-40)
    want = amid.amid_loss(s.double(), t.double(), alpha=0.5, lam=0.5)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(want.item(), rel=1e-9)


def test_tiny_valid_temperature_saturates_instead_of_nan():
    """float32, T = 1e-38 (valid: 1/T is finite): logits / T overflowed to +inf and the row read as
    invalid (NaN). Scaled logits now saturate at the float limit: finite, and equal to float64 (which
    has the range) when at most one entry per row saturates."""
    s = torch.tensor([[-0.9173, 0.5006, 1.7042], [0.3, -0.2, 0.1]])
    t = torch.tensor([[5.5156, 3.0529, -math.inf], [0.25, 0.5, -0.5]])
    for div, order in PAIRS:
        opts = dict(alpha=-8.245, lam=1e-3, divergence=div, order=order, temperature=1e-38, reduction="none")
        x = s.clone().requires_grad_()
        rows = amid.amid_loss(x, t, **opts)
        rows.sum().backward()
        assert torch.isfinite(rows).all(), (div, order)
        # The gradient is 1/T = 1e38 times O(loss): finite unless the loss itself is huge (KL(r || p)
        # with the assistant's mass where the teacher's is e^(-1e38): loss ~1e38, true gradient ~1e76).
        moderate = rows.detach().abs() < 1e6
        assert torch.isfinite(x.grad[moderate]).all(), (div, order)
        want = amid.amid_loss(s.double(), t.double(), **opts)
        assert torch.allclose(rows.double(), want, rtol=1e-5, atol=0), (div, order, rows, want)


def test_huge_logit_gaps_where_t_minus_s_overflows():
    """(t - s) - (A - B) can overflow where lp - lq cannot (|lp|, |lq| <= float max): forward KL
    KL(q || p) with logits near +-3e38 was NaN (inf * 0 in the gradient terms)."""
    s = torch.tensor([[-1.098287510847385e+38, 3.299999965482712e+38], [3.299999965482712e+38, -1.155640486131823e+38]])
    t = torch.tensor([[1.20411303654841e+37, 1.000504074642762e+37], [1.000504074642762e+37, -3.6799047598723347e+37]])
    for alpha, lam in ((0.5, 1.0), (0.5, 0.0), (1.0, 0.5), (-1.0, 0.3)):
        for div, order in PAIRS:
            x = s.clone().requires_grad_()
            rows = amid.amid_loss(x, t, alpha=alpha, lam=lam, divergence=div, order=order, reduction="none")
            assert torch.isfinite(rows).all(), (alpha, lam, div, order, rows)
    # KL(q || p) = sum q (lq - lp): q is one-hot on entry 1 where lp = -(t0 - t1) = -2.0e36.
    got = amid.amid_loss(s[:1], t[:1], alpha=0.5, lam=1.0, order="qr", reduction="sum").item()
    assert got == pytest.approx(1.20411303654841e+37 - 1.000504074642762e+37, rel=1e-6)
