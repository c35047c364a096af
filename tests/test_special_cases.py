"""Each named special case of amid (spec §6) against its own textbook or peer definition, written
here in plain PyTorch (float64), value and gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

import amid
from utils import make_logits

N, V = 6, 50


@pytest.fixture
def data():
    s, t = make_logits(N, V)
    labels = torch.tensor([1, -100, 4, 7, -100, 2])
    return s, t, labels


def _value_and_grad(fn, s, *args, **kw):
    x = s.clone().requires_grad_(True)
    val = fn(x, *args, **kw)
    (g,) = torch.autograd.grad(val, x)
    return val.detach(), g


def _masked_mean(per_row, labels):
    m = (labels != -100).to(per_row.dtype)
    return (per_row * m).sum() / m.sum()


def _check(ours, theirs, s, t, labels, const=None):
    """Same gradient; same value up to an optional constant (the entropy term peers drop)."""
    v1, g1 = _value_and_grad(ours, s, t, labels)
    v2, g2 = _value_and_grad(lambda x, t, l: theirs(x, t, l), s, t, labels)
    want = v2 if const is None else v2 - const
    torch.testing.assert_close(v1, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-9)


def test_forward_kl(data):
    s, t, labels = data

    def textbook(x, t, labels):  # KL(p || q), torch's own kl_div
        return _masked_mean(F.kl_div(F.log_softmax(x, -1), F.log_softmax(t, -1), reduction="none",
                                     log_target=True).sum(-1), labels)

    _check(amid.forward_kl, textbook, s, t, labels)
    # and its documented equivalent: lam = 1, kl, 'rq'
    v1, _ = _value_and_grad(amid.forward_kl, s, t, labels)
    v2, _ = _value_and_grad(lambda x, t, l: amid.amid_loss(x, t, l, alpha=0.5, lam=1.0, order="rq"), s, t, labels)
    torch.testing.assert_close(v1, v2)


def test_reverse_kl(data):
    s, t, labels = data

    def textbook(x, t, labels):  # KL(q || p)
        lq, lp = F.log_softmax(x, -1), F.log_softmax(t, -1)
        return _masked_mean((lq.exp() * (lq - lp)).sum(-1), labels)

    _check(amid.reverse_kl, textbook, s, t, labels)


@pytest.mark.parametrize("skew", [0.1, 0.5])
def test_skew_forward_kl_distillm(data, skew):
    s, t, labels = data

    def distillm(x, t, labels):  # jongwooko/distillm distillm/losses.py::skewed_forward_kl (cross-entropy form)
        teacher_probs = F.softmax(t, dim=-1)
        student_probs = F.softmax(x, dim=-1)
        mixed_probs = skew * teacher_probs + (1 - skew) * student_probs
        prod = (teacher_probs * torch.log(mixed_probs)).masked_fill(torch.isinf(x), 0)
        return -_masked_mean(prod.sum(-1), labels)

    # DistiLLM returns -sum p log m = KL(p || m) + H(p): the constant H(p) is the only difference.
    lp = F.log_softmax(t, -1)
    entropy = _masked_mean(-(lp.exp() * lp).sum(-1), labels)
    _check(lambda x, t, l: amid.skew_forward_kl(x, t, l, skew=skew), distillm, s, t, labels, const=entropy)


@pytest.mark.parametrize("skew", [0.1, 0.5])
def test_skew_reverse_kl_distillm(data, skew):
    s, t, labels = data

    def distillm(x, t, labels):  # distillm/losses.py::skewed_reverse_kl
        teacher_probs = F.softmax(t, dim=-1)
        student_probs = F.softmax(x, dim=-1)
        mixed_probs = (1 - skew) * teacher_probs + skew * student_probs
        prod = student_probs * torch.log(mixed_probs) - student_probs * F.log_softmax(x, dim=-1)
        return -_masked_mean(prod.masked_fill(torch.isinf(x), 0).sum(-1), labels)

    _check(lambda x, t, l: amid.skew_reverse_kl(x, t, l, skew=skew), distillm, s, t, labels)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_trl(data, beta, temperature):
    s, t, labels = data

    def trl(x, t, labels):  # huggingface/trl GKDTrainer.generalized_jsd_loss, interior beta
        student_log_probs = F.log_softmax(x / temperature, dim=-1)
        teacher_log_probs = F.log_softmax(t / temperature, dim=-1)
        mixture = torch.logsumexp(torch.stack([student_log_probs + math.log(1 - beta),
                                               teacher_log_probs + math.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
        return _masked_mean(jsd.sum(-1), labels)

    _check(lambda x, t, l: amid.generalized_jsd(x, t, l, beta=beta, temperature=temperature), trl, s, t, labels)


def test_generalized_jsd_ends_are_zero(data):
    s, t, labels = data
    for beta in (0.0, 1.0):
        assert amid.generalized_jsd(s, t, labels, beta=beta, endpoints="limit").item() == 0.0


@pytest.mark.parametrize("tau", [0.4, 0.7, 1.0])
def test_taid(data, tau):
    s, t, labels = data

    def taid(x, t, labels):  # SakanaAI/TAID src/distil_losses/taid.py (cross-entropy form)
        p_t = F.softmax(tau * t + (1 - tau) * x.detach(), dim=-1)
        return -_masked_mean((p_t * F.log_softmax(x, dim=-1)).sum(-1), labels)

    p_t = F.softmax(tau * t + (1 - tau) * s, dim=-1)
    entropy = _masked_mean(-(p_t * p_t.log()).sum(-1), labels)
    _check(lambda x, t, l: amid.taid_loss(x, t, l, tau=tau), taid, s, t, labels, const=entropy)
    # TAID's gradient is (q - p_t) / n_valid on kept rows
    _, g = _value_and_grad(lambda x, t, l: amid.taid_loss(x, t, l, tau=tau), s, t, labels)
    keep = (labels != -100).double()[:, None]
    torch.testing.assert_close(g, keep * (F.softmax(s, -1) - p_t) / keep.sum())


@pytest.mark.parametrize("ab", [(0.2, 0.7), (0.5, 0.5), (1.0, 0.3)])
def test_ab_divergence_abkd(data, ab):
    s, t, labels = data
    a, b = ab

    def abkd(x, t, labels):  # D_AB^(a,b)(p || q), ghwang-s/abkd ab_div, general (a, b, a+b != 0) case
        p, q = F.softmax(t, -1), F.softmax(x, -1)
        d = -((p ** a * q ** b).sum(-1) - a / (a + b) * (p ** (a + b)).sum(-1) - b / (a + b) * (q ** (a + b)).sum(-1)) / (a * b)
        return _masked_mean(d, labels)

    _check(lambda x, t, l: amid.ab_divergence(x, t, l, ab_alpha=a, ab_beta=b), abkd, s, t, labels)


def test_special_cases_validate_their_parameters(data):
    s, t, labels = data
    with pytest.raises(ValueError, match=r"amid.skew_forward_kl: expected skew in \[0, 1\], but got 1.5"):
        amid.skew_forward_kl(s, t, labels, skew=1.5)
    with pytest.raises(ValueError, match=r"amid.generalized_jsd: expected beta in \[0, 1\], but got -0.1"):
        amid.generalized_jsd(s, t, labels, beta=-0.1)
    with pytest.raises(ValueError, match=r"amid.taid_loss: expected tau in \[0, 1\], but got 2"):
        amid.taid_loss(s, t, labels, tau=2)
