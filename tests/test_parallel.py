"""Vocab-parallel AMiD (amid.parallel): the partial-row ops and their merge rule in one process, then
2 and 4 processes on gloo (one spawn per world size running every case) against the single-process op.
Loss and gradient in float64 to 1e-10 relative."""
import itertools
import math
import os
import socket
import traceback

import pytest
import torch
from torch.library import opcheck

import amid
from amid.parallel import merged_rows_from_slices
from conftest import requires_cuda
from utils import make_logits

OPT_NAMES = ("alpha", "lam", "divergence", "order", "ab_alpha", "ab_beta", "temperature", "detach_assistant")
GRID = [(d, o, a, l) for d in ("kl", "ab") for o in ("pr", "qr", "rp", "rq")
        for a in (-3.0, -1.0, 0.0, 0.5, 1.0, 2.0) for l in (0.0, 0.3, 1.0)]
RTOL = 1e-10


def _opts(div, order, alpha, lam, **kw):
    o = dict(alpha=alpha, lam=lam, divergence=div, order=order, ab_alpha=0.2, ab_beta=0.7, temperature=1.3,
             detach_assistant=False)
    o.update(kw)
    return o


def _rel(x, ref, floor=1e-5):
    """max |x - ref| / max(max |ref|, floor) over the non-NaN entries; inf unless the NaNs agree. The
    floor keeps the measure meaningful where the exact value is identically 0 (qr / rq at lam = 0, where
    r = q: both sides hold rounding noise, up to ~1e-16 with the CPU kernel's FMA-contracted x86-64-v3 /
    v4 clones, which would read as 1e-10 against a floor of 1e-6)."""
    x, ref = x.double(), ref.double()
    if not torch.equal(torch.isnan(x), torch.isnan(ref)):
        return math.inf
    fin = ~torch.isnan(ref)
    if not fin.any():
        return 0.0
    d = (x[fin] - ref[fin]).abs().max().item()
    return d / max(ref[fin].abs().max().item(), floor)


def _seam_logits(n=9, v=41, dtype=torch.float64):
    """Random rows with the seams of the issue in fixed rows; cuts at 10, 11 (a 1-column shard), 30."""
    s, t = make_logits(n, v, dtype=torch.float64)
    s[1, 10:11] = -math.inf        # one shard (the 1-column one) entirely -inf for a row, student side
    t[1, 30:] = -math.inf          # ... and the last shard for the teacher
    s[2, 3] = -math.inf            # -inf in one rank only
    t[2, 35] = -math.inf
    s[4, 17] = math.nan            # NaN row (one rank sees the NaN): NaN loss everywhere
    t[5, :] = -math.inf            # all -inf teacher row: NaN
    t[6, :20] = -math.inf          # disjoint supports split across ranks: teacher on [20, v), student on [0, 20)
    s[6, 20:] = -math.inf
    t[7, 12] = math.inf            # +inf: NaN row
    return s.to(dtype), t.to(dtype)


CUTS = (0, 10, 11, 30, 41)


def _split(x, cuts=CUTS):
    return [x[:, a:b] for a, b in zip(cuts, cuts[1:])]


def _merged_grad(s, t, w, stats, opts, cuts=CUTS):
    ldt = amid.ops.loss_dtype(s.dtype)
    gl = torch.ones(s.shape[0], dtype=ldt, device=s.device)
    return torch.cat([torch.ops.amid.amid_loss_bwd(gl, a, b, w, stats.to(ldt), *opts.values())
                      for a, b in zip(_split(s, cuts), _split(t, cuts))], 1)


@pytest.mark.parametrize("div,order", [(d, o) for d in ("kl", "ab") for o in ("pr", "qr", "rp", "rq")])
def test_merge_rule_one_process(div, order):
    # The partial ops on four slices (one of width 1) merged with the max / sum rule equal amid_loss_fwd.
    s, t = _seam_logits()
    w = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.7], dtype=torch.float64)
    s[3] = math.nan  # ignored row holding NaN: not read
    for alpha, lam in itertools.product((-3.0, -1.0, 0.0, 0.5, 1.0, 2.0), (0.0, 0.3, 1.0)):
        opts = _opts(div, order, alpha, lam)
        loss, stats, grad = torch.ops.amid.amid_loss_fwd(s, t, w, *opts.values(), True)
        rows, mstats = merged_rows_from_slices(_split(s), _split(t), w, **opts)
        assert _rel(rows, loss) <= RTOL, (alpha, lam, rows, loss)
        assert _rel(mstats, stats) <= 1e-9, (alpha, lam)
        assert _rel(_merged_grad(s, t, w, mstats, opts), grad) <= RTOL, (alpha, lam)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_rule_low_precision(dtype):
    s, t = make_logits(5, 300, dtype=dtype)
    cuts = (0, 77, 150, 300)
    for div, order in (("kl", "pr"), ("ab", "rq")):
        opts = _opts(div, order, 0.5, 0.3)
        loss, _stats, grad = torch.ops.amid.amid_loss_fwd(s, t, None, *opts.values(), True)
        rows, mstats = merged_rows_from_slices(_split(s, cuts), _split(t, cuts), None, **opts)
        assert rows.dtype == loss.dtype
        torch.testing.assert_close(rows, loss, atol=1e-5, rtol=1e-5)
        g = _merged_grad(s, t, None, mstats, opts, cuts)
        assert g.dtype == dtype
        assert _rel(g.float(), grad.float()) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_opcheck_partial_ops():
    for dtype in (torch.float64, torch.bfloat16):
        s, t = make_logits(5, 23, dtype=dtype)
        ldt = amid.ops.loss_dtype(dtype)
        w = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0], dtype=ldt)
        for row_weight, opts in ((None, (0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False)),
                                 (w, (-1.0, 0.7, "ab", "rq", 0.3, 0.6, 2.0, True))):
            opcheck(torch.ops.amid.amid_partial_lse.default, (s, t, row_weight, opts[6]))
            _rows, stats = merged_rows_from_slices([s], [t], row_weight, **dict(zip(OPT_NAMES, opts)))
            for op in (torch.ops.amid.amid_partial_mix, torch.ops.amid.amid_partial_sums):
                opcheck(op.default, (s, t, row_weight, stats) + opts)


def test_partial_op_errors():
    s, t = make_logits(3, 5)
    with pytest.raises(RuntimeError, match=r"amid::amid_partial_lse: expected temperature > 0, but got 0"):
        torch.ops.amid.amid_partial_lse(s, t, None, 0.0)
    bad = torch.zeros(3, amid.ops.NUM_STATS, dtype=torch.float32)
    for op in ("amid_partial_mix", "amid_partial_sums"):
        with pytest.raises(RuntimeError, match=rf"amid::{op}: expected stats of dtype Double, but got Float"):
            getattr(torch.ops.amid, op)(s, t, None, bad, 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False)
        with pytest.raises(RuntimeError, match=rf"amid::{op}: expected stats of shape \[3, {amid.ops.NUM_STATS}\], but got \[3, 5\]"):
            getattr(torch.ops.amid, op)(s, t, None, bad[:, :5].double(), 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False)
        with pytest.raises(RuntimeError, match=rf"amid::{op}: expected stats of shape \[3, {amid.ops.NUM_STATS}\]"):
            getattr(torch.ops.amid, op)(s.to("meta"), t.to("meta"), None, bad[:, :5].double().to("meta"), 0.5, 0.3,
                                        "kl", "pr", 0.2, 0.7, 1.0, False)


def test_jsd_order_refused():
    # The one-pass generalized JSD (order 'jsd') has no partial-row form yet: a clear error from the ops
    # and from the API (before any collective).
    s, t = make_logits(3, 5, dtype=torch.float64)
    stats = torch.zeros(3, amid.ops.NUM_STATS, dtype=torch.float64)
    for op in ("amid_partial_mix", "amid_partial_sums"):
        with pytest.raises(RuntimeError, match=rf"amid::{op}: expected order to be one of .*but got 'jsd'"):
            getattr(torch.ops.amid, op)(s, t, None, stats, 0.5, 0.3, "kl", "jsd", 0.2, 0.7, 1.0, False)
    with pytest.raises(Exception, match=r"but got 'jsd'"):
        merged_rows_from_slices([s], [t], None, **dict(zip(OPT_NAMES, (0.5, 0.3, "kl", "jsd", 0.2, 0.7, 1.0, False))))


def test_no_process_group_is_amid_loss():
    # Without an initialised process group (or with a group of one) the vocab-parallel loss is amid_loss.
    from amid.parallel import vocab_parallel_amid_loss

    s, t = make_logits(4, 13)
    y = torch.tensor([1, -100, 2, 3])
    sa, sb = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    a = amid.amid_loss(sa, t, y, alpha=-1.0, lam=0.3, divergence="ab", order="rq")
    b = vocab_parallel_amid_loss(sb, t, y, alpha=-1.0, lam=0.3, divergence="ab", order="rq")
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(sa.grad, sb.grad)
    from amid.parallel import vocab_parallel_fused_linear_amid_loss

    h, w = torch.randn(4, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    a = amid.fused_linear_amid_loss(h, w, h, w.flip(0), y, lam=0.3)
    b = vocab_parallel_fused_linear_amid_loss(h, w, h, w.flip(0), y, lam=0.3)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# CUDA partial ops (csrc/cuda/amid_partial_cuda.cu) against the CPU ones; skipped without a GPU.

# float64: every case of the grid; 16/32-bit inputs: each (divergence, order) with the power
# mean, the geometric mean and a one-sided mixture.
LOW_GRID = [(d, o, a, l) for d in ("kl", "ab") for o in ("pr", "qr", "rp", "rq")
            for a, l in ((-1.0, 0.3), (1.0, 0.3), (0.5, 0.0))]


def _agree(name, x, ref, tol):
    """NaN and +-inf in the same places (the same infinities), elsewhere per column
    max |x - ref| / max(max |ref|, 1) <= tol (the partial sums are O(1); the floor of 1 keeps columns
    that are rounding noise around 0, e.g. kl's shifted S_G at lam = 0, from failing on noise)."""
    x, ref = x.cpu().double(), ref.double()
    assert x.shape == ref.shape, f"{name}: shapes {tuple(x.shape)} and {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    assert torch.equal(torch.isnan(x), torch.isnan(ref)), f"{name}: NaNs differ\n{x}\n{ref}"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(x), inf) and torch.equal(x[inf], ref[inf]), f"{name}: infinities differ"
    x2, r2 = x.reshape(x.shape[0], -1), ref.reshape(ref.shape[0], -1)
    for j in range(r2.shape[1]):
        fin = torch.isfinite(r2[:, j])
        if fin.any():
            err = (x2[fin, j] - r2[fin, j]).abs().max().item() / max(r2[fin, j].abs().max().item(), 1.0)
            assert err <= tol, f"{name}: column {j}: error {err:.3g} > {tol:.1g}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_partial_ops_cuda_vs_cpu(dtype):
    # The three partial ops on CUDA against the CPU ops on the same inputs and the same merged stats:
    # the seam rows (NaN, +-inf, all -inf, disjoint supports, an ignored row holding NaN, row weights)
    # in slices of widths 10, 1, 19, 11 (row-strided views of the CUDA logits), and rows of 3001 in
    # slices of 1000, 3 and 1998 (vector loads with heads and tails, every warp of the CTA). Then the
    # merge of the CUDA slices and the gradient (amid_loss_bwd on CUDA with the merged stats) against
    # the CPU merge, and in float64 against the single-process CPU op to 1e-10.
    ldt = amid.ops.loss_dtype(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    s, t = _seam_logits(dtype=dtype)
    s[3] = math.nan
    w = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.7], dtype=ldt)
    sl, tl = make_logits(6, 3001, dtype=dtype)
    cases = [(s, t, w, CUTS), (sl, tl, None, (0, 1000, 1003, 3001))]
    grid = GRID if dtype == torch.float64 else LOW_GRID
    for ci, ((s, t, w, cuts), (div, order, alpha, lam)) in enumerate(itertools.product(cases, grid)):
        name = f"case {ci // len(grid)} {div}/{order} alpha={alpha} lam={lam}"
        opts = _opts(div, order, alpha, lam)
        vals = tuple(opts.values())
        sc, tc = s.cuda(), t.cuda()
        wc = None if w is None else w.cuda()
        rows, stats = merged_rows_from_slices(_split(s, cuts), _split(t, cuts), w, **opts)
        for k, (a, b, ac, bc) in enumerate(zip(_split(s, cuts), _split(t, cuts), _split(sc, cuts), _split(tc, cuts))):
            _agree(f"{name} slice {k} lse", torch.ops.amid.amid_partial_lse(ac, bc, wc, opts["temperature"]),
                   torch.ops.amid.amid_partial_lse(a, b, w, opts["temperature"]), tol)
            for op in ("amid_partial_mix", "amid_partial_sums"):
                f = getattr(torch.ops.amid, op)
                _agree(f"{name} slice {k} {op}", f(ac, bc, wc, stats.cuda(), *vals), f(a, b, w, stats, *vals), tol)
        rows_c, stats_c = merged_rows_from_slices(_split(sc, cuts), _split(tc, cuts), wc, **opts)
        assert rows_c.is_cuda and rows_c.dtype == rows.dtype
        _agree(f"{name} rows", rows_c, rows, tol)
        _agree(f"{name} stats", stats_c, stats, tol)
        grad_c = _merged_grad(sc, tc, wc, stats_c, opts, cuts)
        assert grad_c.is_cuda and grad_c.dtype == dtype
        grad = _merged_grad(s, t, w, stats, opts, cuts)
        _agree(f"{name} grad", grad_c.T, grad.T, tol if dtype == torch.float64 else 1e-2)
        if dtype == torch.float64:
            loss, _st, grad1 = torch.ops.amid.amid_loss_fwd(s, t, w, *vals, True)
            assert _rel(rows_c.cpu(), loss) <= RTOL, name
            assert _rel(grad_c.cpu(), grad1) <= RTOL, name


@requires_cuda
def test_partial_ops_cuda_edge_cases():
    # N = 0; V = 1; rows of weight 0 are not read (NaN there changes nothing); stats with a NaN give NaN
    # rows; bad input is refused with the CPU op's message.
    for n, v in ((0, 7), (3, 1)):
        s, t = make_logits(n, v, dtype=torch.float32)
        stats = torch.zeros(n, 7, dtype=torch.float64)
        for dev in ("cpu", "cuda"):
            out = torch.ops.amid.amid_partial_lse(s.to(dev), t.to(dev), None, 1.0)
            assert out.shape == (n, 5) and out.dtype == torch.float64 and out.device.type == dev
        _agree("V = 1 lse", torch.ops.amid.amid_partial_lse(s.cuda(), t.cuda(), None, 1.0),
               torch.ops.amid.amid_partial_lse(s, t, None, 1.0), 1e-6)
        for op in ("amid_partial_mix", "amid_partial_sums"):
            f = getattr(torch.ops.amid, op)
            _agree(f"V = 1 {op}", f(s.cuda(), t.cuda(), None, stats.cuda(), 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False),
                   f(s, t, None, stats, 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False), 1e-6)
    s, t = make_logits(4, 50, dtype=torch.bfloat16, device="cuda")
    s[1] = math.nan
    w = torch.tensor([1.0, 0.0, 1.0, 1.0], device="cuda")
    lse = torch.ops.amid.amid_partial_lse(s, t, w, 1.0).cpu()
    assert torch.equal(lse[1], torch.tensor([-math.inf, 0.0, -math.inf, 0.0, 0.0], dtype=torch.float64))
    stats = torch.zeros(4, 7, dtype=torch.float64, device="cuda")
    stats[2, 4] = math.nan
    for op, k in (("amid_partial_mix", 3), ("amid_partial_sums", 8)):
        out = getattr(torch.ops.amid, op)(s, t, w, stats, 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False).cpu()
        assert out.shape == (4, k)
        assert torch.equal(out[1], torch.zeros(k, dtype=torch.float64))
        assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 3]]).any()
        with pytest.raises(RuntimeError, match=rf"amid::{op}: expected stats of dtype Double, but got Float"):
            getattr(torch.ops.amid, op)(s, t, w, stats.float(), 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False)
        with pytest.raises(RuntimeError, match=rf"amid::{op}: expected stats on device cuda:0, but got cpu"):
            getattr(torch.ops.amid, op)(s, t, w, stats.cpu(), 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False)
    with pytest.raises(RuntimeError, match=r"amid::amid_partial_lse: expected temperature > 0, but got 0"):
        torch.ops.amid.amid_partial_lse(s, t, w, 0.0)
    for dtype in (torch.float64, torch.bfloat16):
        s, t = make_logits(5, 23, dtype=dtype, device="cuda")
        opcheck(torch.ops.amid.amid_partial_lse.default, (s, t, None, 1.3))
        _rows, st = merged_rows_from_slices([s], [t], None, **_opts("ab", "rq", -1.0, 0.7))
        for op in (torch.ops.amid.amid_partial_mix, torch.ops.amid.amid_partial_sums):
            opcheck(op.default, (s, t, None, st) + tuple(_opts("ab", "rq", -1.0, 0.7).values()))


# ------------------------------------------------------------------------------------------------
# Multi-process (gloo, CPU): one spawn per world size runs every case; each rank builds the same full
# logits, runs the single-process op on them and the vocab-parallel loss on its shard, and writes the
# failures (or "OK") to a file.

SHARD_CUTS = {2: (0, 17, 41), 4: (0, 10, 11, 30, 41)}  # uneven; a 1-column shard at P = 4


def _free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _dist_cases(rank, world, group, fails):
    import torch.distributed as dist
    from amid.parallel import vocab_parallel_amid_loss as _vp

    def vocab_parallel_amid_loss(*args, **kw):
        return _vp(*args, group=group, **kw)

    cuts = SHARD_CUTS[world]
    lo, hi = cuts[rank], cuts[rank + 1]

    def check(name, got, ref, tol=RTOL):
        err = _rel(got, ref)
        if not err <= tol:
            fails.append(f"{name}: rel. error {err:.3g}")

    def run(name, s, t, labels=None, tol=RTOL, **kw):
        sr = s.clone().requires_grad_(True)
        ref = amid.amid_loss(sr, t, labels, **{k: v for k, v in kw.items() if k != "check_inputs"})
        ref.sum().backward()
        ss = s[..., lo:hi].clone().requires_grad_(True)
        got = vocab_parallel_amid_loss(ss, t[..., lo:hi].clone(), labels, **kw)
        got.sum().backward()
        check(name + " loss", got.detach(), ref.detach(), tol)
        check(name + " grad", ss.grad, sr.grad[..., lo:hi], tol)

    torch.manual_seed(7)
    s, t = _seam_logits()
    labels = torch.tensor([1, 2, 3, -100, 5, 6, 7, 8, 9])
    for div, order, alpha, lam in GRID:  # (the input exchange is tested below)
        run(f"{div}/{order} alpha={alpha} lam={lam}", s, t, labels, reduction="none", check_inputs=False,
            **_opts(div, order, alpha, lam))
    ok = slice(0, 1)  # one ordinary row for the reductions (the seam rows make them NaN)
    s3, t3 = make_logits(3, 4 * 41, dtype=torch.float64)
    s3, t3 = s3.reshape(3, 4, 41), t3.reshape(3, 4, 41)
    y3 = torch.tensor([[1, -100, 2, 3], [-100, -100, 4, 5], [6, 7, 8, -1]])
    for red in ("mean", "sum", "batchmean", "none"):
        run(f"3-D {red}", s3, t3, y3, reduction=red, ignore_index=-1)
        run(f"3-D {red} no labels, T=2, T^2", s3, t3, None, reduction=red, temperature=2.0, scale_by_t2=True,
            alpha=-1.0, lam=0.3, divergence="ab", order="rq")
    run("detach qr", s3, t3, y3, detach_assistant=True, order="qr", alpha=0.5, lam=0.3)
    run("grad_in_forward=False", s3, t3, y3, grad_in_forward=False, order="rp", alpha=2.0, lam=0.3)
    run("normalizer tensor", s3, t3, y3, normalizer=torch.tensor(5.0))
    run("num_items_in_batch", s3, t3, y3, num_items_in_batch=7, reduction="batchmean")
    run("vocab_size", s3, t3, y3, vocab_size=15)  # cuts every shard past column 15 (empty at P = 4)
    run("all rows ignored", s3, t3, torch.full((3, 4), -100))
    run("all rows ignored, none", s3, t3, torch.full((3, 4), -100), reduction="none")
    run("seam rows, mean", s[ok], t[ok], labels[ok])
    run("N = 0", s3[:0], t3[:0], y3[:0])
    run("N = 0, none", s3[:0], t3[:0], y3[:0], reduction="none", grad_in_forward=False)
    f32 = [x.float() for x in (s3, t3)]
    run("float32", *f32, y3, tol=1e-5, alpha=0.5, lam=0.3)

    # Errors: every rank raises (no rank waits in a collective), and the group stays usable.
    def expect_error(name, match, *args, **kw):
        try:
            vocab_parallel_amid_loss(*args, **kw)
            fails.append(f"{name}: no error")
        except ValueError as e:
            if not any(m in str(e) for m in match):
                fails.append(f"{name}: unexpected message {e}")

    sh, th = s3[..., lo:hi], t3[..., lo:hi]
    expect_error("rows differ", ["same row count"], sh[: 2 if rank == 0 else 3], th[: 2 if rank == 0 else 3])
    expect_error("labels differ", ["same labels"], sh, th, y3 + (rank == 1))
    expect_error("bad shape on rank 0", ["same shape", "rank(s) [0]"],
                 sh, th[..., :-1] if rank == 0 and hi - lo > 1 else th)
    expect_error("bad option on the last rank", ["expected lam in [0, 1]", f"rank(s) [{world - 1}]"],
                 sh, th, lam=2.0 if rank == world - 1 else 0.1)
    expect_error("vocab_size too big", ["expected vocab_size <="], sh, th, vocab_size=42)
    dist.barrier(group)
    run("after errors", s3, t3, y3)
    if group is None:
        _dtensor_cases(rank, world, fails, s3, t3, y3)
        _fused_linear_cases(rank, world, fails, lo, hi)


def _fused_linear_cases(rank, world, fails, lo, hi):
    # Column-parallel heads: rank r holds rows [lo, hi) of both heads (and biases); hidden replicated.
    from amid.parallel import vocab_parallel_fused_linear_amid_loss

    g = torch.Generator().manual_seed(11)
    H, Ht, V = 8, 6, 41
    hs = torch.randn(3, 4, H, generator=g, dtype=torch.float64)
    ht = torch.randn(3, 4, Ht, generator=g, dtype=torch.float64)
    ws = torch.randn(V, H, generator=g, dtype=torch.float64)
    wt = torch.randn(V, Ht, generator=g, dtype=torch.float64)
    bs = torch.randn(V, generator=g, dtype=torch.float64)
    bt = torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, -100, 2, 3], [-100, -100, 4, 5], [6, 7, 8, 9]])
    for kw in (dict(), dict(divergence="ab", order="rq", alpha=-1.0, lam=0.3, reduction="none", chunk_size=5),
               dict(order="qr", alpha=2.0, lam=0.3, temperature=1.7, scale_by_t2=True, chunk_size=1)):
        leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
        s = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2])
        t = torch.nn.functional.linear(ht, wt, bt)
        ref = amid.amid_loss(s, t, y, **{k: v for k, v in kw.items() if k != "chunk_size"})
        ref.sum().backward()
        mine = [hs.clone().requires_grad_(True), ws[lo:hi].clone().requires_grad_(True),
                bs[lo:hi].clone().requires_grad_(True)]
        got = vocab_parallel_fused_linear_amid_loss(mine[0], mine[1], ht, wt[lo:hi], y, student_bias_shard=mine[2],
                                                    teacher_bias_shard=bt[lo:hi], **kw)
        got.sum().backward()
        name = f"fused linear {kw}"
        if _rel(got.detach(), ref.detach()) > RTOL:
            fails.append(f"{name} loss")
        for what, a, b in (("hidden", mine[0].grad, leaves[0].grad), ("weight", mine[1].grad, leaves[1].grad[lo:hi]),
                           ("bias", mine[2].grad, leaves[2].grad[lo:hi])):
            if _rel(a, b) > RTOL:
                fails.append(f"{name} grad {what}: {_rel(a, b):.3g}")


def _dtensor_cases(rank, world, fails, s3, t3, y3):
    # amid.amid_loss on DTensor logits sharded on the last dim (41 over 4: 11, 11, 11, 8) == one process.
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for kw in (dict(), dict(divergence="ab", order="qr", alpha=-1.0, lam=0.3, reduction="none"),
               dict(order="rq", alpha=2.0, lam=0.3, grad_in_forward=False, temperature=1.5)):
        for dim in (-1, 2):
            sr = s3.clone().requires_grad_(True)
            ref = amid.amid_loss(sr, t3, y3, **kw)
            ref.sum().backward()
            sd = distribute_tensor(s3.clone(), mesh, [Shard(dim)]).requires_grad_(True)
            td = distribute_tensor(t3.clone(), mesh, [Shard(dim)])
            yd = distribute_tensor(y3, mesh, [Replicate()]) if kw else y3
            got = amid.amid_loss(sd, td, yd, **kw)
            got.sum().backward()
            name = f"DTensor Shard({dim}) {kw}"
            if type(got) is not torch.Tensor:
                fails.append(f"{name}: returned {type(got).__name__}")
            if _rel(got.detach(), ref.detach()) > RTOL:
                fails.append(f"{name} loss: {got} vs {ref}")
            if _rel(sd.grad.full_tensor(), sr.grad) > RTOL:
                fails.append(f"{name} grad")
    try:
        amid.amid_loss(distribute_tensor(s3, mesh, [Shard(0)]), distribute_tensor(t3, mesh, [Shard(0)]))
        fails.append("DTensor Shard(0): no error")
    except ValueError as e:
        if "expected student_logits sharded on the last dimension (placements [Shard(-1)])" not in str(e):
            fails.append(f"DTensor Shard(0): {e}")


def _dist_worker(rank, world, port, out_dir):
    """World of 4: the 2-process cases on the pairs {0, 1} and {2, 3} (at the same time), then the
    4-process cases on the whole world."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    fails = []
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        _dist_cases(rank % 2, 2, pairs[rank // 2], fails)
        fails = [f"P=2: {f}" for f in fails]
        _dist_cases(rank, world, None, fails)
    except Exception:
        fails.append(traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(fails) if fails else "OK")
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch(out_dir):
    """Run in a fresh interpreter (no autograd thread started yet, so fork is safe): fork four workers
    where the platform has fork (no re-import of torch per process: seconds instead of tens of
    seconds on a busy machine), else spawn."""
    import multiprocessing

    import torch.multiprocessing as mp

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    mp.start_processes(_dist_worker, args=(4, _free_port(), out_dir), nprocs=4, join=True, start_method=method)


def test_vocab_parallel_gloo(tmp_path):
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_parallel; test_parallel._launch({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(here), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in range(4):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert text == "OK", f"rank {r}:\n{text[:4000]}"


# ------------------------------------------------------------------------------------------------
# NCCL: 2 processes, one GPU each (skipped unless 2 GPUs and amid's CUDA kernels): the CUDA shards
# against the single-process CPU op on the whole logits in the same dtype (float64: 1e-10).

def _nccl_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from amid.parallel import vocab_parallel_amid_loss

    fails = []
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        dev = torch.device("cuda", rank)
        cuts = SHARD_CUTS[world]
        lo, hi = cuts[rank], cuts[rank + 1]

        def run(name, s, t, labels, tol, **kw):
            sr = s.clone().requires_grad_(True)  # the single-process CPU op in the same dtype
            ref = amid.amid_loss(sr, t, labels, **kw)
            ref.sum().backward()
            ss = s[..., lo:hi].to(dev).requires_grad_(True)
            got = vocab_parallel_amid_loss(ss, t[..., lo:hi].to(dev), labels.to(dev), **kw)
            got.sum().backward()
            if not got.is_cuda or ss.grad is None or not ss.grad.is_cuda:
                fails.append(f"{name}: result not on the GPU")
                return
            for what, x, r in (("loss", got, ref), ("grad", ss.grad, sr.grad[..., lo:hi])):
                err = _rel(x.detach().cpu(), r.detach())
                if not err <= tol:
                    fails.append(f"{name} {what}: rel. error {err:.3g}")

        torch.manual_seed(7)
        s, t = _seam_logits()
        labels = torch.tensor([1, 2, 3, -100, 5, 6, 7, 8, 9])
        for div, order, alpha, lam in GRID[::7]:
            run(f"{div}/{order} alpha={alpha} lam={lam}", s, t, labels, RTOL, reduction="none",
                **_opts(div, order, alpha, lam))
        s3, t3 = make_logits(3, 4 * 41, dtype=torch.float64)
        s3, t3 = s3.reshape(3, 4, 41), t3.reshape(3, 4, 41)
        y3 = torch.tensor([[1, -100, 2, 3], [-100, -100, 4, 5], [6, 7, 8, -1]])
        run("3-D mean", s3, t3, y3, RTOL, ignore_index=-1)
        run("grad_in_forward=False", s3, t3, y3, RTOL, grad_in_forward=False, order="rp", alpha=2.0, lam=0.3)
        run("float32", s3.float(), t3.float(), y3, 1e-4, alpha=0.5, lam=0.3)
        run("bfloat16", s3.bfloat16(), t3.bfloat16(), y3, 2e-2, divergence="ab", order="rq", alpha=-1.0, lam=0.3)
    except Exception:
        fails.append(traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(fails) if fails else "OK")
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch_nccl(out_dir):
    import torch.multiprocessing as mp

    mp.start_processes(_nccl_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True, start_method="spawn")


@requires_cuda
def test_vocab_parallel_nccl(tmp_path):
    import subprocess
    import sys

    import torch.distributed as dist

    if torch.cuda.device_count() < 2 or not dist.is_nccl_available():
        pytest.skip("needs 2 GPUs and NCCL")
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_parallel; test_parallel._launch_nccl({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(here), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in range(2):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert text == "OK", f"rank {r}:\n{text[:4000]}"
