"""Second derivatives (issue 15 item 1) and torch.func (item 12).

* grad_in_forward=False: the gradient is recomputed differentiably, so create_graph=True gives
  Hessian-vector products; checked against autograd through the float64 reference.
* The default path (gradient written in the forward, a constant) refuses create_graph=True with
  amid's message instead of returning a silently wrong (constant) curvature.
* torch.func.grad / vjp / jacrev / vmap work; forward mode (jvp) is refused by name.
"""
import warnings

import pytest
import torch
from torch.autograd import grad

import amid
from utils import PAIRS, make_logits

CASES = [(d, o, a, lam) for d, o in PAIRS for a, lam in ((0.5, 0.3), (-2.0, 0.7), (1.0, 0.5), (3.0, 0.1))]


def _hvp(loss_fn, s, v, **kw):
    x = s.detach().clone().requires_grad_(True)
    (g,) = grad(loss_fn(x, **kw), x, create_graph=True)
    (hv,) = grad((g * v).sum(), x)
    return g.detach(), hv


@pytest.mark.parametrize("div,order,alpha,lam", CASES, ids=[f"{d}-{o}-a{a}-l{lam}" for d, o, a, lam in CASES])
def test_hvp_matches_float64_reference(div, order, alpha, lam):
    """create_graph=True on the grad_in_forward=False path: gradient and H·v equal autograd of the
    float64 reference (random logits, a masked vocabulary entry, an ignored row, T = 1.5)."""
    s, t = make_logits(4, 9, dtype=torch.float64, scale=2.0)
    t[1, 3] = -float("inf")
    s[2, 5] = -float("inf")
    v = torch.randn(4, 9, dtype=torch.float64)
    labels = torch.tensor([1, -100, 2, 3])
    opts = dict(alpha=alpha, lam=lam, divergence=div, order=order, temperature=1.5, t=t, labels=labels)

    def kern(x, t, labels, **o):
        return amid.amid_loss(x, t, labels, grad_in_forward=False, **o) + 0.25 * (x.clamp_min(-50) ** 2).sum()

    def ref(x, t, labels, **o):
        return amid.reference.amid_loss(x, t, labels, **o) + 0.25 * (x.clamp_min(-50) ** 2).sum()

    g, hv = _hvp(kern, s, v, **opts)
    g_ref, hv_ref = _hvp(ref, s, v, **opts)
    assert torch.isfinite(hv).all()
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(hv, hv_ref, atol=1e-12, rtol=1e-10)
    # the amid part of the curvature is really there (not just the 0.5 * I of the quadratic)
    assert (hv_ref - 0.5 * v * (s > -50)).abs().max() > 1e-3


def test_hvp_float32_and_the_issue_repro():
    """The issue's repro on the recomputing path, and float32 logits (reference math in float32)."""
    s, t = make_logits(3, 6, dtype=torch.float64)
    v = torch.randn(3, 6, dtype=torch.float64)
    opts = dict(alpha=0.5, lam=0.3, order="rq")

    def kern(x, **o):
        return amid.amid_loss(x, t.to(x.dtype), grad_in_forward=False, **o) + 0.5 * (x ** 2).sum()

    def ref(x, **o):
        return amid.reference.amid_loss(x, t, **o) + 0.5 * (x ** 2).sum()

    _, hv = _hvp(kern, s, v, **opts)
    _, hv_ref = _hvp(ref, s, v, **opts)
    assert not torch.equal(hv, v)  # the issue: the default path returned exactly v
    torch.testing.assert_close(hv, hv_ref, atol=1e-12, rtol=1e-10)
    _, hv32 = _hvp(kern, s.float(), v.float(), **opts)
    assert hv32.dtype == torch.float32
    torch.testing.assert_close(hv32.double(), hv_ref, atol=1e-5, rtol=1e-4)


def test_third_derivative_and_grad_of_grad_loss():
    """The recomputed gradient is differentiable to every order, and w.r.t. the upstream gradient
    (a per-row weight upstream of a 'none' reduction)."""
    s, t = make_logits(3, 7, dtype=torch.float64)
    v = torch.randn(3, 7, dtype=torch.float64)
    c = torch.rand(3, dtype=torch.float64) + 0.5
    opts = dict(alpha=-1.0, lam=0.4, divergence="ab", order="qr")
    results = []
    for fn in (lambda x, cc: (amid.amid_loss(x, t, reduction="none", grad_in_forward=False, **opts) * cc).sum(),
               lambda x, cc: (amid.reference.amid_loss(x, t, reduction="none", **opts) * cc).sum()):
        x = s.clone().requires_grad_(True)
        cc = c.clone().requires_grad_(True)
        (g,) = grad(fn(x, cc), x, create_graph=True)
        (hv,) = grad((g * v).sum(), x, create_graph=True)
        (dc,) = grad((g * v).sum(), cc, retain_graph=True)
        third = grad((hv * v).sum(), x)[0]
        results.append((third, dc))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-12, rtol=1e-10)
    assert results[1][0].abs().max() > 1e-4


def test_op_level_double_backward():
    """torch.ops.amid.amid_loss_fwd with compute_grad=False is twice differentiable too."""
    s, t = make_logits(2, 5, dtype=torch.float64)
    v = torch.randn(2, 5, dtype=torch.float64)
    opts = (0.5, 0.2, "kl", "pr", 0.2, 0.7, 1.0, False)
    x = s.clone().requires_grad_(True)
    (g,) = grad(torch.ops.amid.amid_loss_fwd(x, t, None, *opts, False)[0].sum(), x, create_graph=True)
    (hv,) = grad((g * v).sum(), x)
    _, hv_ref = _hvp(lambda y: amid.reference.amid_loss(y, t, alpha=0.5, lam=0.2, reduction="sum"), s, v)
    torch.testing.assert_close(hv, hv_ref, atol=1e-12, rtol=1e-10)
    # ... and straight through the backward op
    gl = torch.rand(2, dtype=torch.float64).requires_grad_(True)
    _, stats, _ = torch.ops.amid.amid_loss_fwd(s, t, None, *opts, False)
    x = s.clone().requires_grad_(True)
    out = torch.ops.amid.amid_loss_bwd(gl, x, t, None, stats, *opts)
    hv2, dgl = grad((out * v).sum(), (x, gl))
    y = s.clone().requires_grad_(True)
    (g_rows,) = grad((amid.reference.amid_loss(y, t, alpha=0.5, lam=0.2, reduction="none") * gl.detach()).sum(), y,
                     create_graph=True)
    (hv2_ref,) = grad((g_rows * v).sum(), y)
    torch.testing.assert_close(hv2, hv2_ref, atol=1e-12, rtol=1e-10)
    assert torch.isfinite(dgl).all() and dgl.abs().max() > 0


CREATE_GRAPH_MSG = "amid::amid_loss_fwd: create_graph=True (double backward, e.g. Hessian-vector products)"


@pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True")
def test_default_path_refuses_create_graph():
    """The issue's repro on the default path: an error naming create_graph (and the way out), not a
    constant gradient; also a plain double backward, and the op with compute_grad=True."""
    s, t = make_logits(3, 6, dtype=torch.float64)
    v = torch.randn(3, 6, dtype=torch.float64)
    x = s.clone().requires_grad_(True)
    out = amid.amid_loss(x, t, alpha=0.5, lam=0.3, order="rq") + 0.5 * (x ** 2).sum()
    with pytest.raises(RuntimeError, match=r"create_graph=True .*grad_in_forward=False") as info:
        grad(out, x, create_graph=True)
    assert str(info.value).startswith(CREATE_GRAPH_MSG)
    x = s.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="create_graph"):
        amid.amid_loss(x, t, alpha=0.5, lam=0.3).backward(create_graph=True)
    x = s.clone().requires_grad_(True)
    loss = torch.ops.amid.amid_loss_fwd(x, t, None, 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False, True)[0].sum()
    with pytest.raises(RuntimeError, match="create_graph"):
        grad(loss, x, create_graph=True)
    # without create_graph the default path is the fast one, and its gradient is right
    x = s.clone().requires_grad_(True)
    (g,) = grad(amid.amid_loss(x, t, alpha=0.5, lam=0.3), x)
    y = s.clone().requires_grad_(True)
    torch.testing.assert_close(g, grad(amid.reference.amid_loss(y, t, alpha=0.5, lam=0.3), y)[0])
    # a second derivative through the fast path via nested torch.func is refused the same way
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.func.grad(lambda z: (torch.func.grad(lambda w: amid.amid_loss(w, t, alpha=0.5, lam=0.3))(z) * v).sum())(s)
    one = torch.tensor(1.0, dtype=torch.float64)
    inner = lambda y: torch.func.vjp(lambda w: amid.amid_loss(w, t, alpha=0.5, lam=0.3), y)[1](one)[0]  # noqa: E731
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.func.vjp(lambda y: (inner(y) * v).sum(), s)


@pytest.mark.parametrize("gif", [None, False])
def test_torch_func(gif):
    """torch.func.grad, vjp, jacrev (also second order on the recomputing path) and vmap(grad)."""
    s, t = make_logits(3, 6, dtype=torch.float64)
    opts = dict(alpha=-0.5, lam=0.4, divergence="kl", order="qr")

    def f(x):
        return amid.amid_loss(x, t, grad_in_forward=gif, **opts)

    def fr(x):
        return amid.reference.amid_loss(x, t, **opts)

    torch.testing.assert_close(torch.func.grad(f)(s), torch.func.grad(fr)(s))
    out, vjp_fn = torch.func.vjp(f, s)
    torch.testing.assert_close(vjp_fn(torch.tensor(2.0, dtype=torch.float64))[0], 2 * torch.func.grad(fr)(s))
    sb = torch.stack([s, s.flip(-1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's per-sample fallback for the op warns about performance
        got = torch.func.vmap(torch.func.grad(f))(sb)
    torch.testing.assert_close(got, torch.func.vmap(torch.func.grad(fr))(sb))
    if gif is False:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = torch.func.jacrev(torch.func.grad(f))(s)
        torch.testing.assert_close(h, torch.func.jacrev(torch.func.grad(fr))(s))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # inside torch's forward AD
def test_forward_mode_is_refused():
    """Forward-mode AD used to give a zero tangent silently; now a clear error."""
    s, t = make_logits(2, 5, dtype=torch.float64)
    v = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"amid.amid_loss: forward-mode AD \(torch.func.jvp"):
        torch.func.jvp(lambda x: amid.amid_loss(x, t, alpha=0.5, lam=0.5), (s,), (v,))
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        with pytest.raises(ValueError, match="forward-mode AD"):
            amid.amid_loss(fwad.make_dual(s, v), t, alpha=0.5, lam=0.5)
