"""Conventions a user porting from TRL / Liger / torch expects (issue 11, traps 1-6, item 8).

Everything float64 on CPU against hand-written torch definitions (and TRL's own function where
``trl`` is installed), loss and gradient.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import amid
from amid.functional import DEFAULT_ALPHA, DEFAULT_LAM

F64 = torch.float64
B, S, V = 3, 5, 17
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models and tensors: one intra-op thread is fastest, and keeps the suite quick on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def data(b=B, s=S, v=V, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, v, generator=g, dtype=F64) * 2
    t = torch.randn(b, s, v, generator=g, dtype=F64) * 3 + 0.5
    y = torch.randint(0, v, (b, s), generator=g)
    if ignore:
        y[0, :2] = -100
        y[2, 4] = -100
    return x, t, y


def value_and_grad(fn, x, t, y):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, t, y)
    out.backward()
    return out.detach(), x.grad


def assert_same(fn_a, fn_b, x, t, y, atol=1e-10, rtol=1e-9):
    va, ga = value_and_grad(fn_a, x, t, y)
    vb, gb = value_and_grad(fn_b, x, t, y)
    torch.testing.assert_close(va, vb.to(va.dtype), atol=atol, rtol=rtol)
    torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol)


def torch_forward_kl_rows(x, t, T=1.0):  # KL(p || q) per row, teacher p, student q
    lp, lq = F.log_softmax(t / T, -1), F.log_softmax(x / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def torch_gjsd_rows(x, t, beta):  # textbook beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
    lp, lq = F.log_softmax(t, -1), F.log_softmax(x, -1)
    if beta == 0.0:
        return (lp.exp() * (lp - lq)).sum(-1)
    if beta == 1.0:
        return (lq.exp() * (lq - lp)).sum(-1)
    lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log1p(-beta)]), 0)
    return beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)


def masked_mean(rows, y):
    m = y != -100
    return (rows * m).sum() / m.sum()


# ---- trap 1: generalized JSD endpoints follow TRL / Liger ---------------------------------------

@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_matches_trl_convention(beta):
    x, t, y = data()
    assert_same(lambda a, b, c: amid.generalized_jsd(a, b, c, beta=beta),
                lambda a, b, c: masked_mean(torch_gjsd_rows(a, b, beta), c), x, t, y)


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl():
    x, t, y = data()
    assert_same(lambda a, b, c: amid.generalized_jsd(a, b, c, beta=0.0), amid.forward_kl, x, t, y)
    assert_same(lambda a, b, c: amid.generalized_jsd(a, b, c, beta=1.0), amid.reverse_kl, x, t, y)
    # the two ends really differ (a swapped direction would not pass both)
    assert abs(amid.generalized_jsd(x, t, y, beta=0.0) - amid.generalized_jsd(x, t, y, beta=1.0)) > 1e-3


def test_generalized_jsd_limit_endpoints_option():
    x, t, y = data()
    for beta in (0.0, 1.0):
        v, g = value_and_grad(lambda a, b, c: amid.generalized_jsd(a, b, c, beta=beta, endpoints="limit"), x, t, y)
        assert v.item() == 0.0 and g.abs().max().item() == 0.0
    # interior values do not depend on the option
    assert amid.generalized_jsd(x, t, y, beta=0.3, endpoints="limit") == amid.generalized_jsd(x, t, y, beta=0.3)
    with pytest.raises(ValueError, match="amid.generalized_jsd: expected endpoints to be 'kl' or 'limit', but got 'x'"):
        amid.generalized_jsd(x, t, y, endpoints="x")


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_against_trl_itself(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    trl_jsd = gkd.GKDTrainer.generalized_jsd_loss
    x, t, y = data()
    # TRL's default reduction 'batchmean' with labels: mean over kept tokens; amid's 'batchmean' too.
    assert_same(lambda a, b, c: amid.generalized_jsd(a, b, c, beta=beta, temperature=temperature,
                                                     reduction="batchmean"),
                lambda a, b, c: trl_jsd(a, b, c, beta=beta, temperature=temperature), x, t, y)
    # without labels TRL's batchmean divides by the batch size B
    assert_same(lambda a, b, c: amid.generalized_jsd(a, b, None, beta=beta, temperature=temperature,
                                                     reduction="batchmean"),
                lambda a, b, c: trl_jsd(a, b, None, beta=beta, temperature=temperature), x, t, y)
    # num_items_in_batch: sum / the global count, under the same name
    assert_same(lambda a, b, c: amid.generalized_jsd(a, b, c, beta=beta, temperature=temperature,
                                                     num_items_in_batch=40),
                lambda a, b, c: trl_jsd(a, b, c, beta=beta, temperature=temperature, num_items_in_batch=40), x, t, y)


# ---- trap 2: reduction="batchmean" --------------------------------------------------------------

def test_batchmean_meaning():
    x, t, y = data()
    rows = torch_forward_kl_rows(x, t)
    # with labels: mean over kept rows (= 'mean')
    torch.testing.assert_close(amid.forward_kl(x, t, y, reduction="batchmean"), masked_mean(rows, y))
    torch.testing.assert_close(amid.forward_kl(x, t, y, reduction="batchmean"), amid.forward_kl(x, t, y))
    # without labels: sum / first dimension, exactly F.kl_div(..., 'batchmean') on [B, S, V] and on [N, V]
    lp, lq = F.log_softmax(t, -1), F.log_softmax(x, -1)
    torch.testing.assert_close(amid.forward_kl(x, t, reduction="batchmean"),
                               F.kl_div(lq, lp, reduction="batchmean", log_target=True))
    torch.testing.assert_close(amid.forward_kl(x, t, reduction="batchmean"), rows.sum() / B)
    x2, t2 = x.reshape(-1, V), t.reshape(-1, V)
    torch.testing.assert_close(amid.forward_kl(x2, t2, reduction="batchmean"),
                               F.kl_div(F.log_softmax(x2, -1), F.log_softmax(t2, -1), reduction="batchmean",
                                        log_target=True))
    # a single row [V]: divided by 1
    torch.testing.assert_close(amid.forward_kl(x[0, 0], t[0, 0], reduction="batchmean"), rows[0, 0])
    # gradient of batchmean = gradient of sum / B
    assert_same(lambda a, b, c: amid.amid_loss(a, b, reduction="batchmean"),
                lambda a, b, c: amid.amid_loss(a, b, reduction="sum") / B, x, t, y)
    # normaliser also with batchmean
    torch.testing.assert_close(amid.forward_kl(x, t, y, reduction="batchmean", normalizer=7.0),
                               (rows * (y != -100)).sum() / 7.0)


def test_batchmean_module_and_fused_linear():
    x, t, y = data()
    torch.testing.assert_close(amid.AMiDLoss(reduction="batchmean")(x, t), amid.amid_loss(x, t, reduction="sum") / B)
    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(B, S, 8, generator=g, dtype=F64), torch.randn(B, S, 6, generator=g, dtype=F64)
    ws, wt = torch.randn(V, 8, generator=g, dtype=F64), torch.randn(V, 6, generator=g, dtype=F64)
    for labels in (None, y):
        got = amid.fused_linear_amid_loss(hs, ws, ht, wt, labels, reduction="batchmean", chunk_size=4)
        want = amid.amid_loss(hs @ ws.T, ht @ wt.T, labels, reduction="batchmean")
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


# ---- trap 3: num_items_in_batch ------------------------------------------------------------------

def test_num_items_in_batch_alias():
    x, t, y = data()
    n = torch.tensor(29.0)
    assert_same(lambda a, b, c: amid.amid_loss(a, b, c, num_items_in_batch=n),
                lambda a, b, c: amid.amid_loss(a, b, c, normalizer=n), x, t, y)
    def ref(a, b, c):  # the default AMiD setting, summed over kept rows, / 29
        rows = amid.reference.amid_loss_rows(a.reshape(-1, V), b.reshape(-1, V), alpha=DEFAULT_ALPHA,
                                             lam=DEFAULT_LAM).reshape(B, S)
        return (rows * (c != -100)).sum() / 29

    assert_same(lambda a, b, c: amid.AMiDLoss()(a, b, c, num_items_in_batch=29), ref, x, t, y)
    with pytest.raises(ValueError, match="amid.amid_loss: expected at most one of normalizer and num_items_in_batch"):
        amid.amid_loss(x, t, y, normalizer=3, num_items_in_batch=3)
    with pytest.raises(ValueError, match="normalizer only with reduction='mean' or 'batchmean'"):
        amid.amid_loss(x, t, y, reduction="sum", num_items_in_batch=3)


# ---- trap 4: vocab_size ----------------------------------------------------------------------------

def test_vocab_size_cuts_both_sides():
    x, t, y = data()
    xs = torch.cat([x, torch.randn(B, S, 4, dtype=F64) * 5], -1)          # student head padded to V + 4
    tt = torch.cat([t, torch.full((B, S, 9), 7.0, dtype=F64)], -1)         # teacher head padded to V + 9
    for fn in (lambda a, b, c, **k: amid.amid_loss(a, b, c, alpha=-0.5, lam=0.3, divergence="ab", **k),
               lambda a, b, c, **k: amid.generalized_jsd(a, b, c, beta=0.2, **k),
               lambda a, b, c, **k: amid.AMiDLoss(vocab_size=k.get("vocab_size"))(a, b, c)):
        v1, g1 = value_and_grad(lambda a, b, c: fn(a, b, c, vocab_size=V), xs, tt, y)
        v2, g2 = value_and_grad(lambda a, b, c: fn(a, b, c), x, t, y)
        torch.testing.assert_close(v1, v2, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(g1[..., :V], g2, atol=1e-12, rtol=1e-10)
        assert g1[..., V:].abs().max().item() == 0.0  # the padded student columns get no gradient
    with pytest.raises(ValueError, match=r"pass vocab_size= the real vocabulary size"):
        amid.amid_loss(xs, tt, y)
    with pytest.raises(ValueError, match=r"amid.amid_loss: expected vocab_size <= the student's and the teacher's "
                                         r"vocabulary sizes \(21 and 26 in the logits\), but got 22"):
        amid.amid_loss(xs, tt, y, vocab_size=V + 5)
    with pytest.raises(ValueError, match=r"expected vocab_size to be None or an integer >= 1, but got 0"):
        amid.amid_loss(xs, tt, y, vocab_size=0)


def test_vocab_size_fused_linear():
    g = torch.Generator().manual_seed(5)
    n, hs_, ht_ = 11, 8, 6
    hs = torch.randn(n, hs_, generator=g, dtype=F64, requires_grad=True)
    ht = torch.randn(n, ht_, generator=g, dtype=F64)
    ws = torch.randn(V + 3, hs_, generator=g, dtype=F64, requires_grad=True)
    bs = torch.randn(V + 3, generator=g, dtype=F64, requires_grad=True)
    wt = torch.randn(V + 7, ht_, generator=g, dtype=F64)
    y = torch.randint(0, V, (n,), generator=g)
    out = amid.fused_linear_amid_loss(hs, ws, ht, wt, y, student_bias=bs, vocab_size=V, ce_weight=0.5, chunk_size=4)
    out.backward()
    grads = [p.grad.clone() for p in (hs, ws, bs)]
    for p in (hs, ws, bs):
        p.grad = None
    s = hs @ ws[:V].T + bs[:V]
    ref = amid.amid_loss(s, ht @ wt[:V].T, y) + 0.5 * F.cross_entropy(s, y)
    ref.backward()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for a, p in zip(grads, (hs, ws, bs)):
        torch.testing.assert_close(a, p.grad, atol=1e-12, rtol=1e-10)
    assert grads[1][V:].abs().max().item() == 0.0 and grads[2][V:].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="same vocabulary size V.*pass vocab_size="):
        amid.fused_linear_amid_loss(hs, ws, ht, wt, y)
    loss_fn = amid.FusedLinearAMiDLoss(vocab_size=V)
    torch.testing.assert_close(loss_fn(hs, ws, ht, wt, y),
                               amid.fused_linear_amid_loss(hs, ws[:V], ht, wt[:V], y), atol=1e-12, rtol=1e-10)


# ---- trap 5: defaults -----------------------------------------------------------------------------

def test_defaults_are_the_papers():
    assert (DEFAULT_ALPHA, DEFAULT_LAM) == (0.5, 0.1)
    x, t, y = data()
    want = amid.amid_loss(x, t, y, alpha=0.5, lam=0.1, divergence="kl", order="pr")
    assert amid.amid_loss(x, t, y) == want
    assert amid.AMiDLoss()(x, t, y) == want
    ref = (amid.reference.amid_loss_rows(x.reshape(-1, V), t.reshape(-1, V), alpha=0.5, lam=0.1).reshape(B, S))
    torch.testing.assert_close(want, masked_mean(ref, y))
    h = torch.randn(4, 3, dtype=F64)
    w = torch.randn(V, 3, dtype=F64)
    torch.testing.assert_close(amid.FusedLinearAMiDLoss()(h, w, h, w * 2),
                               amid.amid_loss(h @ w.T, h @ (2 * w).T, alpha=0.5, lam=0.1))
    torch.testing.assert_close(amid.fused_linear_amid_loss(h, w, h, w * 2), amid.amid_loss(h @ w.T, h @ (2 * w).T))


# ---- trap 6: teacher log-probabilities as logits ---------------------------------------------------

@pytest.mark.parametrize("opts", [dict(), dict(alpha=-1.0, lam=0.5, order="qr", temperature=2.0),
                                  dict(alpha=0.3, lam=0.1, divergence="ab", order="rp", temperature=0.7),
                                  dict(alpha=1.0, lam=0.4, order="rq", detach_assistant=True)])
def test_teacher_log_probs_give_the_same_loss(opts):
    x, t, y = data()
    t = t.clone()
    t[1, 1, 3:6] = -math.inf  # masked vocabulary entries survive log_softmax as -inf
    assert_same(lambda a, b, c: amid.amid_loss(a, F.log_softmax(b, -1), c, **opts),
                lambda a, b, c: amid.amid_loss(a, b, c, **opts), x, t, y, atol=1e-12, rtol=1e-10)
    # float32 too (what vLLM returns), within float32 rounding
    assert_same(lambda a, b, c: amid.amid_loss(a, F.log_softmax(b, -1), c, **opts),
                lambda a, b, c: amid.amid_loss(a, b, c, **opts), x.float(), t.float(), y, atol=2e-5, rtol=1e-4)


# ---- item 8: fused_linear_amid_loss(return_components=True) --------------------------------------

def _fl_data(n=13, seed=7, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead
    d = dict(hs=torch.randn(*shape, 8, generator=g, dtype=F64), ws=torch.randn(V, 8, generator=g, dtype=F64),
             bs=torch.randn(V, generator=g, dtype=F64), ht=torch.randn(*shape, 6, generator=g, dtype=F64) * 2,
             wt=torch.randn(V, 6, generator=g, dtype=F64))
    y = torch.randint(0, V, shape, generator=g)
    y.view(-1)[::4] = -100
    y.view(-1)[5] = 3
    return d, y


@pytest.mark.parametrize("weights", [dict(kd_weight=1.0, ce_weight=0.0), dict(kd_weight=0.3, ce_weight=0.7),
                                     dict(kd_weight=torch.tensor(0.6, dtype=F64), ce_weight=0.4, z_loss_weight=1e-3),
                                     dict(kd_weight=0.0, ce_weight=1.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_return_components(weights, reduction):
    d, y = _fl_data()
    opts = dict(alpha=0.5, lam=0.3, temperature=2.0, scale_by_t2=True, reduction=reduction, chunk_size=5, **weights)

    def run(rc):
        p = [d["hs"].clone().requires_grad_(), d["ws"].clone().requires_grad_(), d["bs"].clone().requires_grad_()]
        out = amid.fused_linear_amid_loss(p[0], p[1], d["ht"], d["wt"], y, student_bias=p[2], return_components=rc,
                                          **opts)
        total = out[0] if rc else out
        total.sum().backward() if reduction == "none" else total.backward()
        return out, [x.grad for x in p]

    plain, g_plain = run(False)
    (total, kd, ce, z), g_comp = run(True)
    torch.testing.assert_close(total, plain, atol=1e-12, rtol=1e-10)
    for a, b in zip(g_comp, g_plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert not (ce.requires_grad or z.requires_grad or (kd is not None and kd.requires_grad))
    # each component against its own definition on the full logits
    mask = y != -100
    s = d["hs"] @ d["ws"].T + d["bs"]
    t = d["ht"] @ d["wt"].T
    red = dict(reduction=reduction)
    if isinstance(weights["kd_weight"], float) and weights["kd_weight"] == 0.0:
        assert kd is None
    else:
        torch.testing.assert_close(kd, amid.amid_loss(s, t, y, alpha=0.5, lam=0.3, temperature=2.0, scale_by_t2=True,
                                                      **red), atol=1e-12, rtol=1e-10)
    ce_rows = torch.where(mask, F.cross_entropy(s, y.clamp_min(0), reduction="none"), 0.0)
    z_rows = torch.where(mask, torch.logsumexp(s, -1) ** 2, 0.0)
    denom = {"mean": mask.sum(), "batchmean": mask.sum(), "sum": 1}.get(reduction)
    for got, rows in ((ce, ce_rows), (z, z_rows)):
        torch.testing.assert_close(got, rows if denom is None else rows.sum() / denom, atol=1e-12, rtol=1e-10)
    # the total is the weighted sum of the parts
    kw = weights["kd_weight"]
    parts = weights["ce_weight"] * ce + weights.get("z_loss_weight", 0.0) * z + (0 if kd is None else kw * kd)
    torch.testing.assert_close(total.detach(), parts.to(total.dtype), atol=1e-12, rtol=1e-10)


def test_return_components_without_labels_and_module():
    d, _ = _fl_data()
    total, kd, ce, z = amid.fused_linear_amid_loss(d["hs"], d["ws"], d["ht"], d["wt"], return_components=True)
    assert ce is None
    torch.testing.assert_close(total, kd)
    torch.testing.assert_close(z, (torch.logsumexp(d["hs"] @ d["ws"].T, -1) ** 2).mean())
    out = amid.FusedLinearAMiDLoss(return_components=True, ce_weight=0.5)(d["hs"], d["ws"], d["ht"], d["wt"],
                                                                         torch.zeros(13, dtype=torch.long))
    assert isinstance(out, tuple) and len(out) == 4
