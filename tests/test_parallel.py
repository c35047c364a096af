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


def _rel(x, ref, floor=1e-6):
    """max |x - ref| / max(max |ref|, floor) over the non-NaN entries; inf unless the NaNs agree. The
    floor (utils.normwise_err's) keeps the measure meaningful where the exact value is identically 0
    (qr / rq at lam = 0, where r = q: both sides hold rounding noise ~1e-17)."""
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
    gl = torch.ones(s.shape[0], dtype=ldt)
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
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
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
    bad = torch.zeros(3, 7, dtype=torch.float32)
    for op in ("amid_partial_mix", "amid_partial_sums"):
        with pytest.raises(RuntimeError, match=rf"amid::{op}: expected stats of dtype Double, but got Float"):
            getattr(torch.ops.amid, op)(s, t, None, bad, 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False)
        with pytest.raises(RuntimeError, match=rf"amid::{op}: expected stats of shape \[3, 7\], but got \[3, 5\]"):
            getattr(torch.ops.amid, op)(s, t, None, bad[:, :5].double(), 0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False)
        with pytest.raises(RuntimeError, match=rf"amid::{op}: expected stats of shape \[3, 7\]"):
            getattr(torch.ops.amid, op)(s.to("meta"), t.to("meta"), None, bad[:, :5].double().to("meta"), 0.5, 0.3,
                                        "kl", "pr", 0.2, 0.7, 1.0, False)
