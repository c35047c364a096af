"""The Python layer: reductions, ignored rows, normaliser / gradient accumulation, temperature,
leading dimensions, layouts, the nn.Module, and the reference backend."""
import pytest
import torch

import amid
from utils import make_logits, ref_rows_and_grad

OPTS = dict(alpha=0.5, lam=0.3, divergence="kl", order="rq")


def _grad(fn, s, *args, **kw):
    x = s.clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    out.backward()
    return out.detach(), x.grad


def test_reductions_and_ignored_rows():
    s, t = make_logits(6, 40)
    labels = torch.tensor([0, -100, 2, 3, -100, 5])
    keep = labels != -100
    ref_rows, _ = ref_rows_and_grad(s, t, **OPTS)
    none = amid.amid_loss(s, t, labels, reduction="none", **OPTS)
    assert none.shape == (6,) and none.dtype == torch.float64
    torch.testing.assert_close(none, torch.where(keep, ref_rows, torch.zeros_like(ref_rows)))
    torch.testing.assert_close(amid.amid_loss(s, t, labels, reduction="sum", **OPTS), ref_rows[keep].sum())
    torch.testing.assert_close(amid.amid_loss(s, t, labels, **OPTS), ref_rows[keep].mean())
    torch.testing.assert_close(amid.amid_loss(s, t, **OPTS), ref_rows.mean())
    # a different ignore_index
    lab2 = torch.where(keep, labels, torch.full_like(labels, 7))
    torch.testing.assert_close(amid.amid_loss(s, t, lab2, ignore_index=7, **OPTS), ref_rows[keep].mean())


@pytest.mark.parametrize("gif", [True, False])
def test_all_rows_ignored(gif):
    s, t = make_logits(4, 30)
    labels = torch.full((4,), -100)
    for reduction in ("mean", "sum"):
        val, g = _grad(amid.amid_loss, s, t, labels, reduction=reduction, grad_in_forward=gif, **OPTS)
        assert val.item() == 0.0 and torch.isfinite(val) and (g == 0).all()


def test_normalizer_gradient_accumulation_equals_one_big_batch():
    """Micro-batches normalised by the total number of kept rows accumulate to the big batch's gradient."""
    s, t = make_logits(12, 33)
    labels = torch.randint(0, 33, (12,))
    labels[[1, 4, 5, 9]] = -100
    big_val, big_g = _grad(amid.amid_loss, s, t, labels, **OPTS)
    total = (labels != -100).sum()
    x = s.clone().requires_grad_(True)
    acc_val = 0.0
    for sl in (slice(0, 5), slice(5, 6), slice(6, 12)):
        part = amid.amid_loss(x[sl], t[sl], labels[sl], normalizer=total, **OPTS)
        part.backward()
        acc_val += part.detach()
    torch.testing.assert_close(acc_val, big_val)
    torch.testing.assert_close(x.grad, big_g)
    # a plain number works too; the default per-call mean differs
    x.grad = None
    amid.amid_loss(x[:5], t[:5], labels[:5], normalizer=float(total), **OPTS).backward()
    g_num = x.grad.clone()
    x.grad = None
    amid.amid_loss(x[:5], t[:5], labels[:5], normalizer=total, **OPTS).backward()
    torch.testing.assert_close(g_num, x.grad)


def test_temperature_squared_scale():
    s, t = make_logits(5, 20)
    base = amid.amid_loss(s, t, temperature=2.0, **OPTS)
    scaled = amid.amid_loss(s, t, temperature=2.0, scale_by_t2=True, **OPTS)
    torch.testing.assert_close(scaled, 4.0 * base)
    _, g1 = _grad(amid.amid_loss, s, t, temperature=2.0, **OPTS)
    _, g2 = _grad(amid.amid_loss, s, t, temperature=2.0, scale_by_t2=True, **OPTS)
    torch.testing.assert_close(g2, 4.0 * g1)


def test_leading_dims_and_layouts():
    """[B, T, V] logits with [B, T] labels; a transposed (non-unit last stride) input is copied once."""
    s, t = make_logits(2 * 3, 17)
    s3, t3 = s.view(2, 3, 17), t.view(2, 3, 17)
    labels = torch.tensor([[1, -100, 3], [4, 5, -100]])
    v3, g3 = _grad(amid.amid_loss, s3, t3, labels, **OPTS)
    v2, g2 = _grad(amid.amid_loss, s, t, labels.view(-1), **OPTS)
    torch.testing.assert_close(v3, v2)
    torch.testing.assert_close(g3.view(6, 17), g2)
    none = amid.amid_loss(s3, t3, labels, reduction="none", **OPTS)
    assert none.shape == (2, 3)
    st = s.t().contiguous().t()  # same values, column-major
    assert st.stride(-1) != 1
    vt, gt = _grad(amid.amid_loss, st, t, **OPTS)
    torch.testing.assert_close(vt, amid.amid_loss(s, t, **OPTS))
    torch.testing.assert_close(gt, _grad(amid.amid_loss, s, t, **OPTS)[1])
    # a single row [V]
    one = amid.amid_loss(s[0], t[0], reduction="none", **OPTS)
    assert one.shape == () and torch.isclose(one, amid.amid_loss(s[:1], t[:1], reduction="none", **OPTS)[0])


def test_module_equals_functional():
    s, t = make_logits(5, 21)
    labels = torch.tensor([1, 2, -100, 3, 4])
    mod = amid.AMiDLoss(alpha=-1.0, lam=0.2, divergence="ab", order="qr", temperature=1.5, scale_by_t2=True)
    v1, g1 = _grad(mod, s, t, labels)
    v2, g2 = _grad(amid.amid_loss, s, t, labels, alpha=-1.0, lam=0.2, divergence="ab", order="qr", temperature=1.5,
                   scale_by_t2=True)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, g2)
    mod.lam = 0.6  # schedules update the attribute between steps
    torch.testing.assert_close(mod(s, t, labels), amid.amid_loss(s, t, labels, alpha=-1.0, lam=0.6, divergence="ab",
                                                                 order="qr", temperature=1.5, scale_by_t2=True))
    assert "lam=0.6" in repr(mod)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reference_backend_matches_kernels(dtype):
    s, t = make_logits(4, 30, dtype=dtype)
    labels = torch.tensor([0, -100, 1, 2])
    v1, g1 = _grad(amid.amid_loss, s, t, labels, backend="kernels", **OPTS)
    v2, g2 = _grad(amid.reference.amid_loss, s, t, labels, **OPTS)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(v1, v2, atol=tol, rtol=tol)
    torch.testing.assert_close(g1.double(), g2.double(), atol=tol, rtol=tol)


def test_no_grad_and_eval_paths():
    """Under no_grad (evaluation) no gradient is computed and nothing is saved."""
    s, t = make_logits(3, 12)
    x = s.clone().requires_grad_(True)
    with torch.no_grad():
        v = amid.amid_loss(x, t, **OPTS)
    assert not v.requires_grad
    torch.testing.assert_close(v, amid.amid_loss(s, t, **OPTS))


def test_teacher_requiring_grad_under_no_grad_is_fine():
    s, t = make_logits(3, 12)
    with torch.no_grad():
        amid.amid_loss(s, t.clone().requires_grad_(True), **OPTS)
