"""Every error path: the message names the op, the argument, what was expected and what came; the
C++ kernels (eager) and the fake kernels (what torch.compile runs) say exactly the same."""
import math
import re

import pytest
import torch

import amid

OPTS = (0.5, 0.5, "kl", "pr", 0.2, 0.7, 1.0, False)  # alpha, lam, divergence, order, ab_a, ab_b, T, detach


def _fwd(s, t, w=None, opts=OPTS, compute_grad=False):
    return torch.ops.amid.amid_loss_fwd(s, t, w, *opts, compute_grad)


def _both(fn, *tensors, expected):
    """Run fn on real CPU tensors and on fake tensors (the fake kernels torch.compile uses, same
    strides); both raise `expected` exactly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(RuntimeError) as info:
        fn(*tensors)
    assert str(info.value).splitlines()[0] == expected, f"eager: {str(info.value)!r}"
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in tensors]
        with pytest.raises(RuntimeError) as info:
            fn(*args)
    assert str(info.value).splitlines()[0] == expected, f"fake: {str(info.value)!r}"


s = torch.randn(2, 5)
t = torch.randn(2, 5)
P = "amid::amid_loss_fwd: "

FWD_CASES = [
    # (student, teacher, row_weight, options, expected message)
    (torch.randn(2, 3, 4), torch.randn(2, 3, 4), None, OPTS,
     P + "expected student_logits to be 2-D [N, V], but got a 3-D tensor of shape [2, 3, 4]"),
    (s, torch.randn(5), None, OPTS, P + "expected teacher_logits to be 2-D [N, V], but got a 1-D tensor of shape [5]"),
    (s, torch.randn(2, 6), None, OPTS,
     P + "expected student_logits and teacher_logits to have the same shape, but got [2, 5] and [2, 6]"),
    (torch.randn(2, 0), torch.randn(2, 0), None, OPTS,
     P + "expected a vocabulary of at least 1 entry, but got student_logits of shape [2, 0]"),
    (s, t.double(), None, OPTS,
     P + "expected student_logits and teacher_logits to have the same dtype, but got Float and Double"),
    (s.int(), t.int(), None, OPTS,
     P + "expected student_logits of dtype float16, bfloat16, float32 or float64, but got Int"),
    (torch.randn(2, 10)[:, ::2], t, None, OPTS,
     P + "expected student_logits to have stride 1 in the last dimension, but got stride 2"),
    (s, torch.randn(2, 10)[:, ::2], None, OPTS,
     P + "expected teacher_logits to have stride 1 in the last dimension, but got stride 2"),
    (s, t, torch.ones(3), OPTS, P + "expected row_weight of shape [2], but got [3]"),
    (s, t, torch.ones(2, dtype=torch.float64), OPTS, P + "expected row_weight of dtype Float, but got Double"),
    (s, t, None, (math.nan,) + OPTS[1:], P + "expected a finite alpha, but got nan"),
    (s, t, None, (0.5, 1.5) + OPTS[2:], P + "expected lam in [0, 1], but got 1.5"),
    (s, t, None, (0.5, -0.25) + OPTS[2:], P + "expected lam in [0, 1], but got -0.25"),
    (s, t, None, OPTS[:6] + (0.0, False), P + "expected temperature > 0, but got 0"),
    (s, t, None, OPTS[:6] + (-2.0, False), P + "expected temperature > 0, but got -2"),
    (s, t, None, (0.5, 0.5, "js") + OPTS[3:], P + "expected divergence to be one of 'kl', 'ab', but got 'js'"),
    (s, t, None, (0.5, 0.5, "kl", "pq") + OPTS[4:],
     P + "expected order to be one of 'pr', 'qr', 'rp', 'rq', 'jsd', but got 'pq'"),
    (s, t, None, (0.5, 0.5, "ab", "pr", 0.0, 0.7, 1.0, False),
     P + "expected ab_alpha > 0 for the alpha-beta divergence, but got 0"),
    (s, t, None, (0.5, 0.5, "ab", "pr", 0.2, -1.0, 1.0, False),
     P + "expected ab_beta > 0 for the alpha-beta divergence, but got -1"),
    (s, t, None, (0.5, 0.5, "kl", "pr", 0.2, 0.7, 1.0, True),
     P + "expected order 'qr' or 'rq' with detach_assistant=True (in 'pr' the student enters only through the "
         "assistant, so detaching it leaves no gradient), but got order 'pr'"),
    (s, t, None, (-1.0, 0.5, "kl", "jsd", 0.2, 0.7, 1.0, True),
     P + "expected detach_assistant=False with order 'jsd' (a detached assistant is supported for 'qr' and 'rq' "
         "only), but got detach_assistant=True"),
]


@pytest.mark.parametrize("case", FWD_CASES, ids=[c[-1][len(P):60] for c in FWD_CASES])
def test_fwd_errors(case):
    student, teacher, w, opts, expected = case
    _both(lambda a, b, c: _fwd(a, b, c, opts), student, teacher, w, expected=expected)


def test_bwd_errors():
    Pb = "amid::amid_loss_bwd: "
    _, stats, _ = _fwd(s, t)
    gl = torch.ones(2)
    bwd = torch.ops.amid.amid_loss_bwd
    _both(lambda g, a, b, st: bwd(g, a, b, None, st, *OPTS), torch.ones(3), s, t, stats,
          expected=Pb + "expected grad_loss of shape [2], but got [3]")
    _both(lambda g, a, b, st: bwd(g, a, b, None, st, *OPTS), gl, s, t, stats[:, :4],
          expected=Pb + "expected stats of shape [2, 8], but got [2, 4]")
    _both(lambda g, a, b, st: bwd(g, a, b, None, st, *OPTS), gl, s, t, stats.double(),
          expected=Pb + "expected stats of dtype Float, but got Double")
    _both(lambda g, a, b, st: bwd(g, a, b, None, st, 0.5, 2.0, *OPTS[2:]), gl, s, t, stats,
          expected=Pb + "expected lam in [0, 1], but got 2")


def test_scale_grad_errors():
    Ps = "amid::scale_grad_: "
    _both(lambda g, gl: torch.ops.amid.scale_grad_(g, gl), torch.randn(4, 6).t(), torch.ones(6),
          expected=Ps + "expected grad to be a contiguous 2-D [N, V] tensor, but got shape [6, 4]")
    _both(lambda g, gl: torch.ops.amid.scale_grad_(g, gl), torch.randn(4, 6), torch.ones(4, dtype=torch.float64),
          expected=Ps + "expected grad_loss of dtype Float, but got Double")


def test_python_api_errors():
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    A = dict(alpha=0.5, lam=0.5)
    cases = [
        (lambda: amid.amid_loss(x, torch.randn(3, 9), **A),
         "amid.amid_loss: expected student_logits and teacher_logits to have the same shape, but got [3, 8] and [3, 9] "
         "(heads padded to different vocabulary sizes with one tokenizer: pass vocab_size= the real vocabulary size "
         "to compare the shared part)"),
        (lambda: amid.amid_loss(x, y.clone().requires_grad_(True), **A),
         "amid.amid_loss: expected teacher_logits not to require grad (detach the teacher or run it under "
         "torch.no_grad()), but it requires grad"),
        (lambda: amid.amid_loss(x, y, reduction="avg", **A),
         "amid.amid_loss: expected reduction to be one of 'mean', 'batchmean', 'sum', 'none', but got 'avg'"),
        (lambda: amid.amid_loss(x, y, reduction="sum", normalizer=3, **A),
         "amid.amid_loss: expected normalizer only with reduction='mean' or 'batchmean', but got reduction='sum'"),
        (lambda: amid.amid_loss(x, y, normalizer=0, **A), "amid.amid_loss: expected normalizer > 0, but got 0"),
        (lambda: amid.amid_loss(x, y, torch.zeros(3), **A),
         "amid.amid_loss: expected labels to be an integer tensor, but got torch.float32"),
        (lambda: amid.amid_loss(x, y, torch.zeros(4, dtype=torch.long), **A),
         "amid.amid_loss: expected labels of shape [3] (the logits' leading dimensions), but got [4]"),
        (lambda: amid.amid_loss(x, y, backend="triton", **A),
         "amid.amid_loss: expected backend to be one of 'auto', 'kernels', 'reference', but got 'triton'"),
        (lambda: amid.AMiDLoss(alpha=0.5, lam=0.5)(x, torch.randn(2, 8)),
         "amid.AMiDLoss: expected student_logits and teacher_logits to have the same shape, but got [3, 8] and [2, 8]"),
        (lambda: amid.amid_loss(torch.tensor(1.0), torch.tensor(1.0), **A),
         "amid.amid_loss: expected student_logits of shape [..., V], but got a 0-D tensor"),
    ]
    for fn, expected in cases:
        with pytest.raises(ValueError) as info:
            fn()
        assert str(info.value) == expected
    # option errors surface from the op with its name
    with pytest.raises(RuntimeError, match=re.escape("amid::amid_loss_fwd: expected lam in [0, 1], but got 1.5")):
        amid.amid_loss(x, y, alpha=0.5, lam=1.5)
    with pytest.raises(RuntimeError, match=re.escape("amid::amid_loss_fwd: expected lam in [0, 1], but got 1.5")):
        amid.reference.amid_loss(x, y, alpha=0.5, lam=1.5)


def test_gradient_to_teacher_or_row_weight_is_refused_at_op_level():
    x = torch.randn(2, 5, requires_grad=True)
    y = torch.randn(2, 5, requires_grad=True)
    loss, _, _ = _fwd(x, y)
    with pytest.raises(RuntimeError, match="gradients with respect to teacher_logits are not supported"):
        loss.sum().backward()
    w = torch.ones(2, requires_grad=True)
    loss, _, _ = _fwd(x, t, w)
    with pytest.raises(RuntimeError, match="gradients with respect to row_weight are not supported"):
        loss.sum().backward()


def test_double_backward_on_the_default_path_is_refused():
    """The gradient written in the forward is a constant: create_graph=True gets amid's message,
    naming create_graph and the way out (grad_in_forward=False, see tests/test_double_backward.py)."""
    x = torch.randn(2, 5, requires_grad=True)
    loss = amid.amid_loss(x, t, alpha=0.5, lam=0.5)
    with pytest.raises(RuntimeError) as info:
        torch.autograd.grad(loss, x, create_graph=True)
    assert str(info.value) == (
        "amid::amid_loss_fwd: create_graph=True (double backward, e.g. Hessian-vector products) through a loss "
        "whose gradient was computed in the forward (grad_in_forward=True, the default when the student requires "
        "grad) is not supported: that gradient is a constant, so its derivatives would be silently wrong; call the "
        "loss with grad_in_forward=False to differentiate its gradient")


# ------------------------------------------------------------------------------------------------
# Issue 15 item 12: every bad argument is named (functions, modules, the fused loss), and
# numpy integers / empty tensors with odd strides are accepted.

def _bad_argument_cases():
    import numpy as np

    x, y = torch.randn(3, 8), torch.randn(3, 8)
    lab = torch.zeros(3, dtype=torch.long)
    h, w = torch.randn(4, 8), torch.randn(6, 8)
    A = dict(alpha=0.5, lam=0.5)
    fused = amid.fused_linear_amid_loss
    return [
        (lambda: amid.amid_loss(torch.randn(3, 0), torch.randn(3, 0), **A),
         "amid.amid_loss: expected a vocabulary of at least 1 entry (logits of shape [..., V] with V >= 1), but got "
         "student_logits of shape [3, 0]"),
        (lambda: amid.amid_loss(x, y, lab, ignore_index=2 ** 70, **A),
         "amid.amid_loss: expected ignore_index to be an integer in the int64 range, but got 1180591620717411303424"),
        (lambda: amid.amid_loss(x, y, lab, ignore_index=1.5, **A),
         "amid.amid_loss: expected ignore_index to be an integer in the int64 range, but got 1.5"),
        (lambda: amid.amid_loss(x, y, normalizer="3", **A),
         "amid.amid_loss: expected normalizer to be a number or a 0-D tensor, but got '3'"),
        (lambda: amid.amid_loss(x, y, normalizer=torch.tensor(True), **A),
         "amid.amid_loss: expected a real normalizer tensor, but got dtype torch.bool"),
        (lambda: amid.amid_loss(x, y, alpha="x", lam=0.5),
         "amid.amid_loss: expected alpha to be a real number, but got 'x'"),
        (lambda: amid.amid_loss(x, y, alpha=0.5, lam=None),
         "amid.amid_loss: expected lam to be a real number, but got None"),
        (lambda: amid.amid_loss(x, y, temperature="2", **A),
         "amid.amid_loss: expected temperature to be a real number, but got '2'"),
        (lambda: amid.amid_loss(x, y, ab_beta=torch.ones(2), **A),
         "amid.amid_loss: expected ab_beta to be a real number, but got tensor([1., 1.])"),
        (lambda: amid.amid_loss(x, y, divergence=3, **A),
         "amid.amid_loss: expected divergence to be one of 'kl', 'ab', but got 3"),
        (lambda: amid.forward_kl(x, y, temperature="x"),
         "amid.forward_kl: expected temperature to be a real number, but got 'x'"),
        (lambda: amid.AMiDLoss(alpha="x", lam=0.5),
         "amid.AMiDLoss: expected alpha to be a real number, but got 'x'"),
        (lambda: amid.AMiDLoss(alpha=0.5, lam=0.5, ignore_index=2 ** 70),
         "amid.AMiDLoss: expected ignore_index to be an integer in the int64 range, but got 1180591620717411303424"),
        (lambda: amid.AMiDLoss(**A)(x, y, normalizer="3"),
         "amid.AMiDLoss: expected normalizer to be a number or a 0-D tensor, but got '3'"),
        (lambda: amid.FusedLinearAMiDLoss(alpha=0.5, lam="x"),
         "amid.FusedLinearAMiDLoss: expected lam to be a real number, but got 'x'"),
        (lambda: fused(h, w, h, w, torch.tensor([0, 1, 7, 2]), ce_weight=1.0, **A),
         "amid.fused_linear_amid_loss: expected labels in [0, 6) (the vocabulary) or equal to ignore_index=-100, "
         "but got 7"),
        (lambda: fused(h, w, h, w, torch.tensor([0, -5, -100, 2]), ce_weight=1.0, **A),
         "amid.fused_linear_amid_loss: expected labels in [0, 6) (the vocabulary) or equal to ignore_index=-100, "
         "but got -5"),
        (lambda: fused(h, w, h, w, alpha="x", lam=0.5),
         "amid.fused_linear_amid_loss: expected alpha to be a real number, but got 'x'"),
        (lambda: fused(h, w, h, w, ce_weight="x", **A),
         "amid.fused_linear_amid_loss: expected ce_weight to be a real number, but got 'x'"),
        (lambda: fused(h, w, h, w, normalizer="3", **A),
         "amid.fused_linear_amid_loss: expected normalizer to be a number or a 0-D tensor, but got '3'"),
        (lambda: fused(h, w, h, w, torch.zeros(4, dtype=torch.long), ignore_index=2 ** 70, **A),
         "amid.fused_linear_amid_loss: expected ignore_index to be an integer in the int64 range, but got "
         "1180591620717411303424"),
        (lambda: fused(h, w, h, w, chunk_size=np.float64(4.0), **A),
         "amid.fused_linear_amid_loss: expected chunk_size to be None or an integer >= 1, but got np.float64(4.0)"),
        (lambda: fused(h, w[:0], h, w[:0], **A),
         "amid.fused_linear_amid_loss: expected a vocabulary of at least 1 entry, but got student_weight of shape "
         "[0, 8]"),
        (lambda: torch.func.grad(lambda z: fused(z, w, h, w, **A))(h),
         "amid.fused_linear_amid_loss: torch.func transforms (grad, vjp, jacrev, vmap, jvp) are not supported: the "
         "gradients are computed chunk by chunk inside the forward; use amid.amid_loss on the logits, which "
         "supports torch.func.grad, vjp, jacrev and vmap"),
    ]


def test_bad_arguments_are_named():
    for fn, expected in _bad_argument_cases():
        with pytest.raises(ValueError) as info:
            fn()
        assert str(info.value) == expected


def test_numpy_scalars_and_empty_tensors_are_accepted():
    import numpy as np

    h, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    ht = torch.randn(4, 8, dtype=torch.float64)
    labels = torch.tensor([0, 5, -100, 2])
    base = amid.fused_linear_amid_loss(h, w, ht, w, labels, alpha=0.5, lam=0.5, ce_weight=0.5, chunk_size=4)
    for cs in (np.int64(4), np.int32(4)):
        got = amid.fused_linear_amid_loss(h, w, ht, w, labels, alpha=np.float64(0.5), lam=np.float32(0.5),
                                          ce_weight=0.5, chunk_size=cs, ignore_index=np.int64(-100))
        assert torch.equal(got, base)
    s, t = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    lab = torch.tensor([1, 2, 3])
    torch.testing.assert_close(amid.amid_loss(s, t, lab, alpha=np.float64(0.5), lam=torch.tensor(0.5),
                                              ignore_index=np.int64(2), normalizer=np.float32(4.0)),
                               amid.amid_loss(s, t, lab, alpha=0.5, lam=0.5, ignore_index=2, normalizer=4.0))
    # an empty [0, V] tensor is accepted whatever its strides (it was rejected on stride 0)
    for strides in ((0, 0), (1, 7), (8, 1)):
        e = torch.empty_strided((0, 8), strides, dtype=torch.float64).requires_grad_(True)
        te = torch.empty_strided((0, 8), strides, dtype=torch.float64)
        for reduction in ("mean", "sum"):
            loss = amid.amid_loss(e, te, alpha=0.5, lam=0.5, reduction=reduction)
            assert loss.item() == 0.0
        assert amid.amid_loss(e, te, alpha=0.5, lam=0.5, reduction="none").shape == (0,)
        loss.backward()
        assert e.grad.shape == (0, 8)


def test_tensor_normalizer_is_validated_without_a_host_sync():
    """Issue 15 item 7: a 0-D tensor normalizer of 0 or < 0 gave inf / a negated loss. A CPU tensor
    is checked like a number; an accelerator tensor is not read back: the loss becomes NaN."""
    from amid.functional import _base_row_weights

    s, t = torch.randn(3, 8), torch.randn(3, 8)
    for bad in (torch.tensor(0.0), torch.tensor(-2.0), torch.tensor(float("inf")), torch.tensor(0)):
        with pytest.raises(ValueError, match=r"^amid.amid_loss: expected normalizer > 0, but got .* \(a tensor\)$"):
            amid.amid_loss(s, t, alpha=0.5, lam=0.5, normalizer=bad)
        with pytest.raises(ValueError, match=r"^amid.fused_linear_amid_loss: expected normalizer > 0"):
            amid.fused_linear_amid_loss(s, torch.randn(5, 8), t, torch.randn(5, 8), alpha=0.5, lam=0.5,
                                        normalizer=bad)
        # the path of a device tensor (no host read): the row weights, hence loss and gradient, are NaN
        wts = _base_row_weights(None, 3, "mean", bad, torch.float32, torch.device("cpu"))
        assert torch.isnan(wts).all()
    good = _base_row_weights(None, 3, "mean", torch.tensor(4), torch.float32, torch.device("cpu"))
    assert torch.equal(good, torch.full((3,), 0.25))
    torch.testing.assert_close(amid.amid_loss(s, t, alpha=0.5, lam=0.5, normalizer=torch.tensor(6.0)),
                               amid.amid_loss(s, t, alpha=0.5, lam=0.5, normalizer=6.0))


def test_fused_labels_outside_the_vocabulary_without_a_host_sync():
    """On an accelerator the fused CE does not read labels back: a bad label makes its row NaN."""
    from amid.fused_linear import _guard_labels

    y = torch.tensor([0, 7, 2, -3])
    ce_w = torch.full((4,), 0.25)
    y2, w2 = _guard_labels("f", y, ce_w, 6, -100, on_host=False)
    assert y2.tolist() == [0, 0, 2, 0]
    assert torch.isnan(w2[[1, 3]]).all() and w2[[0, 2]].tolist() == [0.25, 0.25]
    with pytest.raises(ValueError, match=r"^amid.f: expected labels in \[0, 6\)"):
        _guard_labels("f", y, ce_w, 6, -100, on_host=True)


def test_fused_loss_refuses_create_graph():
    """The fused loss's gradients are computed without a graph: under create_graph=True it used to
    hand out a gradient whose derivative was silently 0 (H·v = v for loss + |h|²/2)."""
    h = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w, ht = torch.randn(6, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    for reduction in ("mean", "none"):
        out = amid.fused_linear_amid_loss(h, w, ht, w, alpha=0.5, lam=0.3, reduction=reduction).sum()
        with pytest.raises(RuntimeError) as info:
            torch.autograd.grad(out + 0.5 * (h ** 2).sum(), h, create_graph=True)
        assert str(info.value).startswith("amid.fused_linear_amid_loss: create_graph=True (double backward")
    (g,) = torch.autograd.grad(amid.fused_linear_amid_loss(h, w, ht, w, alpha=0.5, lam=0.3), h)
    assert torch.isfinite(g).all() and not g.requires_grad


def test_op_accepts_empty_logits_with_any_strides():
    """An empty [0, V] pair is valid whatever its strides (e.g. (0, 0) from expand or empty_strided):
    nothing is read, so the unit-stride rule does not apply (eager and fake kernels alike)."""
    s = torch.empty_strided((0, 5), (0, 0))
    t = torch.empty_strided((0, 5), (0, 0))
    for fn in (lambda a, b: amid.ops.amid_loss_fwd(a, b, None, *OPTS, True),
               torch.compile(lambda a, b: amid.ops.amid_loss_fwd(a, b, None, *OPTS, True), backend="eager")):
        rows, stats, grad = fn(s, t)
        assert rows.shape == (0,) and stats.shape == (0, amid.ops.NUM_STATS) and grad.shape == (0, 5)
