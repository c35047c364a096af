"""torch.ops.amid.amid_loss_topk_fwd / _bwd, the sparse-teacher op (docs/topk.md): against the float64
reference and the dense-op path (amid.topk.amid_loss_topk_dense) in every dtype, opcheck, gradcheck,
torch.compile, ignored rows, NaN rows, and the errors (eager and fake kernel)."""
import itertools
import math

import pytest
import torch
from torch.library import opcheck

import amid
from amid.reference import amid_loss_topk_rows
from amid.topk import amid_loss_topk_dense
from utils import normwise_err

OPS = torch.ops.amid
# (alpha, lam) over the mixture regimes (power k' > 0, arithmetic, geometric, k' < 0), x both divergences
# and all four orders.
OPTS = [dict(alpha=a, lam=l, divergence=d, order=o)
        for (a, l), d, o in itertools.product([(0.5, 0.1), (-1.0, 0.5), (1.0, 0.3), (3.0, 0.7)], ["kl", "ab"],
                                              ["pr", "qr", "rp", "rq"])]
FULL = dict(ab_alpha=0.2, ab_beta=0.7, temperature=1.0, detach_assistant=False)


def _data(n=6, v=40, k=8, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    lp, idx = torch.topk(torch.log_softmax(t, -1), k, dim=-1)
    return s, t, lp, idx


def _op_rows(s, lp, idx, tail, o, w=None, tl=None, compute_grad=True):
    ldt = torch.float64 if s.dtype == torch.float64 else torch.float32
    return OPS.amid_loss_topk_fwd(s, lp.to(ldt), idx, tl, w, tail, o["alpha"], o["lam"], o["divergence"],
                                  o["order"], o.get("ab_alpha", 0.2), o.get("ab_beta", 0.7),
                                  o.get("temperature", 1.0), o.get("detach_assistant", False), compute_grad)


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_op_rows_and_grad_vs_float64_reference(tail):
    # The op's per-row losses and its gradient (row weights, an ignored row) against torch.func on the reference.
    s, _t, lp, idx = _data(v=24, k=6)
    w = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    # half of the grid, chosen so that every (divergence, order) pair meets two of the four mixture regimes
    for o in [o for i, o in enumerate(OPTS) if (i + i // 8) % 2 == 0]:
        loss, grad = _op_rows(s, lp, idx.int(), tail, o, w=w)
        ref = amid_loss_topk_rows(s, lp, idx, tail=tail, **o) * w
        gref = torch.func.grad(lambda x: (amid_loss_topk_rows(x, lp, idx, tail=tail, **o) * w).sum())(s)
        assert loss.dtype == torch.float64 and grad.dtype == torch.float64
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-13, msg=str(o))
        torch.testing.assert_close(grad, gref, rtol=1e-9, atol=1e-12, msg=str(o))
        assert float(loss[1]) == 0.0 and float(grad[1].abs().max()) == 0.0
        # the recomputing backward op gives the same gradient, times grad_loss
        gl = torch.tensor([0.5, 3.0, -1.0, 1.0, 2.0, 0.0], dtype=torch.float64)
        gb = OPS.amid_loss_topk_bwd(gl, s, lp, idx, None, w, tail, o["alpha"], o["lam"], o["divergence"],
                                    o["order"], 0.2, 0.7, 1.0, False)
        torch.testing.assert_close(gb, grad * gl[:, None], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_low_precision_vs_reference_and_dense_path(dtype, tail):
    # Inputs rounded to dtype; reference in float64 from the same rounded values. The op's error is at most
    # twice that of the dense-op path (which rounds the renorm teacher to dtype too) plus the dtype's gradient
    # rounding.
    s, _t, lp, idx = _data(n=8, v=64, k=16, seed=1, dtype=dtype)
    lp = lp.to(dtype)  # as stored in a cache (float16 / bfloat16); exact in float32
    labels = torch.tensor([1, 2, -100, 3, 4, 5, -100, 6])
    keep = labels != -100
    for o in OPTS[::3]:
        def run(fn, lp_=lp):
            x = s.clone().requires_grad_(True)
            loss = fn(x, lp_)
            loss.backward()
            return loss.detach().double(), x.grad.double()
        l_op, g_op = run(lambda x, lp_: amid.amid_loss_topk(x, lp_, idx.int(), labels, tail=tail, **o))
        lp_dense = lp if tail == "bucket" else lp  # dense path: renorm's teacher in the student dtype
        l_dn, g_dn = run(lambda x, lp_: amid_loss_topk_dense(x, lp_, idx, labels, tail=tail, **o), lp_dense)
        sd = s.double().requires_grad_(True)
        rows = amid_loss_topk_rows(sd, lp.double(), idx, tail=tail, **o)
        l_ref = torch.where(keep, rows, torch.zeros_like(rows)).sum() / keep.sum()
        (g_ref,) = torch.autograd.grad(l_ref, sd)
        l_ref = l_ref.detach()
        ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
        e_op, e_dn = normwise_err(g_op, g_ref), normwise_err(g_dn, g_ref)
        assert e_op <= 2 * e_dn + 4 * ulp + 1e-6, (o, e_op, e_dn)
        assert abs(float(l_op - l_ref)) <= 2 * abs(float(l_dn - l_ref)) + 1e-5 * (1 + abs(float(l_ref))), o
        assert g_op.abs()[~keep].max() == 0


def test_k_equal_v_matches_the_dense_op_in_float32():
    # k = V: both rules are the dense loss (tail bin empty); the teacher log-probabilities in any order.
    s, t, lp, idx = _data(v=33, k=33, dtype=torch.float32)
    perm = torch.argsort(torch.rand(idx.shape, generator=torch.Generator().manual_seed(5)), dim=-1)
    lp, idx = lp.gather(1, perm), idx.gather(1, perm)
    for tail in ("renorm", "bucket"):
        for o in OPTS[::2]:
            loss, grad = _op_rows(s, lp, idx, tail, o)
            dl, _st, dg = OPS.amid_loss_fwd(s, t.float(), None, o["alpha"], o["lam"], o["divergence"], o["order"],
                                            0.2, 0.7, 1.0, False, True)
            torch.testing.assert_close(loss, dl, rtol=1e-5, atol=1e-6, msg=str(o))
            torch.testing.assert_close(grad, dg, rtol=1e-4, atol=1e-6, msg=str(o))


def test_renorm_equals_dense_op_with_minus_inf_outside_the_topk_at_a_temperature():
    s, t, lp, idx = _data(dtype=torch.float32, v=50, k=7)
    lp = lp.float()
    t_masked = torch.full((6, 50), -math.inf).scatter(1, idx, lp)
    for o in OPTS[::3]:
        o = dict(o, temperature=1.7)
        loss, grad = _op_rows(s, lp, idx, "renorm", o)
        dl, _st, dg = OPS.amid_loss_fwd(s, t_masked, None, o["alpha"], o["lam"], o["divergence"], o["order"],
                                        0.2, 0.7, 1.7, False, True)
        # the same row routine on the same float32 values: equal up to the order of summation
        torch.testing.assert_close(loss, dl, rtol=1e-6, atol=1e-7, msg=str(o))
        torch.testing.assert_close(grad, dg, rtol=1e-6, atol=1e-7, msg=str(o))


def test_tail_gradient_spreads_as_q_over_q_tail():
    # bucket: the gradient at each tail token is G_tail * q_v / Q_tail, so the tail's share sums to G_tail.
    s, _t, lp, idx = _data(n=4, v=30, k=5, seed=2)
    for o in OPTS[::4]:
        _loss, grad = _op_rows(s, lp, idx, "bucket", o)
        q = torch.softmax(s, -1)
        tail = torch.ones_like(s, dtype=torch.bool).scatter(1, idx, False)
        g_tail = torch.where(tail, grad, torch.zeros_like(grad)).sum(-1, keepdim=True)
        q_tail = torch.where(tail, q, torch.zeros_like(q)).sum(-1, keepdim=True)
        torch.testing.assert_close(torch.where(tail, grad, torch.zeros_like(grad)),
                                   torch.where(tail, g_tail * q / q_tail, torch.zeros_like(q)), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(grad.sum(-1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_nan_rows_ignored_rows_and_empty_tail():
    s, _t, lp, idx = _data(n=4, v=20, k=4)
    s = s.clone()
    s[0, int(torch.ones(20).scatter(0, idx[0], 0).nonzero()[0])] = math.nan  # NaN in row 0's tail
    s[2] = math.nan  # row 2 ignored: never read
    bad_idx = idx.clone()
    bad_idx[2, 0] = 99  # ...not even its indices
    w = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    for tail in ("renorm", "bucket"):
        loss, grad = _op_rows(s, lp, bad_idx, tail, OPTS[0], w=w)
        assert math.isnan(loss[0]) and torch.isnan(grad[0]).all()
        assert loss[2] == 0 and (grad[2] == 0).all()
        assert torch.isfinite(loss[[1, 3]]).all() and torch.isfinite(grad[[1, 3]]).all()
    # student -inf on every tail token: an empty tail bin, finite loss and zero gradient there
    s2, _t, lp2, idx2 = _data(n=3, v=12, k=3)
    s2 = torch.full_like(s2, -math.inf).scatter(1, idx2, s2.gather(1, idx2))
    loss, grad = _op_rows(s2, lp2, idx2, "bucket", OPTS[0])
    ref = amid_loss_topk_rows(s2, lp2, idx2, tail="bucket", **OPTS[0])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-13)
    assert torch.isfinite(grad).all() and (grad.scatter(1, idx2, 0.0) == 0).all()


def _fwd_samples():
    for dtype, tail, idt in ((torch.float32, "bucket", torch.int32), (torch.float64, "renorm", torch.int64),
                             (torch.bfloat16, "bucket", torch.int64), (torch.float16, "renorm", torch.int32)):
        s, _t, lp, idx = _data(n=5, v=23, k=4, dtype=dtype)
        ldt = torch.float64 if dtype == torch.float64 else torch.float32
        lp, idx = lp.to(ldt), idx.to(idt)
        w = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0], dtype=ldt)
        tl = torch.log1p(-lp.exp().sum(-1)) if tail == "bucket" else None
        # requires_grad x compute_grad (False, True is the inference path: no gradient wanted), alternating options
        for i, (requires_grad, compute_grad) in enumerate(((True, True), (True, False), (False, False))):
            row_weight, opts = ((None, (0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False)),
                                (w, (-1.0, 0.7, "ab", "rq", 0.3, 0.6, 1.0 if tail == "bucket" else 2.0, True)))[i % 2]
            yield (s.clone().requires_grad_(requires_grad), lp, idx, tl, row_weight, tail) + opts + (compute_grad,)


def test_opcheck_fwd_and_bwd():
    for args in _fwd_samples():
        opcheck(OPS.amid_loss_topk_fwd.default, args)
    for args in itertools.islice(_fwd_samples(), 0, None, 3):
        s, lp, idx, tl, w, tail = args[:6]
        gl = torch.rand(5, dtype=lp.dtype) + 0.5
        opcheck(OPS.amid_loss_topk_bwd.default, (gl, s.detach(), lp, idx, tl, w, tail) + args[6:-1])


def test_gradcheck_float64():
    # gradcheck backpropagates several times through one output: the recomputing path (the gradient
    # written in the forward is handed out once); that both paths give the same gradient is checked below.
    s, _t, lp, idx = _data(n=3, v=9, k=3)
    labels = torch.tensor([1, -100, 2])
    for tail in ("renorm", "bucket"):
        for o in (dict(alpha=0.5, lam=0.2), dict(alpha=1.0, lam=0.4, divergence="ab", order="qr"),
                  dict(alpha=-3.0, lam=0.6, order="rq")):
            x = s.clone().requires_grad_(True)
            assert torch.autograd.gradcheck(
                lambda y: amid.amid_loss_topk(y, lp, idx, labels, tail=tail, grad_in_forward=False, **o), (x,))
            grads = []
            for gif in (True, False):
                y = s.clone().requires_grad_(True)
                amid.amid_loss_topk(y, lp, idx, labels, tail=tail, grad_in_forward=gif, **o).backward()
                grads.append(y.grad)
            assert torch.equal(grads[0], grads[1])


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    s, _t, lp, idx = _data(n=6, v=41, k=5, dtype=torch.float32)
    lp, idx = lp.half(), idx.int()
    labels = torch.tensor([1, -100, 2, 3, 4, -100])
    # one case (compiling is slow): the training path; both tails' fake kernels and the recomputing autograd
    # are traced by opcheck's aot_dispatch tests above
    for tail, gif in (("bucket", True),):
        def f(x):
            return 0.5 * amid.amid_loss_topk(x * 1.0, lp, idx, labels, tail=tail, grad_in_forward=gif) + 0.1 * x.pow(2).mean()
        cf = torch.compile(f, fullgraph=True)
        res = []
        for fn in (f, cf):
            x = s.clone().requires_grad_(True)
            out = fn(x)
            out.backward()
            res.append((out.detach(), x.grad))
        torch.testing.assert_close(res[1][0], res[0][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res[1][1], res[0][1], atol=1e-6, rtol=1e-5)


def test_backend_choice_and_double_backward_refused():
    s, _t, lp, idx = _data(n=4, v=16, k=4)
    for tail in ("renorm", "bucket"):
        # every option of the dense op reaches the op: detach_assistant, ab exponents, T (renorm), T^2 scale
        for o in (dict(order="rq", detach_assistant=True, divergence="ab", ab_alpha=0.4, ab_beta=0.9),
                  dict(order="qr", temperature=1.0 if tail == "bucket" else 2.5, scale_by_t2=True, alpha=-0.5)):
            res = []
            for backend in ("op", "dense"):
                x = s.clone().requires_grad_(True)
                loss = amid.amid_loss_topk(x, lp, idx, tail=tail, backend=backend, reduction="sum", **o)
                loss.backward()
                res.append((loss.detach(), x.grad))
            torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-9, atol=1e-13)
    with pytest.raises(ValueError, match="backend to be one of 'auto', 'op', 'dense'"):
        amid.amid_loss_topk(s, lp, idx, backend="cuda")
    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(amid.amid_loss_topk(x, lp, idx, grad_in_forward=False), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives .* not supported"):
        g.sum().backward()
    x = s.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(amid.amid_loss_topk(x, lp, idx), x, create_graph=True)


def _errors():
    s, _t, lp, idx = _data(n=3, v=10, k=3)
    o = (0.5, 0.1, "kl", "pr", 0.2, 0.7, 1.0, False, False)
    yield (s, lp, idx, None, None, "drop") + o, r"amid_loss_topk_fwd: expected tail to be one of 'renorm', 'bucket', but got 'drop'"
    yield (s, lp.float(), idx, None, None, "bucket") + o, r"expected teacher_logprobs of dtype Double, but got Float"
    yield (s, lp[:2], idx, None, None, "bucket") + o, r"expected teacher_logprobs of shape \[N, k\] with N = 3 and 1 <= k <= V = 10, but got \[2, 3\]"
    yield (s, lp, idx[:, :2], None, None, "bucket") + o, r"expected teacher_indices of shape \[3, 3\], but got \[3, 2\]"
    yield (s, lp, idx.float(), None, None, "bucket") + o, r"expected teacher_indices of dtype Int or Long, but got Float"
    yield (s, lp, idx, torch.zeros(3, dtype=torch.float64), None, "renorm") + o, r"teacher_tail_logmass only with tail 'bucket'"
    yield (s, lp, idx, torch.zeros(2, dtype=torch.float64), None, "bucket") + o, r"expected teacher_tail_logmass of shape \[3\], but got \[2\]"
    yield (s, lp, idx, None, None, "bucket") + o[:6] + (2.0,) + o[7:], r"expected temperature 1 with tail 'bucket'"
    yield (s, lp, idx, None, None, "renorm") + (0.5, 1.5) + o[2:], r"expected lam in \[0, 1\], but got 1.5"


def test_errors_eager_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode
    for args, msg in _errors():
        with pytest.raises(RuntimeError, match=msg):
            OPS.amid_loss_topk_fwd(*args)
        with FakeTensorMode() as mode:
            fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            with pytest.raises(RuntimeError, match=msg):
                OPS.amid_loss_topk_fwd(*fargs)


def test_bad_indices_rejected_by_the_op():
    s, _t, lp, idx = _data(n=4, v=20, k=4)
    for tail in ("renorm", "bucket"):
        bad = idx.clone()
        bad[2, 3] = bad[2, 1]
        with pytest.raises(RuntimeError, match=rf"amid_loss_topk_fwd: expected distinct teacher_indices in each row, "
                                               rf"but row 2 repeats index {int(idx[2, 1])}"):
            amid.amid_loss_topk(s, lp, bad, tail=tail, validate=False)
        for v in (20, -1):
            bad = idx.clone().int()
            bad[3, 0] = v
            with pytest.raises(RuntimeError, match=rf"expected teacher_indices in \[0, V\) with V = 20, but got {v} in row 3"):
                _op_rows(s, lp, bad, tail, OPTS[0])
        # the same op keeps working afterwards (per-thread index marks cleared)
        loss, _g = _op_rows(s, lp, idx, tail, OPTS[0])
        assert torch.isfinite(loss).all()
    # a row far from the first, with V large enough that rows are spread over threads (grain 1): the
    # error raised in a worker thread reaches the caller
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 40000, generator=g)
    idx = torch.stack([torch.randperm(40000, generator=g)[:3] for _ in range(6)])
    lp = torch.log_softmax(torch.randn(6, 3, generator=g), -1) - 1.0
    idx[5, 2] = 40000
    with pytest.raises(RuntimeError, match=r"but got 40000 in row 5"):
        _op_rows(s, lp, idx, "bucket", OPTS[0])
