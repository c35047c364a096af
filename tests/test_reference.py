"""The pure-PyTorch reference (the ground truth of the other tests) against independent definitions:
the paper's α-mixture written literally in probability space, and the official code."""
import pytest
import torch

import amid
from utils import ALPHAS, LAMS, PAIRS, make_logits, mp_rows, official_amid, paper_rows


@pytest.mark.parametrize("div,order", PAIRS)
@pytest.mark.parametrize("alpha", ALPHAS + [-50.0, 20.0])
def test_reference_matches_paper_definition(alpha, div, order):
    """For every real alpha (including alpha > 1, where the official code differs) and lam."""
    s, t = make_logits(3, 29, scale=2.0)
    for lam in LAMS:
        for ab in ((0.2, 0.7), (0.6, 1.1)):
            ref = amid.reference.amid_loss_rows(s, t, alpha=alpha, lam=lam, divergence=div, order=order,
                                                ab_alpha=ab[0], ab_beta=ab[1])
            want = paper_rows(s, t, alpha, lam, div, order, *ab)
            torch.testing.assert_close(ref, want, atol=1e-12, rtol=1e-10)
            # autograd through both definitions agrees too
            x1 = s.clone().requires_grad_(True)
            x2 = s.clone().requires_grad_(True)
            l1 = amid.reference.amid_loss_rows(x1, t, alpha=alpha, lam=lam, divergence=div, order=order,
                                               ab_alpha=ab[0], ab_beta=ab[1]).sum()
            l2 = paper_rows(x2, t, alpha, lam, div, order, *ab).sum()
            if l1.requires_grad and l2.requires_grad:
                g1, = torch.autograd.grad(l1, x1)
                g2, = torch.autograd.grad(l2, x2)
                torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("div,order", PAIRS)
def test_reference_matches_official_code(div, order):
    """Same value as the official amid() for alpha < 1 and at alpha = 1; for alpha > 1 the official code
    uses the geometric mixture, which our alpha = 1 reproduces (and our alpha > 1 does not)."""
    s, t = make_logits(6, 41)
    labels = torch.tensor([3, -100, 5, 1, -100, 0])
    keep = labels != -100
    name = "fkl" if div == "kl" else div
    for lam in LAMS:
        for alpha in (-5.0, -1.0, 0.0, 0.5, 0.999, 1.0):
            off = official_amid(s, t, labels, alpha, lam, name, order)
            ours = amid.reference.amid_loss_rows(s, t, alpha=alpha, lam=lam, divergence=div, order=order)[keep].mean()
            torch.testing.assert_close(ours, off, atol=1e-11, rtol=1e-8)
        if 0 < lam < 1:
            off3 = official_amid(s, t, labels, 3.0, lam, name, order)
            geo = amid.reference.amid_loss_rows(s, t, alpha=1.0, lam=lam, divergence=div, order=order)[keep].mean()
            ours3 = amid.reference.amid_loss_rows(s, t, alpha=3.0, lam=lam, divergence=div, order=order)[keep].mean()
            torch.testing.assert_close(geo, off3, atol=1e-11, rtol=1e-8)
            assert (ours3 - off3).abs() > 1e-4  # the paper's alpha = 3 is a different assistant


def test_mixture_special_members():
    """alpha = -1 is the arithmetic mixture (normalised), alpha = 1 the geometric, alpha = 3 harmonic."""
    s, t = make_logits(2, 13)
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    p, q = lp.exp(), lq.exp()
    lam = 0.3
    torch.testing.assert_close(amid.reference.mixture_log(lp, lq, -1.0, lam).exp(), lam * p + (1 - lam) * q)
    torch.testing.assert_close(amid.reference.mixture_log(lp, lq, 1.0, lam).exp(), p ** lam * q ** (1 - lam))
    torch.testing.assert_close(amid.reference.mixture_log(lp, lq, 3.0, lam).exp(), 1 / (lam / p + (1 - lam) / q))
    # elementwise bound min(p, q) <= r~ <= max(p, q) for every alpha
    for alpha in (-20.0, -1.0, 0.5, 1.0, 4.0):
        rt = amid.reference.mixture_log(lp, lq, alpha, lam).exp()
        assert (rt >= torch.minimum(p, q) * (1 - 1e-12)).all() and (rt <= torch.maximum(p, q) * (1 + 1e-12)).all()


@pytest.mark.parametrize("lam", [1e-310, 1e-20, 1e-12, 1 - 1e-12, 1 - 2.0 ** -53])
def test_reference_at_extreme_lam(lam):
    """lam within 1e-12 of 0 or 1, against the spec's definition in 50 digits (mp_row_loss). The power
    mean's 1 + lam expm1(x) kept nothing of lam = 1e-20 where |x| was large: the reference gave inf there,
    and 5e-6 relative at lam = 1e-12. The loss's absolute floor in float64 is ~1e-16 (no small-divergence
    forms here), so the bound is relative to max(|loss|, 1)."""
    s, t = make_logits(3, 50, scale=6.0, generator=torch.Generator().manual_seed(1))
    for alpha in (-3.0, 0.5, 0.999, 3.0):
        for div, order in (("kl", "pr"), ("kl", "rq"), ("kl", "rp"), ("ab", "qr")):
            rows = amid.reference.amid_loss_rows(s, t, alpha=alpha, lam=lam, divergence=div, order=order)
            want = torch.tensor([float(x) for x in mp_rows(s, t, alpha=alpha, lam=lam, divergence=div, order=order)],
                                dtype=torch.float64)
            err = ((rows - want).abs() / want.abs().clamp(min=1.0)).max().item()
            assert err < 1e-13, f"alpha={alpha} {div}/{order}: {err:.3g}"
