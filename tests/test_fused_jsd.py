"""The combined order 'jsd' (issue 11 item 9): lam D(p||r) + (1 - lam) D(q||r) in one pass of the op,
and the generalized JSD built on it (amid.generalized_jsd, amid.fused_linear_generalized_jsd,
amid.FusedLinearGeneralizedJSD).

Checked against three things: the float64 reference (amid.reference, which spells the order out as
the weighted sum of 'pr' and 'qr', differentiated by autograd), the old two-pass form (the op run
once per order), and peers (TRL's formula in test_compat.py; Liger's LigerFusedLinearJSDLoss here).
Shapes: V = 1 (degenerate), 37 (no vector-width multiple), 1001 (vector tails); N = 6 rows with
ignored (weight 0, NaN-filled) rows and -inf entries. The small-divergence case uses V = 20000 as
test_amid_loss.py does (8000 here).
"""
import math

import pytest
import torch
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

import amid
from conftest import DEVICES
from utils import assert_grad_close, assert_loss_close, make_logits, normwise_err, op_opts, ref_rows_and_grad

# (alpha, lam): GKD's JSD (alpha = -1) at small / middle / large beta, and other members of the
# family where the order is as well defined (power means, geometric, harmonic), and both ends.
ALPHA_LAM = [(-1.0, 0.1), (-1.0, 0.5), (-1.0, 0.9), (0.5, 0.3), (1.0, 0.6), (3.0, 0.7), (-1.0, 0.0), (-1.0, 1.0)]


def _inputs(n, v, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = make_logits(n, v, generator=g)
    if v > 3:  # masked vocabulary: teacher-only, student-only and shared -inf entries
        t[0, 1] = -math.inf
        s[1, 2] = -math.inf
        s[2, 3] = t[2, 3] = -math.inf
    return s.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)


def _weights(n, dtype, device):
    ldt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.linspace(0.5, 2.0, n, dtype=ldt, device=device)
    w[n // 2] = 0.0  # an ignored row
    return w


def _two_pass(s, t, w, compute_grad, **opts):
    """The old form: the op once per order, weighted (loss and gradient)."""
    lam = opts["lam"]
    outs = [amid.ops.amid_loss_fwd(s, t, w, compute_grad=compute_grad, **dict(opts, order=o)) for o in ("pr", "qr")]
    loss = lam * outs[0][0] + (1 - lam) * outs[1][0]
    grad = (lam * outs[0][2].double() + (1 - lam) * outs[1][2].double()) if compute_grad else None
    return loss, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", ["kl", "ab"])
@pytest.mark.parametrize("alpha,lam", ALPHA_LAM)
@pytest.mark.parametrize("v", [1, 37, 1001])
def test_jsd_order_against_reference_and_two_pass(device, div, alpha, lam, v):
    """float64: loss and gradient (written in the forward and recomputed by the backward op) equal the
    reference to 1e-10 and the two-pass form to 1e-12; ignored rows are zero (and their NaN logits are
    not read); temperature 1.7."""
    n = 6
    s, t = _inputs(n, v, torch.float64, device)
    w = _weights(n, torch.float64, device)
    s[n // 2] = math.nan  # the ignored row is never read
    opts = op_opts(alpha, lam, div, "jsd", temperature=1.7)
    keep = (w != 0).cpu()
    ref_rows, ref_grad = ref_rows_and_grad(torch.where(keep[:, None], s.cpu(), 0.0), t.cpu(), w.cpu(), **opts)
    ref_loss = torch.where(keep, ref_rows * w.cpu(), torch.zeros_like(ref_rows))
    loss, stats, grad = amid.ops.amid_loss_fwd(s, t, w, compute_grad=True, **opts)
    gl = torch.linspace(0.5, 1.5, n, dtype=torch.float64, device=device)
    grad_bwd = amid.ops.amid_loss_bwd(gl, s, t, w, stats, **opts)
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad.cpu(), ref_grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad_bwd.cpu(), ref_grad * gl.cpu()[:, None], atol=1e-12, rtol=1e-10)
    assert loss[n // 2].item() == 0.0 and grad[n // 2].abs().max().item() == 0.0
    loss2, grad2 = _two_pass(s, t, w, True, **opts)
    torch.testing.assert_close(loss, loss2, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(grad.double(), grad2, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("div", ["kl", "ab"])
def test_jsd_order_low_precision(device, dtype, div):
    """16/32-bit inputs: float32 math, the loss budgets of the single orders, and the gradient within
    the dtype's budget and within 2x (+1e-6) the error of the two-pass form on the same inputs."""
    s, t = _inputs(8, 1001, dtype, device)
    for alpha, lam in ((-1.0, 0.5), (-1.0, 0.1), (0.5, 0.9)):
        opts = op_opts(alpha, lam, div, "jsd", temperature=1.3)
        ref_rows, ref_grad = ref_rows_and_grad(s.cpu(), t.cpu(), **opts)
        loss, _stats, grad = amid.ops.amid_loss_fwd(s, t, None, compute_grad=True, **opts)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        assert_loss_close(loss.cpu(), ref_rows, dtype, str(opts))
        assert_grad_close(grad.cpu(), ref_grad, dtype, str(opts))
        _loss2, grad2 = _two_pass(s, t, None, True, **opts)
        assert normwise_err(grad.cpu(), ref_grad) <= 2 * normwise_err(grad2.cpu(), ref_grad) + 1e-6, opts


@pytest.mark.parametrize("div", ["kl", "ab"])
def test_jsd_small_divergence_float32(div):
    """A student within 1% of its teacher (JSD row losses ~1e-5): each term keeps its own second-order
    form and its own Z (stats Z, Z2), so float32 inputs give the float64 result on the same inputs to
    the budgets of the single orders (test_amid_loss.py: 3e-4 kl / 2e-5 ab per row, gradient 2e-5)."""
    g = torch.Generator().manual_seed(5)
    t, _ = make_logits(8, 8000, generator=g)
    s = (t + 0.01 * torch.randn(t.shape, generator=g, dtype=torch.float64)).float()
    t = t.float()
    loss_tol = 3e-4 if div == "kl" else 2e-5
    for alpha, lam in ((-1.0, 0.5), (-1.0, 0.1), (-1.0, 0.9)):
        opts = op_opts(alpha, lam, div, "jsd")
        ref_rows, ref_grad = ref_rows_and_grad(s.double(), t.double(), **opts)
        loss, stats, grad = amid.ops.amid_loss_fwd(s, t, None, compute_grad=True, **opts)
        assert (loss >= 0).all(), opts
        rel = ((loss.double() - ref_rows).abs() / ref_rows.abs()).max().item()
        assert rel <= loss_tol, (opts, rel)
        assert normwise_err(grad, ref_grad) <= 2e-5, opts
        grad_bwd = amid.ops.amid_loss_bwd(torch.ones(8), s, t, None, stats, **opts)
        assert normwise_err(grad_bwd, ref_grad) <= 2e-5, opts


def test_jsd_identical_inputs_give_zero():
    s, _ = make_logits(3, 257)
    for dtype in (torch.float64, torch.float32):
        x = s.to(dtype)
        loss, _stats, grad = amid.ops.amid_loss_fwd(x, x.clone(), None, compute_grad=True,
                                                    **op_opts(-1.0, 0.3, "kl", "jsd"))
        assert loss.abs().max().item() <= (0.0 if dtype == torch.float64 else 1e-12)
        assert grad.abs().max().item() <= (1e-15 if dtype == torch.float64 else 1e-7)


def test_jsd_stats_carry_one_z_per_term():
    """Z (over p) and Z2 (over q) are both the log-normaliser of the mixture; for the single orders
    Z2 = Z."""
    s, t = make_logits(5, 300)
    _l, st, _g = amid.ops.amid_loss_fwd(s, t, None, compute_grad=False, **op_opts(0.5, 0.3, "kl", "jsd"))
    assert st.shape == (5, amid.ops.NUM_STATS) == (5, 8)
    torch.testing.assert_close(st[:, 7], st[:, 2], atol=1e-14, rtol=0)
    _l, st1, _g = amid.ops.amid_loss_fwd(s, t, None, compute_grad=False, **op_opts(0.5, 0.3, "kl", "qr"))
    assert torch.equal(st1[:, 7], st1[:, 2])


class _CountAmidOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "amid":
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_is_one_op_call_and_equals_two_pass(reduction, beta):
    """amid.generalized_jsd runs the op once (no second pass) and gives the two-pass value and
    gradient (float64), with labels (ignored rows), temperature and every reduction."""
    s, t = make_logits(2 * 9, 53)
    s, t = s.reshape(2, 9, 53), t.reshape(2, 9, 53)
    y = torch.randint(0, 53, (2, 9))
    y[0, ::4] = -100
    kw = dict(temperature=2.0, reduction=reduction)
    with _CountAmidOps() as mode:
        amid.generalized_jsd(s, t, y, beta=beta, **kw)
    assert mode.calls == ["amid_loss_fwd.default"], mode.calls

    def val_grad(fn):
        x = s.clone().requires_grad_(True)
        out = fn(x)
        (g,) = torch.autograd.grad(out.sum(), x)
        return out.detach(), g

    v1, g1 = val_grad(lambda x: amid.generalized_jsd(x, t, y, beta=beta, **kw))
    v2, g2 = val_grad(lambda x: beta * amid.amid_loss(x, t, y, alpha=-1.0, lam=beta, order="pr", **kw)
                      + (1 - beta) * amid.amid_loss(x, t, y, alpha=-1.0, lam=beta, order="qr", **kw))
    torch.testing.assert_close(v1, v2, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(g1, g2, atol=1e-14, rtol=1e-12)
    assert g1[0, ::4].abs().max().item() == 0.0  # ignored rows


def test_jsd_order_reference_backend_and_amid_loss():
    """order='jsd' through amid.amid_loss: kernels == the pure-PyTorch fallback (backend='reference')."""
    s, t = make_logits(7, 64)
    for div in ("kl", "ab"):
        a = amid.amid_loss(s, t, alpha=-0.5, lam=0.4, divergence=div, order="jsd")
        b = amid.amid_loss(s, t, alpha=-0.5, lam=0.4, divergence=div, order="jsd", backend="reference")
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-11)


def test_jsd_order_errors():
    s, t = make_logits(2, 8)
    with pytest.raises(RuntimeError, match="amid::amid_loss_fwd: expected detach_assistant=False with order 'jsd'"):
        amid.amid_loss(s, t, alpha=-1.0, lam=0.5, order="jsd", detach_assistant=True)
    with pytest.raises(ValueError, match=r"amid.generalized_jsd: expected beta in \[0, 1\], but got 1.5"):
        amid.generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match=r"amid.fused_linear_generalized_jsd: expected beta in \[0, 1\], but got -0.1"):
        amid.fused_linear_generalized_jsd(s, torch.randn(8, 8, dtype=s.dtype), t, torch.randn(8, 8, dtype=s.dtype),
                                          beta=-0.1)
    with pytest.raises(ValueError, match="amid.FusedLinearGeneralizedJSD: expected endpoints to be 'kl' or 'limit'"):
        amid.FusedLinearGeneralizedJSD(endpoints="x")(s, torch.randn(8, 8, dtype=s.dtype), t,
                                                      torch.randn(8, 8, dtype=s.dtype))


# ---- op registration: opcheck, fake kernel, torch.compile ------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_jsd(device):
    for dtype, div in ((torch.float32, "kl"), (torch.float64, "ab"), (torch.bfloat16, "kl")):
        s, t = make_logits(5, 37, dtype=dtype, device=device)
        ldt = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0], dtype=ldt, device=device)
        opts = (-1.0, 0.3, div, "jsd", 0.2, 0.7, 1.5, False)
        for requires_grad in (True, False):
            for compute_grad in (True, False):
                x = s.clone().requires_grad_(requires_grad)
                opcheck(torch.ops.amid.amid_loss_fwd.default, (x, t, w) + opts + (compute_grad,))
        _loss, stats, _ = torch.ops.amid.amid_loss_fwd(s, t, w, *opts, False)
        gl = torch.randn(5, dtype=stats.dtype, device=device)
        opcheck(torch.ops.amid.amid_loss_bwd.default, (gl, s, t, w, stats) + opts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gif", [True, False])
def test_compile_generalized_jsd(device, gif):
    torch._dynamo.reset()
    s, t = make_logits(6, 41, dtype=torch.float32, device=device)
    labels = torch.tensor([1, -100, 2, 3, 4, -100], device=device)

    def f(x, t, y):
        return 0.5 * amid.generalized_jsd(x * 1.0, t, y, beta=0.3, temperature=2.0, grad_in_forward=gif) \
            + 0.1 * x.pow(2).mean()

    cf = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, cf):
        x = s.clone().requires_grad_(True)
        out = fn(x, t, labels)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)


# ---- fused linear ----------------------------------------------------------------------------------

def _heads(n=23, hs=16, ht=12, v=40, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    d = dict(hs=r(n, hs).requires_grad_(), w=(r(v, hs) * 0.5).requires_grad_(),
             b=(r(v) * 0.3).requires_grad_() if bias else None, ht=r(n, ht), wt=r(v, ht) * 0.5,
             bt=r(v) * 0.3 if bias else None)
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = -100
    return d, y


def _grads(out, d):
    leaves = [d["hs"], d["w"]] + ([d["b"]] if d["b"] is not None else [])
    return torch.autograd.grad(out, leaves)


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_fused_linear_generalized_jsd_equals_unfused(beta, chunk_size):
    """Chunked from hidden states == amid.generalized_jsd on the full logits (+ CE), float64."""
    d, y = _heads()
    kw = dict(beta=beta, temperature=1.5)
    a = amid.fused_linear_generalized_jsd(d["hs"], d["w"], d["ht"], d["wt"], y, student_bias=d["b"],
                                          teacher_bias=d["bt"], chunk_size=chunk_size, ce_weight=0.3, **kw)
    ga = _grads(a, d)
    s = torch.nn.functional.linear(d["hs"], d["w"], d["b"])
    t = torch.nn.functional.linear(d["ht"], d["wt"], d["bt"])
    b = amid.generalized_jsd(s, t, y, **kw) + 0.3 * torch.nn.functional.cross_entropy(s, y)
    gb = _grads(b, d)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    for x, z in zip(ga, gb):
        torch.testing.assert_close(x, z, atol=1e-12, rtol=1e-10)
    # the module is the function
    m = amid.FusedLinearGeneralizedJSD(beta=beta, temperature=1.5, ce_weight=0.3, chunk_size=chunk_size)
    torch.testing.assert_close(m(d["hs"], d["w"], d["ht"], d["wt"], y, d["b"], d["bt"]), a, atol=0, rtol=0)


def test_fused_linear_generalized_jsd_limit_endpoints_and_components():
    d, y = _heads(bias=False)
    for beta in (0.0, 1.0):
        total, kd, ce, _z = amid.fused_linear_generalized_jsd(d["hs"], d["w"], d["ht"], d["wt"], y, beta=beta,
                                                              endpoints="limit", ce_weight=0.5,
                                                              return_components=True)
        assert kd is None  # the KD term is identically 0: skipped
        torch.testing.assert_close(total, 0.5 * ce, atol=1e-14, rtol=0)
    total, kd, ce, _z = amid.fused_linear_generalized_jsd(d["hs"], d["w"], d["ht"], d["wt"], y, beta=0.3,
                                                          ce_weight=0.5, kd_weight=2.0, return_components=True)
    s, t = d["hs"] @ d["w"].T, d["ht"] @ d["wt"].T
    torch.testing.assert_close(kd, amid.generalized_jsd(s, t, y, beta=0.3).detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(total, 2.0 * kd + 0.5 * ce, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_liger_fused_linear_jsd(beta, temperature):
    """Liger's LigerFusedLinearJSDLoss (its chunked torch path, which runs on CPU), soft + hard loss, at
    every beta: the same value (Liger returns float32) and gradients (Liger accumulates in float32)."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    d, y = _heads(n=12, hs=8, ht=6, v=20, bias=False)
    liger = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=beta,
                                            temperature=temperature, compiled=False)
    a = liger(d["hs"], d["w"], d["ht"], d["wt"], y)
    ga = _grads(a, d)
    b = amid.FusedLinearGeneralizedJSD(beta=beta, temperature=temperature, kd_weight=0.5, ce_weight=0.5)(
        d["hs"], d["w"], d["ht"], d["wt"], y)
    gb = _grads(b, d)
    torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-6)
    for x, z in zip(ga, gb):
        torch.testing.assert_close(x, z, atol=1e-7, rtol=1e-5)
