"""amid.testing (issue 11, item 12): amid's own losses conform; deliberately wrong losses are caught
and the cause is named; TRL's and Liger's losses (where installed) give the table in the README."""
import pytest
import torch
import torch.nn.functional as F

import amid
from amid.testing import CASES, ConformanceError, Conventions, assert_matches, check, check_peer, peer_losses

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models and tensors: one intra-op thread is fastest, and keeps the suite quick on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


AMID_KINDS = [
    ("forward_kl", amid.forward_kl, {}),
    ("reverse_kl", amid.reverse_kl, {}),
    ("gjsd", lambda s, t, y: amid.generalized_jsd(s, t, y, beta=0.3), dict(beta=0.3)),
    ("gjsd", lambda s, t, y: amid.generalized_jsd(s, t, y, beta=0.0), dict(beta=0.0)),
    ("gjsd", lambda s, t, y: amid.generalized_jsd(s, t, y, beta=1.0, endpoints="limit"),
     dict(beta=1.0, endpoints="limit")),
    ("skew_kl", lambda s, t, y: amid.skew_forward_kl(s, t, y, skew=0.2), dict(skew=0.2)),
    ("skew_rkl", amid.skew_reverse_kl, {}),
    ("taid", lambda s, t, y: amid.taid_loss(s, t, y, tau=0.4), dict(tau=0.4)),
    ("ab", amid.ab_divergence, {}),
    ("amid", lambda s, t, y: amid.amid_loss(s, t, y, alpha=-0.5, lam=0.3, divergence="ab", order="rq"),
     dict(alpha=-0.5, lam=0.3, divergence="ab", order="rq")),
]


@pytest.mark.parametrize("kind,fn,params", AMID_KINDS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(AMID_KINDS)])
def test_amid_conforms(kind, fn, params):
    res = assert_matches(fn, kind, **params)
    assert [r.case for r in res] == list(CASES) and all(r.ok and not r.skipped for r in res)


def test_conventions_layout_reduction_temperature():
    assert_matches(lambda s, t, y: amid.forward_kl(s, t, y, temperature=2.0, scale_by_t2=True, reduction="sum"),
                   "forward_kl", conventions=dict(layout="batched", reduction="sum", temperature=2.0, scale_by_t2=True))
    assert_matches(lambda t, s, y: amid.reverse_kl(s, t, y, reduction="none"), "reverse_kl",
                   conventions=Conventions(call="teacher_student", reduction="none"))
    assert_matches(lambda s, t: F.kl_div(s, t, reduction="batchmean", log_target=True), "forward_kl",
                   conventions=dict(inputs="log_probs", labels=False, reduction="batchmean"),
                   cases=[c for c in CASES if c != "masked_vocab"])
    # float32 inputs: amid's kernels within float32 tolerances, the tiny divergences included
    assert_matches(lambda s, t, y: amid.generalized_jsd(s, t, y, beta=0.7), "gjsd", beta=0.7, dtype=torch.float32,
                   atol=1e-5, rtol=1e-4)


def _lp(x):
    return torch.log_softmax(x, -1)


def _rows_kl(lx, ly):  # sum x (log x - log y), rows
    return (lx.exp() * (lx - ly)).sum(-1)


WRONG = [
    # (what it claims, the wrong function, params, conventions, the cause the message must name)
    ("forward_kl", lambda s, t, y: amid.reverse_kl(s, t, y), {}, {}, "direction swapped"),
    ("gjsd", lambda s, t, y: amid.generalized_jsd(s, t, y, beta=0.0, endpoints="limit"), dict(beta=0.0), {},
     "beta endpoints"),
    ("gjsd", lambda s, t, y: amid.generalized_jsd(s, t, y, beta=0.2), dict(beta=0.8), {}, "direction swapped"),
    ("forward_kl", lambda s, t: F.kl_div(s, t, reduction="sum", log_target=True) / s.numel(), {},
     dict(inputs="log_probs", labels=False, reduction="batchmean"), "reduction='vocab_mean'"),
    ("forward_kl", lambda s, t, y: amid.forward_kl(s, t, y, temperature=2.0), {},
     dict(temperature=2.0, scale_by_t2=True), "T² scale missing"),
    ("forward_kl", lambda s, t, y: amid.forward_kl(s, t, y), {}, dict(temperature=2.0), "ignores temperature=2"),
    ("forward_kl", lambda s, t, y: amid.forward_kl(s, t), {}, {}, "ignored rows not masked"),
    ("forward_kl", lambda s, t, y: (-(_lp(t).exp() * _lp(s)).sum(-1)).mean(), {}, dict(labels=True),
     "cross-entropy form"),
    ("forward_kl", lambda s, t, y: amid.forward_kl(s, t, y, reduction="sum"), {}, {}, "reduction='sum'"),
]


@pytest.mark.parametrize("kind,fn,params,conv,cause", WRONG, ids=[w[-1] for w in WRONG])
def test_wrong_losses_are_caught_and_named(kind, fn, params, conv, cause):
    cases = ["ignored_rows"] if "ignored rows" in cause else ["random"]
    with pytest.raises(ConformanceError) as info:
        assert_matches(fn, kind, conventions=conv, cases=cases, **params)
    msg = str(info.value)
    assert msg.startswith(f"amid.testing: loss_fn does not match '{kind}") and cause in msg, msg


def test_gradient_mismatch_and_errors_are_reported():
    # right value, wrong gradient (detached student inside the loss)
    def half_detached(s, t, y):
        v = amid.forward_kl(s, t, y)
        return v.detach() + 0.5 * (v - v.detach())

    with pytest.raises(ConformanceError, match="on case 'random': gradient differs from the reference"):
        assert_matches(half_detached, "forward_kl")
    with pytest.raises(ConformanceError, match="raised RuntimeError: boom"):
        assert_matches(lambda s, t, y: (_ for _ in ()).throw(RuntimeError("boom")), "forward_kl")
    # a loss that only differs on tiny divergences is not hidden by the absolute tolerance
    res = check(lambda s, t, y: amid.forward_kl(s, t, y) * 1.01, "forward_kl", cases=["tiny_divergence"])
    assert not res[0].ok
    with pytest.raises(ValueError, match="amid.testing: expected kind to be one of"):
        check(amid.forward_kl, "kl")
    with pytest.raises(ValueError, match="amid.testing: expected conventions reduction to be one of"):
        check(amid.forward_kl, "forward_kl", conventions=dict(reduction="avg"))


# ---- peers: the table in the README --------------------------------------------------------------
# Documented outcomes (README "Conformance"): every peer passes every case except these.
KNOWN = {
    "torch F.kl_div(batchmean)": {"masked_vocab"},  # NaN: 0 * (-inf - -inf)
    "TRL GKD generalized_jsd_loss": {"masked_vocab"},
    "TRL GKD generalized_jsd_loss beta=0.5 reduction='mean'": set(CASES),  # divides by V too
    "TRL DistillationTrainer chunked loss": {"tiny_divergence", "huge_logits", "masked_vocab"},  # fp32 inside
    "Liger LigerFusedLinearJSDLoss": {"masked_vocab"},
}


def _known(name):
    for k in sorted(KNOWN, key=len, reverse=True):
        if name.startswith(k):
            return KNOWN[k]
    return set()


PEERS = peer_losses()


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_table(name):
    res = check_peer(PEERS[name])
    failed = {r.case for r in res if not r.ok and not r.skipped}
    assert failed == _known(name) & {r.case for r in res if not r.skipped}, [(r.case, r.message) for r in res]


def test_peers_present_when_installed():
    for mod, prefix in (("trl", "TRL GKD"), ("liger_kernel", "Liger")):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001
            continue
        assert any(n.startswith(prefix) for n in PEERS), f"{mod} is installed but no {prefix} entry was built"


@pytest.mark.parametrize("beta,order", [(0.0, "pr"), (1.0, "rp")])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_liger_fused_linear_port(beta, order, temperature):
    """LigerFusedLinearJSDLoss (soft + hard loss) at its KL ends as single-order fused_linear_amid_loss calls:
    same loss and gradients (the README's port, fused_linear_generalized_jsd, at every beta: test_fused_jsd.py)."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    g = torch.Generator().manual_seed(0)
    n, v = 12, 20
    hs = torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(v, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    y[::3] = -100
    liger = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=beta,
                                            temperature=temperature, compiled=False)
    a = liger(hs, ws, ht, wt, y)
    ga = torch.autograd.grad(a, (hs, ws))
    b = amid.fused_linear_amid_loss(hs, ws, ht, wt, y, alpha=1.0, lam=0.0, order=order, temperature=temperature,
                                    kd_weight=0.5, ce_weight=0.5)
    gb = torch.autograd.grad(b, (hs, ws))
    torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-6)  # Liger returns a float32 value
    for x, y_ in zip(ga, gb):
        torch.testing.assert_close(x, y_, atol=1e-7, rtol=1e-5)  # Liger accumulates in float32
