"""amid.amid_loss_topk: the sparse-teacher loss (docs/topk.md) against the float64 reference and the dense op."""
import itertools
import math

import pytest
import torch

import amid
from amid.reference import amid_loss_rows, amid_loss_topk_rows

OPTS = [dict(alpha=a, lam=l, divergence=d, order=o)
        for (a, l), d, o in itertools.product([(0.5, 0.1), (-1.0, 0.5), (1.0, 0.3), (3.0, 0.7), (-3.0, 0.9)],
                                              ["kl", "ab"], ["pr", "qr", "rp", "rq"])]


def _data(n=6, v=40, k=8, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    lp_full = torch.log_softmax(t.double(), -1)
    lp, idx = torch.topk(lp_full, k, dim=-1)
    return s, t, lp, idx.to(torch.int32)


def _loss_and_grad(fn, s):
    x = s.detach().clone().requires_grad_(True)
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_matches_reference_float64(tail):
    s, _t, lp, idx = _data()
    labels = torch.tensor([1, -100, 3, 4, -100, 5])
    keep = labels != -100
    for o in OPTS:
        l1, g1 = _loss_and_grad(lambda x: amid.amid_loss_topk(x, lp, idx, labels, tail=tail, **o), s)

        def ref(x):
            rows = amid_loss_topk_rows(x, lp, idx, tail=tail, **o)
            return torch.where(keep, rows, torch.zeros_like(rows)).sum() / keep.sum()

        l2, g2 = _loss_and_grad(ref, s)
        assert torch.isfinite(l1) and torch.isfinite(g1).all(), o
        torch.testing.assert_close(l1, l2, rtol=1e-9, atol=1e-12, msg=str(o))
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12, msg=str(o))
        assert float(g1[~keep].abs().max()) == 0.0


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_jsd_order_matches_reference(tail, divergence):
    # The combined order 'jsd' (its own per-row scratch in the CPU kernel; it used to write past it and crash)
    s, _t, lp, idx = _data()
    for alpha, lam in ((0.5, 0.1), (-1.0, 0.5), (1.0, 0.3), (3.0, 0.7)):
        o = dict(alpha=alpha, lam=lam, divergence=divergence, order="jsd")
        l1, g1 = _loss_and_grad(lambda x: amid.amid_loss_topk(x, lp, idx, tail=tail, reduction="sum", **o), s)
        l2, g2 = _loss_and_grad(lambda x: amid_loss_topk_rows(x, lp, idx, tail=tail, **o).sum(), s)
        assert torch.isfinite(l1) and torch.isfinite(g1).all(), o
        torch.testing.assert_close(l1, l2, rtol=1e-9, atol=1e-12, msg=str(o))
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12, msg=str(o))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_renorm_is_dense_op_with_minus_inf_outside_topk(dtype):
    s, t, lp, idx = _data(dtype=dtype)
    t_masked = torch.full_like(t, -math.inf).scatter(1, idx.long(), t.gather(1, idx.long()))
    for o in OPTS[::3]:
        l1, g1 = _loss_and_grad(lambda x: amid.amid_loss_topk(x, lp.to(dtype), idx, tail="renorm", **o), s)
        l2, g2 = _loss_and_grad(lambda x: amid.amid_loss(x, t_masked, **o), s)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(l1, l2, **tol, msg=str(o))
        torch.testing.assert_close(g1, g2, **tol, msg=str(o))


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_k_equal_v_is_the_dense_loss(tail):
    s, t, lp, idx = _data(v=24, k=24)
    for o in OPTS[::2]:
        l1, g1 = _loss_and_grad(lambda x: amid.amid_loss_topk(x, lp, idx, tail=tail, **o), s)
        l2, g2 = _loss_and_grad(lambda x: amid.amid_loss(x, t, **o), s)
        torch.testing.assert_close(l1, l2, rtol=1e-9, atol=1e-12, msg=str(o))
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12, msg=str(o))


def test_k1_and_ties():
    # k = 1: renorm puts all teacher mass on one token; bucket is a 2-bin problem.
    s, _t, lp, idx = _data(k=1)
    for tail in ("renorm", "bucket"):
        for o in OPTS[::5]:
            l1, g1 = _loss_and_grad(lambda x: amid.amid_loss_topk(x, lp, idx, tail=tail, **o), s)
            l2, g2 = _loss_and_grad(lambda x: amid_loss_topk_rows(x, lp, idx, tail=tail, **o).mean(), s)
            torch.testing.assert_close(l1, l2, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)
    # Ties in the teacher: either tied token is a valid top-k member, and the loss only depends on the set.
    s = torch.randn(2, 10, dtype=torch.float64)
    t = torch.zeros(2, 10, dtype=torch.float64)
    t[:, 3] = t[:, 7] = 2.0  # tokens 3 and 7 tie for first
    lp_full = torch.log_softmax(t, -1)
    a_idx = torch.tensor([[3, 7, 0], [7, 3, 0]], dtype=torch.int64)  # same set, different order
    b_idx = torch.tensor([[3, 7, 1], [3, 7, 1]], dtype=torch.int64)  # tie among the zeros broken differently
    for tail in ("renorm", "bucket"):
        la = amid.amid_loss_topk(s, lp_full.gather(1, a_idx), a_idx, tail=tail, reduction="none")
        lb = amid.amid_loss_topk(s, lp_full.gather(1, b_idx), b_idx, tail=tail, reduction="none")
        ra = amid_loss_topk_rows(s, lp_full.gather(1, a_idx), a_idx, tail=tail, alpha=0.5, lam=0.1)
        torch.testing.assert_close(la, ra, rtol=1e-10, atol=1e-13)
        assert torch.isfinite(lb).all()
    # The loss depends on the set of top-k tokens, not on their order.
    perm = amid.amid_loss_topk(s, lp_full.gather(1, a_idx.flip(-1)), a_idx.flip(-1), reduction="none")
    torch.testing.assert_close(perm, amid.amid_loss_topk(s, lp_full.gather(1, a_idx), a_idx, reduction="none"))


def test_bucket_is_a_lower_bound_for_the_arithmetic_mixture():
    # alpha = -1: coarsening commutes with the mixture, so the data-processing inequality applies.
    s, t, lp, idx = _data(n=32, v=50, k=5, seed=3)
    for lam, order in ((0.1, "pr"), (0.5, "qr"), (0.9, "rp"), (0.3, "rq")):
        o = dict(alpha=-1.0, lam=lam, divergence="kl", order=order, reduction="none")
        coarse = amid.amid_loss_topk(s, lp, idx, tail="bucket", **o)
        dense = amid.amid_loss(s, t, **o)
        assert (coarse <= dense + 1e-12).all(), (lam, order)
        assert (coarse < dense - 1e-6).any()


def test_teacher_tail_logmass_and_shapes():
    s, t, lp, idx = _data(v=30, k=6)
    tail = torch.logsumexp(torch.log_softmax(t, -1).scatter(1, idx.long(), -math.inf), -1)
    a = amid.amid_loss_topk(s, lp, idx, tail="bucket", teacher_tail_logmass=tail)
    b = amid.amid_loss_topk(s, lp, idx, tail="bucket")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # [B, L, V] inputs and reduction='none'
    rows = amid.amid_loss_topk(s.view(2, 3, 30), lp.view(2, 3, 6), idx.view(2, 3, 6), reduction="none")
    assert rows.shape == (2, 3)
    torch.testing.assert_close(rows.reshape(-1), amid_loss_topk_rows(s, lp, idx, alpha=0.5, lam=0.1))
    t_share, s_share = amid.topk.topk_tail_mass(s, lp, idx)
    torch.testing.assert_close(t_share.double(), tail.exp(), rtol=1e-5, atol=1e-7)
    q = torch.softmax(s, -1)
    torch.testing.assert_close(s_share.double(), 1 - q.gather(1, idx.long()).sum(-1), rtol=1e-5, atol=1e-6)


def test_low_precision_inputs():
    s, _t, lp, idx = _data(n=8, v=64, k=16, dtype=torch.float64)
    ref = amid_loss_topk_rows(s, lp.half().double(), idx, tail="bucket", alpha=0.5, lam=0.1).mean()
    for dt in (torch.float32, torch.bfloat16):
        x = s.to(dt).requires_grad_(True)
        loss = amid.amid_loss_topk(x, lp.half(), idx, tail="bucket")
        loss.backward()
        assert x.grad.dtype == dt and torch.isfinite(x.grad.float()).all()
        assert float(loss.detach()) == pytest.approx(float(ref), rel=2e-2 if dt == torch.bfloat16 else 1e-5)


def test_gradcheck():
    s, _t, lp, idx = _data(n=3, v=9, k=3)
    for tail in ("renorm", "bucket"):
        for o in (dict(alpha=0.5, lam=0.2), dict(alpha=1.0, lam=0.4, divergence="ab", order="qr")):
            x = s.clone().requires_grad_(True)
            assert torch.autograd.gradcheck(
                lambda y: amid.amid_loss_topk(y, lp, idx, tail=tail, grad_in_forward=False, **o), (x,))


def test_bad_inputs_are_refused():
    s, _t, lp, idx = _data(v=20, k=4)
    bad = idx.clone()
    bad[2, 1] = bad[2, 0]
    with pytest.raises(ValueError, match=r"amid.amid_loss_topk: expected distinct teacher_indices in each row, but row 2"):
        amid.amid_loss_topk(s, lp, bad)
    bad = idx.clone()
    bad[0, 0] = 20
    with pytest.raises(ValueError, match=r"expected teacher_indices in \[0, 20\), but got values from \d+ to 20"):
        amid.amid_loss_topk(s, lp, bad)
    bad[0, 0] = -1
    with pytest.raises(ValueError, match=r"in \[0, 20\), but got values from -1"):
        amid.amid_loss_topk(s, lp, bad)
    with pytest.raises(ValueError, match="dtype int32 or int64, but got torch.float32"):
        amid.amid_loss_topk(s, lp, idx.float())
    with pytest.raises(ValueError, match=r"of shape \[..., k\]"):
        amid.amid_loss_topk(s, lp[:, :3], idx)
    with pytest.raises(ValueError, match="expected 1 <= k <= V = 20"):
        amid.amid_loss_topk(s, torch.zeros(6, 21, dtype=torch.float64), torch.zeros(6, 21, dtype=torch.int64))
    with pytest.raises(ValueError, match="tail to be one of 'renorm', 'bucket', but got 'drop'"):
        amid.amid_loss_topk(s, lp, idx, tail="drop")
    with pytest.raises(ValueError, match="temperature 1 with tail='bucket'"):
        amid.amid_loss_topk(s, lp, idx, tail="bucket", temperature=2.0)
    nan = lp.clone()
    nan[1, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        amid.amid_loss_topk(s, nan, idx)
    with pytest.raises(ValueError, match=r"teacher_tail_logmass of shape \[6\]"):
        amid.amid_loss_topk(s, lp, idx, teacher_tail_logmass=torch.zeros(5, dtype=torch.float64))
