"""amid.fused_linear_amid_loss against the unfused path: the two head GEMMs, amid.amid_loss on the
full logits, plain torch cross-entropy / z-loss, and autograd.

Shapes: N = 37 token rows (prime, so chunk sizes 5, 8 and 16 leave a ragged last chunk; 1 = a
chunk per row; 37 and 100 = one chunk), V = 50, Hs = 16 and Ht = 24 (different hidden sizes).
Everything is float64 on CPU, so the fused and unfused paths must agree to rounding. CUDA bf16
cases run only when a GPU and amid's CUDA kernels are present (nothing touches the GPU at import).
"""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import amid
from amid.fused_linear import DEFAULT_CHUNK_BUDGET_BYTES, default_chunk_size

F64 = torch.float64
N, HS, HT, V = 37, 16, 24, 50
ATOL, RTOL = 1e-10, 1e-8
CHUNKS = [None, 1, 5, 8, 16, 37, 100]
ALPHA_LAM = [(0.5, 0.5), (-1.0, 0.1), (1.0, 0.9), (-3.0, 0.3), (2.5, 0.7), (0.2, 0.0), (0.9, 1.0)]

cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and amid.cuda_kernels_available()),
                               reason="needs a GPU and amid's CUDA kernels")


def make(n=N, hs=HS, ht=HT, v=V, dtype=F64, device="cpu", bias=True, ignore_every=3, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    shape = (n,) if lead is None else tuple(lead)
    d = dict(
        hs=r(*shape, hs).requires_grad_(),
        w=r(v, hs, scale=hs ** -0.5 * 2).requires_grad_(),
        b=r(v, scale=0.5).requires_grad_() if bias else None,
        ht=r(*shape, ht),
        wt=r(v, ht, scale=ht ** -0.5 * 2),
        bt=r(v, scale=0.5) if bias else None,
    )
    y = torch.randint(0, v, shape, generator=g)
    if ignore_every:
        y.view(-1)[::ignore_every] = -100
    d["y"] = y.to(device)
    return d


def unfused(d, labels, *, kd_weight=1.0, ce_weight=0.0, z_loss_weight=0.0, reduction="mean", normalizer=None,
            ignore_index=-100, backend="auto", **opts):
    """The path the fused op replaces: full logits, amid.amid_loss, torch CE, autograd."""
    s = F.linear(d["hs"], d["w"], d["b"])
    with torch.no_grad():
        t = F.linear(d["ht"], d["wt"], d["bt"]).to(s.dtype)
    kd = amid.amid_loss(s, t, labels, reduction=reduction, normalizer=normalizer, ignore_index=ignore_index,
                        backend=backend, **opts)
    lead = s.shape[:-1]
    mask = torch.ones(lead, dtype=torch.bool) if labels is None else labels != ignore_index
    lse = torch.logsumexp(s.double(), -1)
    extra = z_loss_weight * lse ** 2
    if labels is not None:
        ce = F.cross_entropy(s.double().reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                             reduction="none").reshape(lead)
        extra = extra + ce_weight * ce
    extra = torch.where(mask, extra, torch.zeros_like(extra))
    if reduction == "mean":
        denom = normalizer if normalizer is not None else mask.sum().clamp_min(1)
        extra = extra.sum() / denom
    elif reduction == "sum":
        extra = extra.sum()
    return kd_weight * kd + extra.to(kd.dtype)


def params(d):
    return [x for x in (d["hs"], d["w"], d["b"]) if x is not None and x.requires_grad]


def grads(loss, d, grad_output):
    return torch.autograd.grad(loss, params(d), grad_output)


def fused(d, labels, **kw):
    return amid.fused_linear_amid_loss(d["hs"], d["w"], d["ht"], d["wt"], labels, student_bias=d["b"],
                                       teacher_bias=d["bt"], **kw)


def check_against_unfused(d, labels, grad_output=0.7, atol=ATOL, rtol=RTOL, **kw):
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "accum_dtype")}
    out = fused(d, labels, **kw)
    ref = unfused(d, labels, **ref_kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    go = (torch.randn(out.shape, dtype=out.dtype) if out.dim() else torch.tensor(grad_output, dtype=out.dtype))
    for a, b in zip(grads(out, d, go), grads(ref, d, go)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    return out


# ------------------------------------------------------------------------------------------------
# Correctness against the unfused path (float64, CPU)

@pytest.mark.parametrize("divergence", ["kl", "ab"])
@pytest.mark.parametrize("alpha,lam", ALPHA_LAM)
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_matches_unfused(divergence, alpha, lam, chunk_size):
    d = make(seed=zlib.crc32(repr((divergence, alpha, lam)).encode()) % 1000)
    check_against_unfused(d, d["y"], alpha=alpha, lam=lam, divergence=divergence, chunk_size=chunk_size)


@pytest.mark.parametrize("order,detach", [("pr", False), ("qr", False), ("rp", False), ("rq", False), ("qr", True),
                                          ("rq", True)])
@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_orders_and_detach(order, detach, divergence):
    d = make(seed=3)
    check_against_unfused(d, d["y"], alpha=0.3, lam=0.4, divergence=divergence, order=order, detach_assistant=detach,
                          ab_alpha=0.5, ab_beta=0.4, chunk_size=8)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.8, 0.3, 0.01), (0.0, 1.0, 0.0), (0.0, 0.0, 0.5),
                                     (2.0, 0.0, 1e-3)])
@pytest.mark.parametrize("chunk_size", [None, 5, 16])
def test_reductions_and_term_weights(reduction, weights, chunk_size):
    kd, ce, z = weights
    d = make(seed=5)
    check_against_unfused(d, d["y"], alpha=0.5, lam=0.2, divergence="ab", reduction=reduction, kd_weight=kd,
                          ce_weight=ce, z_loss_weight=z, chunk_size=chunk_size, grad_output=-1.7)


@pytest.mark.parametrize("normalizer", [100.0, "tensor"])
def test_normalizer(normalizer):
    d = make(seed=7)
    norm = torch.tensor(123.0, dtype=F64) if normalizer == "tensor" else normalizer
    out = check_against_unfused(d, d["y"], alpha=-1.0, lam=0.5, normalizer=norm, ce_weight=0.5, z_loss_weight=0.1,
                                chunk_size=6)
    # The normaliser really divides: sum / normalizer.
    s = fused(d, d["y"], alpha=-1.0, lam=0.5, reduction="sum", ce_weight=0.5, z_loss_weight=0.1, chunk_size=6)
    torch.testing.assert_close(out, s / float(norm), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("temperature,scale_by_t2", [(2.0, True), (0.5, False), (3.0, True)])
def test_temperature(temperature, scale_by_t2):
    d = make(seed=11)
    check_against_unfused(d, d["y"], alpha=0.5, lam=0.5, temperature=temperature, scale_by_t2=scale_by_t2,
                          ce_weight=0.2, chunk_size=7)


def test_no_labels_no_bias():
    d = make(seed=13, bias=False)
    check_against_unfused(d, None, alpha=0.5, lam=0.5, z_loss_weight=0.05, chunk_size=9)


def test_reference_backend_agrees():
    # Independent of the kernels: the unfused side through the pure-PyTorch reference.
    d = make(seed=17)
    out = fused(d, d["y"], alpha=0.7, lam=0.6, divergence="ab", chunk_size=10)
    ref = unfused(d, d["y"], alpha=0.7, lam=0.6, divergence="ab", backend="reference")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for a, b in zip(grads(out, d, None), grads(ref, d, None)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    d = make(seed=19)
    y = torch.full((N,), -100)
    out = fused(d, y, alpha=0.5, lam=0.5, reduction=reduction, ce_weight=0.5, z_loss_weight=0.1, chunk_size=8)
    assert torch.equal(out, torch.zeros_like(out))
    go = torch.ones_like(out)
    for g in grads(out, d, go):
        assert torch.equal(g, torch.zeros_like(g))


def test_ignored_rows_do_not_matter():
    # Changing the hidden states of ignored rows changes neither the loss nor the other rows' grads.
    d = make(seed=23)
    y = d["y"]
    out1 = fused(d, y, alpha=0.5, lam=0.3, ce_weight=0.5, z_loss_weight=0.1, chunk_size=5)
    g1 = grads(out1, d, None)
    d2 = dict(d)
    hs2 = d["hs"].detach().clone()
    hs2[y == -100] += 5.0
    d2["hs"] = hs2.requires_grad_()
    out2 = fused(d2, y, alpha=0.5, lam=0.3, ce_weight=0.5, z_loss_weight=0.1, chunk_size=5)
    g2 = grads(out2, d2, None)
    torch.testing.assert_close(out1, out2, atol=ATOL, rtol=RTOL)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert torch.equal(g1[0][y == -100], torch.zeros_like(g1[0][y == -100]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_leading_dims_and_noncontiguous(reduction):
    d = make(seed=29, lead=(3, 9))
    # Shift like a causal LM: a non-contiguous slice of the hidden states.
    base_s, base_t = d["hs"], d["ht"]
    sliced = dict(d, hs=base_s[:, :-1], ht=base_t[:, :-1])
    y = d["y"][:, 1:]
    out = fused(sliced, y, alpha=0.5, lam=0.5, reduction=reduction, ce_weight=0.3, chunk_size=4)
    ref = unfused(sliced, y, alpha=0.5, lam=0.5, reduction=reduction, ce_weight=0.3)
    assert out.shape == ((3, 8) if reduction == "none" else ())
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    go = torch.randn(out.shape, dtype=F64)
    ga = torch.autograd.grad(out, (base_s, d["w"], d["b"]), go)
    gb = torch.autograd.grad(ref, (base_s, d["w"], d["b"]), go)
    assert ga[0].shape == base_s.shape
    assert torch.equal(ga[0][:, -1], torch.zeros_like(ga[0][:, -1]))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_partial_requires_grad_and_no_grad():
    d = make(seed=31)
    d["hs"].requires_grad_(False)  # frozen body: only the head trains
    out = check_against_unfused(d, d["y"], alpha=0.5, lam=0.5, ce_weight=0.1, chunk_size=6)
    with torch.no_grad():
        # Under no_grad the teacher may require grad (nothing is recorded) and nothing is saved.
        wt = d["wt"].clone().requires_grad_()
        val = amid.fused_linear_amid_loss(d["hs"], d["w"], d["ht"], wt, d["y"], student_bias=d["b"],
                                          teacher_bias=d["bt"], alpha=0.5, lam=0.5, ce_weight=0.1, chunk_size=6)
    assert not val.requires_grad
    torch.testing.assert_close(val, out.detach(), atol=ATOL, rtol=RTOL)


def test_teacher_dtype_is_cast():
    # A float32 teacher with a float64 student: teacher logits computed in float32, cast per chunk.
    d = make(seed=37)
    d["ht"], d["wt"], d["bt"] = d["ht"].float(), d["wt"].float(), d["bt"].float()
    # float32 GEMMs on a chunk and on the whole batch may round differently (blocking): fp32 tolerance.
    check_against_unfused(d, d["y"], alpha=0.5, lam=0.5, chunk_size=5, atol=1e-6, rtol=1e-5)


def test_teacher_gets_no_gradient_and_module_matches():
    d = make(seed=41)
    mod = amid.FusedLinearAMiDLoss(alpha=0.5, lam=0.2, divergence="ab", order="qr", ce_weight=0.4, chunk_size=8)
    out = mod(d["hs"], d["w"], d["ht"], d["wt"], d["y"], student_bias=d["b"], teacher_bias=d["bt"])
    ref = fused(d, d["y"], alpha=0.5, lam=0.2, divergence="ab", order="qr", ce_weight=0.4, chunk_size=8)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    out.backward()
    assert d["hs"].grad is not None and d["w"].grad is not None and d["b"].grad is not None
    assert d["ht"].grad is None and d["wt"].grad is None
    assert "lam=0.2" in repr(mod)


def test_second_backward_refused():
    d = make(seed=43)
    out = fused(d, d["y"], alpha=0.5, lam=0.5)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran a second time"):
        out.backward()


def test_gradient_accumulation_matches_one_batch():
    # Two micro-batches with normalizer = kept rows of the whole batch == one big batch.
    d = make(seed=47)
    y = d["y"]
    total = (y != -100).sum()
    full = fused(d, y, alpha=0.5, lam=0.5, ce_weight=0.3)
    g_full = grads(full, d, None)
    acc = [torch.zeros_like(p) for p in params(d)]
    for sl in (slice(0, 20), slice(20, N)):
        part = dict(d, hs=d["hs"][sl], ht=d["ht"][sl])
        out = fused(part, y[sl], alpha=0.5, lam=0.5, ce_weight=0.3, normalizer=total)
        for a, g in zip(acc, grads(out, d, None)):
            a += g
    for a, b in zip(acc, g_full):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_n_by_v(reduction):
    # No tensor produced by any op in forward or backward has N*V elements (or more).
    n, v, h, chunk = 256, 300, 24, 32
    d = make(n=n, v=v, hs=h, ht=h, seed=53)
    with _MaxNumel() as m:
        out = fused(d, d["y"], alpha=0.5, lam=0.5, ce_weight=0.1, z_loss_weight=0.1, chunk_size=chunk,
                    reduction=reduction)
        out.backward(torch.ones_like(out))
    assert m.max_numel <= max(chunk * v, v * h) < n * v
    # ... while the unfused path does create [N, V] tensors (the probe works).
    d2 = make(n=n, v=v, hs=h, ht=h, seed=53)
    with _MaxNumel() as m2:
        unfused(d2, d2["y"], alpha=0.5, lam=0.5).backward()
    assert m2.max_numel >= n * v


def test_default_chunk_size_rule():
    mib = 1024 * 1024
    assert DEFAULT_CHUNK_BUDGET_BYTES == 256 * mib
    # fp32, V = 32000: 12 bytes per element -> 699 rows -> 640 (multiple of 64).
    assert default_chunk_size(8192, 32000, torch.float32) == 640
    # bf16, V = 151936: 6 bytes per element -> 294 rows -> 256.
    assert default_chunk_size(8192, 151936, torch.bfloat16) == 256
    # CE / z-loss scratch and a different teacher dtype shrink it; small N clamps; tiny budgets give 1.
    assert default_chunk_size(8192, 151936, torch.bfloat16, ce_or_z=True) < 256
    assert default_chunk_size(8192, 32000, torch.float32, teacher_dtype=torch.float64) < 640
    assert default_chunk_size(10, 32000, torch.float32) == 10
    assert default_chunk_size(8192, 10 ** 9, torch.float32) == 1
    for v in (1000, 32000, 151936, 262144):
        for dt in (torch.bfloat16, torch.float32):
            c = default_chunk_size(10 ** 6, v, dt)
            assert c * v * 3 * torch.empty((), dtype=dt).element_size() <= DEFAULT_CHUNK_BUDGET_BYTES


def test_low_precision_cpu():
    # bf16 on CPU (the same code path CUDA will run): close to the float64 result of the same inputs.
    d = make(n=64, v=200, hs=32, ht=32, seed=59, dtype=torch.bfloat16)
    d64 = {k: (None if x is None else x.detach().double().requires_grad_(x.requires_grad)) for k, x in d.items()
           if k != "y"}
    d64["y"] = d["y"]
    ref = fused(d64, d["y"], alpha=0.5, lam=0.5, ce_weight=0.2, chunk_size=16)
    g_ref = grads(ref, d64, None)
    for accum in (None, torch.float32):
        out = fused(d, d["y"], alpha=0.5, lam=0.5, ce_weight=0.2, chunk_size=16, accum_dtype=accum)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
        for g, r in zip(grads(out, d, None), g_ref):
            assert g.dtype == torch.bfloat16
            err = (g.double() - r).abs().max() / r.abs().max()
            assert err < 3e-2, err


# ------------------------------------------------------------------------------------------------
# transformers: student lm_head weight + hidden states from the base model

@pytest.mark.parametrize("tied", [False, True])
def test_inside_transformers_llama(tied):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)

    def llama(hidden, layers, tie):
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                       max_position_embeddings=64, tie_word_embeddings=tie)
        return transformers.LlamaForCausalLM(cfg).double()

    student, teacher = llama(32, 1, tied), llama(48, 2, False)
    teacher.requires_grad_(False).eval()
    ids = torch.randint(0, 96, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    opts = dict(alpha=0.5, lam=0.3, divergence="ab", ce_weight=0.5)

    # Fused: hidden states from the base models, heads passed as weights.
    hs = student.model(input_ids=ids).last_hidden_state[:, :-1]
    with torch.no_grad():
        ht = teacher(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, :-1]
    loss = amid.fused_linear_amid_loss(hs, student.lm_head.weight, ht, teacher.lm_head.weight, labels[:, 1:],
                                       chunk_size=5, **opts)
    loss.backward()
    g_fused = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()

    # Unfused: full logits from the models, amid.amid_loss + torch CE.
    s = student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1]
    y = labels[:, 1:]
    ref = amid.amid_loss(s, t, y, alpha=0.5, lam=0.3, divergence="ab") + 0.5 * F.cross_entropy(
        s.reshape(-1, 96), y.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=RTOL)
    for k, p in student.named_parameters():
        torch.testing.assert_close(g_fused[k], p.grad, atol=ATOL, rtol=RTOL, msg=k)
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------------------
# Errors

def _call(d, **over):
    kw = dict(alpha=0.5, lam=0.5)
    args = dict(student_hidden=d["hs"], student_weight=d["w"], teacher_hidden=d["ht"], teacher_weight=d["wt"],
                labels=d["y"], student_bias=d["b"], teacher_bias=d["bt"])
    kw.update(over)
    for k in list(kw):
        if k in args:
            args[k] = kw.pop(k)
    return amid.fused_linear_amid_loss(args.pop("student_hidden"), args.pop("student_weight"),
                                       args.pop("teacher_hidden"), args.pop("teacher_weight"), args.pop("labels"),
                                       **args, **kw)


ERRORS = [
    (dict(teacher_weight=torch.randn(V + 1, HT, dtype=F64)), "same vocabulary size V"),
    (dict(student_weight=torch.randn(V, HS + 1, dtype=F64)), r"student_hidden \[\.\.\., Hs\] to match"),
    (dict(teacher_weight=torch.randn(V, HT - 1, dtype=F64)), r"teacher_hidden \[\.\.\., Ht\] to match"),
    (dict(teacher_hidden=torch.randn(N - 1, HT, dtype=F64)), "same leading"),
    (dict(student_weight=torch.randn(V, HS, 1, dtype=F64)), "student_weight to be 2-D"),
    (dict(student_bias=torch.randn(V + 2, dtype=F64)), r"student_bias of shape \[50\]"),
    (dict(teacher_bias=torch.randn(3, dtype=F64)), r"teacher_bias of shape \[50\]"),
    (dict(student_weight=torch.randn(V, HS, dtype=torch.float32)), "same dtype"),
    (dict(teacher_hidden=torch.randn(N, HT, dtype=torch.float32)), "same dtype"),
    (dict(student_hidden=torch.randint(0, 3, (N, HS))), "student_hidden of dtype"),
    (dict(teacher_weight=torch.randn(V, HT, dtype=F64, requires_grad=True)), "teacher_weight not to require grad"),
    (dict(teacher_hidden=torch.randn(N, HT, dtype=F64, requires_grad=True)), "teacher_hidden not to require grad"),
    (dict(teacher_bias=torch.randn(V, dtype=F64, requires_grad=True)), "teacher_bias not to require grad"),
    (dict(student_weight="w"), "student_weight to be a tensor"),
    (dict(reduction="avg"), "reduction to be one of"),
    (dict(reduction="sum", normalizer=3.0), "normalizer only with reduction='mean' or 'batchmean'"),
    (dict(normalizer=0.0), "normalizer > 0"),
    (dict(chunk_size=0), "chunk_size to be None or an integer >= 1"),
    (dict(chunk_size=2.5), "chunk_size to be None or an integer >= 1"),
    (dict(accum_dtype=torch.float16), "accum_dtype"),
    (dict(labels=None, ce_weight=0.5), "labels with ce_weight != 0"),
    (dict(labels=torch.zeros(N, 2, dtype=torch.long)), "labels of shape"),
    (dict(labels=torch.zeros(N)), "labels to be an integer tensor"),
    (dict(kd_weight=float("nan")), "finite kd_weight"),
    (dict(ce_weight=torch.ones(2)), "ce_weight to be a number or a 0-D tensor"),
]


@pytest.mark.parametrize("over,msg", ERRORS, ids=[m for _, m in ERRORS])
def test_errors(over, msg):
    d = make(seed=61)
    with pytest.raises(ValueError, match=r"^amid\.fused_linear_amid_loss: expected .*" + msg):
        _call(d, **over)


def test_module_error_prefix():
    d = make(seed=61)
    mod = amid.FusedLinearAMiDLoss(alpha=0.5, lam=0.5, reduction="avg")
    with pytest.raises(ValueError, match=r"^amid\.FusedLinearAMiDLoss: expected reduction"):
        mod(d["hs"], d["w"], d["ht"], d["wt"], d["y"])


@pytest.mark.parametrize("over,msg", [(dict(lam=1.5), "expected lam in"), (dict(divergence="js"), "divergence"),
                                      (dict(order="pr", detach_assistant=True), "detach_assistant"),
                                      (dict(temperature=0.0), "temperature > 0")])
def test_op_option_errors(over, msg):
    # The op's own checks, also raised for N = 0 (no chunk runs the op).
    d = make(seed=67)
    with pytest.raises(RuntimeError, match=r"amid::amid_loss_fwd: .*" + msg):
        _call(d, **over)
    e = make(n=0, seed=67)
    with pytest.raises(RuntimeError, match=r"amid::amid_loss_fwd: .*" + msg):
        _call(e, **over)


def test_empty_input():
    e = make(n=0, seed=71)
    out = fused(e, e["y"], alpha=0.5, lam=0.5, ce_weight=0.5)
    assert out.item() == 0.0
    g = grads(out, e, None)
    assert g[0].shape == (0, HS) and torch.equal(g[1], torch.zeros_like(g[1]))


# ------------------------------------------------------------------------------------------------
# CUDA bf16 (skipped without a GPU and amid's CUDA kernels)

@cuda_only
@pytest.mark.parametrize("accum", [None, torch.float32])
@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_cuda_bf16_matches_reference(accum, divergence):
    n, h, v = 1000, 256, 32000
    d = make(n=n, hs=h, ht=h + 64, v=v, dtype=torch.bfloat16, device="cuda", seed=73)
    opts = dict(alpha=0.5, lam=0.3, divergence=divergence, ce_weight=0.2)
    out = fused(d, d["y"], chunk_size=192, accum_dtype=accum, **opts)
    g = grads(out, d, None)
    # Reference: the same bf16 inputs upcast to float64, unfused.
    d64 = {k: (None if x is None else x.detach().double().requires_grad_(x.requires_grad)) for k, x in d.items()
           if k != "y"}
    d64["y"] = d["y"]
    ref = unfused(d64, d["y"], **opts)
    g_ref = grads(ref, d64, None)
    # PyTorch's own bf16 unfused path, for the "≤ 2× PyTorch low-precision error" rule.
    lp = unfused(d, d["y"], **opts)
    g_lp = grads(lp, d, None)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)
    for name, a, b, c in zip(("hidden", "weight", "bias"), g, g_lp, g_ref):
        err = (a.double() - c).abs().max().item()
        err_lp = (b.double() - c).abs().max().item()
        scale = c.abs().max().item()
        assert err <= 2 * err_lp + 1e-2 * scale, (name, err, err_lp, scale)


@cuda_only
def test_cuda_memory_stays_below_logits():
    # The extra memory is one chunk's [C, V] temporaries (within DEFAULT_CHUNK_BUDGET_BYTES) plus the
    # gradients. N is large enough that the logits (1 GB) dwarf that budget: at N = 4096 (262 MB of
    # logits) the default chunk (1344 rows) holds about all of them, and the H200 run measured 295 MB.
    n, h, v = 16384, 512, 32000
    d = make(n=n, hs=h, ht=h, v=v, dtype=torch.bfloat16, device="cuda", seed=79)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fused(d, d["y"], alpha=0.5, lam=0.5)
    out.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes, grad_bytes = n * v * 2, v * h * 2 + n * h * 2
    assert extra <= DEFAULT_CHUNK_BUDGET_BYTES + 2 * grad_bytes, extra
    assert extra < 0.5 * logits_bytes, extra
    assert math.isfinite(out.item())
