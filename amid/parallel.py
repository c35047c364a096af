"""Vocab-parallel AMiD: the exact loss when tensor parallelism shards the vocabulary over ranks.

With a column-parallel LM head, rank ``r`` of a process group of size P holds the logits of a
contiguous slice ``[v_r, v_r + V_r)`` of the vocabulary for every row (ranks in group order, the
slices concatenated in rank order are the whole vocabulary). Nobody holds a whole row, and the
logits are never gathered. The forward's three row reductions are split (ops in csrc/ops.cpp):

1. ``amid_partial_lse`` (R1): each rank's (max, Σ e^(x - max)) of t/T and s/T over its slice and
   an invalid-entry flag; merged with ``all_reduce(MAX)`` of the maxima and flag, then
   ``all_reduce(SUM)`` of the sums rescaled to the global maxima: A = LSE(t/T), B = LSE(s/T).
2. ``amid_partial_mix`` (R2), given A, B: (max lt, Σ e^(lt - max), Σ (r~ - o)) over the slice; merged
   the same way (MAX, then SUM) into Z = LSE(lt), chosen between log1p(Σ(r~ - o)) and the
   log-sum-exp exactly as the single-process kernel chooses.
3. ``amid_partial_sums`` (R3), given A, B, Z: the loss and gradient row sums (L, S_G, S_Gw, S_H,
   W̄ and kl's error-bound sums); ``all_reduce(SUM)``; then K and L as in the kernel.

Five all-reduces per step of N × (3, 2, 1, 2, 8) float64 values: 128·N bytes per rank, independent
of V (the logits themselves are N·V). The gradient of a rank's slice needs no communication: it
is ``amid_loss_bwd`` on the slice with the merged per-row stats (written in the forward when the
student requires grad, or recomputed in the backward with ``grad_in_forward=False``). The loss
(and every reduction of it) is the same on every rank; each rank's backward gives its slice's
gradient. The backward runs no collective.

Compute: the one-process kernel forms the mixture once per element (all of a row is in one thread's
scratch); here R2, R3 and the gradient pass each form it again on the shard (the merges sit between
them), so a rank spends about three single-op passes over its V/P columns (measured on CPU: see
bench/bench_vocab_parallel.py --passes and the README). Caching the mixture between the passes would
trade that for three [N, V/P] float32 buffers; not done.

Semantics at the seams: identical to ``amid.amid_loss`` on the gathered logits, up to rounding (the
partial sums are added in another order): tested to 1e-10 relative in float64 for 2 and 4 ranks,
every divergence × order, α ∈ {-3, -1, 0, 0.5, 1, 2}, λ ∈ {0, 0.3, 1} (tests/test_parallel.py; the
one-process merge of the same grid differs by ≤ 4e-15).

* Uneven shards (V not divisible by P): any widths ≥ 0 (a rank may even hold no column after
  ``vocab_size`` cuts it); only the concatenation matters.
* Masked entries (-inf) anywhere, including a shard that is entirely -inf for a row or -inf on one
  rank only: masked entries, exactly as in one process (a rank whose slice is all -inf contributes
  the neutral state).
* Ignored rows (``labels == ignore_index``): zero loss and gradient; no rank reads them; all rows
  ignored gives a zero loss ('mean': 0, never NaN). Every collective is still entered by every rank.
* NaN or +inf anywhere in a kept row (on any rank), or a row whose teacher or student logits are -inf
  on every rank: that row's loss and gradient are NaN, on every rank.
* α ≥ 1 (a mixture that vanishes where p or q does) with supports that are disjoint across the
  whole row (e.g. split across ranks): the assistant is undefined, NaN loss and gradient on every
  rank, as in one process.

Checks (``check_inputs=True``, the default): one all_gather of a few int64 per rank before any
other collective compares the row count, the lead shape, the dtypes, the options and a hash of the
labels across ranks; a rank whose own arguments are invalid reports it there, so every rank raises
(the rank with the bad argument its own message, the others a message naming that rank) and none
waits in a collective. This costs one small collective and one host sync per call; with
``check_inputs=False`` neither happens (and mismatched ranks are the caller's responsibility).

DTensor: ``amid.amid_loss`` given ``DTensor`` logits sharded on the last dimension over a 1-D
``DeviceMesh`` (placements ``[Shard(-1)]``) calls :func:`vocab_parallel_amid_loss` on the local
shards with the mesh's group.

Demo (CPU, gloo; checks the loss and gradient against one process):
``torchrun --nproc-per-node 2 examples/vocab_parallel_demo.py``.

CUDA: the three partial ops have CUDA kernels (csrc/cuda/amid_partial_cuda.cu) in a CUDA build of
amid, so CUDA shards work with NCCL (or any backend that all-reduces CUDA tensors); the gradient
is amid_loss_bwd's CUDA kernel with the merged stats. A build without CUDA kernels raises a clear
error on CUDA shards.

Not yet: in the fused linear path the CE / z-loss terms and the gradient in the forward.
"""
from __future__ import annotations

import math
import zlib
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import ops as _ops
from .functional import (DEFAULT_ALPHA, DEFAULT_LAM, _check_labels,
                         _check_reduction_args, _error, _integer, _is_dtensor, _loss_options, _normalizer_alias,
                         _row_weights, _shape)

__all__ = ["vocab_parallel_amid_loss", "vocab_parallel_fused_linear_amid_loss", "vocab_parallel_rows",
           "merged_rows_from_slices", "dtensor_amid_loss", "CommCounter"]

_NEG_INF = -math.inf
_A_MAX, _B_MAX, _Z, _SG, _K, _A_LOG, _B_LOG, _Z2 = range(8)  # amid.ops.NUM_STATS columns (Z2 = Z: single orders)


# ------------------------------------------------------------------------------------------------
# Merges. A "comm" merges per-slice [N, k] float64 tensors: `max` / `sum` take the list of the
# caller's slices (one per rank under torch.distributed, all of them in one process) and return the
# merged [N, k], the same on every rank.

class CommCounter:
    """Counts the collectives and the bytes each rank sends into them (for the benchmark)."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0

    def add(self, x: Tensor) -> None:
        self.calls += 1
        self.bytes += x.numel() * x.element_size()


class _LocalComm:
    """All slices in this process (tests and one-process checks of the merge rule)."""

    @staticmethod
    def max(xs: List[Tensor]) -> Tensor:
        return torch.stack(xs).amax(0)

    @staticmethod
    def sum(xs: List[Tensor]) -> Tensor:
        return torch.stack(xs).sum(0)


class _GroupComm:
    """One slice per rank: all_reduce MAX / SUM over the process group."""

    def __init__(self, group, counter: Optional[CommCounter] = None):
        self.group = group
        self.counter = counter

    def _reduce(self, xs: List[Tensor], op) -> Tensor:
        import torch.distributed as dist

        (x,) = xs
        x = x.contiguous().clone()
        if self.counter is not None:
            self.counter.add(x)
        dist.all_reduce(x, op=op, group=self.group)
        return x

    def max(self, xs: List[Tensor]) -> Tensor:
        import torch.distributed as dist

        return self._reduce(xs, dist.ReduceOp.MAX)

    def sum(self, xs: List[Tensor]) -> Tensor:
        import torch.distributed as dist

        return self._reduce(xs, dist.ReduceOp.SUM)


def _rescale(part_sum: Tensor, part_max: Tensor, merged_max: Tensor) -> Tensor:
    """Σ e^(x - m_r) rescaled to the merged maximum M: Σ e^(x - M); 0 for an empty / all -inf slice."""
    return torch.where(part_max > _NEG_INF, part_sum * torch.exp(part_max - merged_max), torch.zeros_like(part_sum))


# Neutral partial states of a slice without columns (its rank's shard was cut away by vocab_size).
def _empty_part(n: int, cols: Sequence[float], device) -> Tensor:
    return torch.tensor(list(cols), dtype=torch.float64, device=device).expand(n, len(cols)).clone()


def _merged_forward(slices: List[Tuple[Tensor, Tensor]], weight: Optional[Tensor], options: dict, comm,
                    n: int, device) -> Tuple[Tensor, Tensor]:
    """Row losses (float64, times the row weight) and the merged stats [N, 8] float64 (the layout of
    amid_loss_fwd's stats: NaN on invalid rows, 0 on ignored rows)."""
    opts = tuple(options.values())
    T = options["temperature"]
    keep = torch.ones(n, dtype=torch.bool, device=device) if weight is None else weight != 0

    # R1: A, B.
    parts = [_ops.amid_partial_lse(s, t, weight, T) if s.shape[1]
             else _empty_part(n, (_NEG_INF, 0, _NEG_INF, 0, 0), device) for s, t in slices]
    mx = comm.max([p[:, [0, 2, 4]] for p in parts])
    Mt, Ms, bad = mx.unbind(1)
    sums = comm.sum([torch.stack([_rescale(p[:, 1], p[:, 0], Mt), _rescale(p[:, 3], p[:, 2], Ms)], 1) for p in parts])
    St, Ss = sums.unbind(1)
    valid = keep & (bad == 0) & (Mt > _NEG_INF) & (Ms > _NEG_INF)
    zero = torch.zeros_like(Mt)
    stats = torch.stack([Mt, Ms, zero, zero, zero, torch.log(St), torch.log(Ss), zero], 1)
    nan = torch.full_like(stats, math.nan)

    def finish(st: Tensor, ok: Tensor) -> Tensor:
        # Kept rows that are not ok: all NaN (as the kernel's fill_nan_row); ignored rows: zeros.
        return torch.where(ok[:, None], st, torch.where(keep[:, None], nan, torch.zeros_like(st)))

    stats = finish(stats, valid)

    # R2: Z.
    parts = [_ops.amid_partial_mix(s, t, weight, stats, *opts) if s.shape[1]
             else _empty_part(n, (_NEG_INF, 0, 0), device) for s, t in slices]
    M2 = comm.max([p[:, :1] for p in parts])[:, 0]
    sums = comm.sum([torch.stack([_rescale(p[:, 1], p[:, 0], M2), p[:, 2]], 1) for p in parts])
    sr, tau = sums.unbind(1)
    Z = torch.where(tau.abs() < 0.5, torch.log1p(tau), M2 + torch.log(sr))
    valid = valid & (M2 > _NEG_INF)  # α >= 1 with disjoint supports: the assistant is undefined
    stats = finish(torch.cat([stats[:, :_Z], Z[:, None], stats[:, _Z + 1:_Z2], Z[:, None]], 1), valid)

    # R3: the row sums, K and L.
    parts = [_ops.amid_partial_sums(s, t, weight, stats, *opts) if s.shape[1] else _empty_part(n, (0,) * 8, device)
             for s, t in slices]
    L, S_G, S_Gw, S_H, Wbar, bound_l, sum_l1, abs_l1 = comm.sum(parts).unbind(1)
    K = S_H if options["detach_assistant"] else S_Gw - Wbar * S_G + S_H
    if options["divergence"] == "kl":  # amid_math.h kl_row_loss
        L = torch.where(bound_l <= abs_l1 + Z.abs(), L, sum_l1)
    stats = finish(torch.stack([stats[:, _A_MAX], stats[:, _B_MAX], Z, S_G, K, stats[:, _A_LOG], stats[:, _B_LOG], Z],
                               1), valid)
    rows = torch.where(valid, L, torch.where(keep, torch.full_like(L, math.nan), torch.zeros_like(L)))
    if weight is not None:
        rows = torch.where(keep, rows * weight.to(torch.float64), torch.zeros_like(rows))
    return rows, stats


def _options_from(fn: str, options: dict) -> dict:
    """The loss options (amid_loss's defaults) from keywords, types checked."""
    unknown = set(options) - set(_ops._OPTION_NAMES)
    if unknown:
        raise _error(fn, f"unexpected options {sorted(unknown)}; expected some of {list(_ops._OPTION_NAMES)}")
    get = options.get
    return _loss_options(fn, get("alpha", DEFAULT_ALPHA), get("lam", DEFAULT_LAM), get("divergence", "kl"),
                         get("order", "pr"), get("ab_alpha", 0.2), get("ab_beta", 0.7), get("temperature", 1.0),
                         get("detach_assistant", False))


def merged_rows_from_slices(student_slices: Sequence[Tensor], teacher_slices: Sequence[Tensor],
                            row_weight: Optional[Tensor] = None, **options) -> Tuple[Tensor, Tensor]:
    """The vocab-parallel computation in one process: the partial ops on each slice ([N, V_i] each,
    concatenated along V they are the whole logits) and the same merge rule as across ranks.
    Returns (row losses [N] in the loss dtype, stats [N, 8] float64). For tests of the ops and the
    merge rule without a process group."""
    s0 = student_slices[0]
    opts = _options_from("merged_rows_from_slices", options)
    rows, stats = _merged_forward(list(zip(student_slices, teacher_slices)), row_weight, opts, _LocalComm,
                                  s0.shape[0], s0.device)
    return rows.to(_ops.loss_dtype(s0.dtype)), stats


# ------------------------------------------------------------------------------------------------
# Autograd

class _VocabParallelRows(torch.autograd.Function):
    """Row losses of the whole vocabulary from this rank's shard; backward: this shard's gradient."""

    @staticmethod
    def forward(ctx, s, t, weight, comm, grad_in_forward, *opts):
        n = s.shape[0]
        options = dict(zip(_ops._OPTION_NAMES, opts))
        rows, stats = _merged_forward([(s, t)], weight, options, comm, n, s.device)
        ldt = _ops.loss_dtype(s.dtype)
        stats = stats.to(ldt)
        ctx.opts = opts
        ctx.empty = s.shape[1] == 0
        ctx.in_forward = bool(ctx.needs_input_grad[0] and grad_in_forward is not False)
        if ctx.in_forward:
            grad = (torch.zeros_like(s) if ctx.empty else
                    _ops.amid_loss_bwd(torch.ones(n, dtype=ldt, device=s.device), s, t, weight, stats, *opts))
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(s, t, weight, stats)
        ctx.mark_non_differentiable(stats)
        return rows.to(ldt), stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_stats):
        if ctx.needs_input_grad[1]:
            raise RuntimeError("amid.vocab_parallel_amid_loss: gradients with respect to teacher_shard are not "
                               "supported; detach the teacher (compute it under torch.no_grad())")
        nones = (None,) * (4 + len(ctx.opts))
        if not ctx.needs_input_grad[0]:
            return (None,) + nones
        if ctx.in_forward:
            (grad,) = ctx.saved_tensors
            return (_ops._scaled_copy(grad, grad_rows.contiguous()),) + nones
        s, t, weight, stats = ctx.saved_tensors
        if ctx.empty:
            return (torch.zeros_like(s),) + nones
        grad = _ops.amid_loss_bwd(grad_rows.contiguous(), s, t, weight, stats, *ctx.opts)
        return (grad,) + nones


# ------------------------------------------------------------------------------------------------
# Input exchange: one all_gather of a few int64 per rank, before any other collective.

_INFO = 8  # [ok, rows, width, lead hash, dtype code, options hash, labels hash, labels given]


def _crc(x) -> int:
    return zlib.crc32(repr(x).encode())


def _labels_hash(labels: Tensor) -> Tensor:
    y = labels.reshape(-1).to(torch.int64)
    k = torch.arange(y.numel(), dtype=torch.int64, device=y.device)
    return ((y + 7) * (k * 2654435761 + 97)).sum()  # wraps mod 2^64, the same on every rank


def _comm_device(group, fallback: torch.device) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback.type == "cpu" or "gloo" not in backend else torch.device("cpu")


def _exchange(fn: str, group, info: Tensor, local_error: Optional[BaseException]) -> Tensor:
    import torch.distributed as dist

    P = dist.get_world_size(group)
    outs = [torch.empty_like(info) for _ in range(P)]
    dist.all_gather(outs, info, group=group)
    out = torch.stack(outs)
    if local_error is not None:
        raise local_error
    bad = (out[:, 0] == 0).nonzero().flatten().tolist()
    if bad:
        raise _error(fn, f"rank(s) {bad} of the group reported invalid arguments (see the error on that rank)")
    return out.cpu()


# ------------------------------------------------------------------------------------------------
# Public API

def vocab_parallel_amid_loss(
    student_shard: Tensor,
    teacher_shard: Tensor,
    labels: Optional[Tensor] = None,
    *,
    group=None,
    alpha: float = DEFAULT_ALPHA,
    lam: float = DEFAULT_LAM,
    divergence: str = "kl",
    order: str = "pr",
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    detach_assistant: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Optional[Union[float, Tensor]] = None,
    grad_in_forward: Optional[bool] = None,
    backend: str = "auto",
    num_items_in_batch: Optional[Union[float, Tensor]] = None,
    vocab_size: Optional[int] = None,
    check_inputs: bool = True,
    comm_counter: Optional[CommCounter] = None,
    _fn: str = "vocab_parallel_amid_loss",
) -> Tensor:
    r"""AMiD loss of logits whose vocabulary is sharded over the ranks of ``group`` (tensor parallelism).

    ``student_shard`` / ``teacher_shard``: this rank's ``[..., V_r]`` slice of the student / teacher
    logits (the same columns of both; the slices of ranks 0, 1, ..., P-1 concatenated along the last
    dimension are the ``[..., V]`` logits). ``labels``: ``[...]``, the same on every rank. Every
    other option is :func:`amid.amid_loss`'s, with the same meaning and defaults; ``vocab_size`` cuts
    the concatenated vocabulary to its first ``vocab_size`` entries (a rank's shard may then be cut
    to nothing). ``backend``: 'auto' or 'kernels' (the partial ops run on the CPU or, in a CUDA build, on CUDA).

    Returns the loss of the whole vocabulary, the same on every rank (a scalar, or ``[...]`` for
    ``reduction='none'``); backward gives each rank the gradient of its own shard. ``group=None``:
    the default process group; a group of size 1 (or no initialised process group) is
    :func:`amid.amid_loss`. See the module docstring for the communication (five all-reduces of
    O(N) values, no logits), the checks (``check_inputs``) and the semantics at the seams (identical
    to one process). ``comm_counter``: a :class:`CommCounter` that records the collectives' bytes.
    """
    import torch.distributed as dist

    from .functional import amid_loss

    fn = _fn
    single = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1
    common = dict(alpha=alpha, lam=lam, divergence=divergence, order=order, ab_alpha=ab_alpha, ab_beta=ab_beta,
                  temperature=temperature, scale_by_t2=scale_by_t2, detach_assistant=detach_assistant,
                  ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                  grad_in_forward=grad_in_forward, num_items_in_batch=num_items_in_batch)
    if single:
        return amid_loss(student_shard, teacher_shard, labels, backend=backend, vocab_size=vocab_size, _fn=fn,
                         **common)

    # Local checks; a failure is reported to the other ranks through the exchange, then raised.
    err: Optional[BaseException] = None
    info = [0] * _INFO
    device = student_shard.device if isinstance(student_shard, Tensor) else torch.device("cpu")
    try:
        if not isinstance(student_shard, Tensor) or not isinstance(teacher_shard, Tensor):
            raise _error(fn, "expected student_shard and teacher_shard to be tensors")
        if student_shard.dim() < 1:
            raise _error(fn, "expected student_shard of shape [..., V_r], but got a 0-D tensor")
        if student_shard.shape != teacher_shard.shape:
            raise _error(fn, "expected student_shard and teacher_shard to have the same shape (the same vocabulary "
                             f"columns of both), but got {_shape(student_shard)} and {_shape(teacher_shard)}")
        if student_shard.dtype != teacher_shard.dtype:
            raise _error(fn, "expected student_shard and teacher_shard to have the same dtype, but got "
                             f"{student_shard.dtype} and {teacher_shard.dtype}")
        if teacher_shard.requires_grad and torch.is_grad_enabled():
            raise _error(fn, "expected teacher_shard not to require grad (detach the teacher or run it under "
                             "torch.no_grad()), but it requires grad")
        if backend not in ("auto", "kernels"):
            raise _error(fn, f"expected backend 'auto' or 'kernels' (the vocab-parallel path runs the partial ops), "
                             f"but got '{backend}'")
        if not torch._C._dispatch_has_kernel_for_dispatch_key("amid::amid_partial_lse",
                                                              "CUDA" if device.type == "cuda" else "CPU") \
                or device.type not in ("cpu", "cuda"):
            raise _error(fn, f"expected logits on the CPU or (with amid's CUDA kernels built) on a CUDA device: "
                             f"this build has no vocab-parallel kernels for device type '{device.type}'")
        options = _loss_options(fn, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant)
        if options["order"] == "jsd":
            raise _error(fn, "expected order to be one of 'pr', 'qr', 'rp', 'rq' (the one-pass generalized JSD, order "
                             "'jsd', is not available vocab-parallel yet: add the two orders' losses), but got 'jsd'")
        try:  # the op's range checks, here so that a bad value on one rank is reported to all
            _ops.check_options(fn, *options.values(), _ops.loss_dtype(student_shard.dtype))
        except RuntimeError as e:
            raise _error(fn, str(e).split(": ", 1)[-1]) from None
        ignore_index = _integer(fn, "ignore_index", ignore_index)
        normalizer = _normalizer_alias(fn, normalizer, num_items_in_batch)
        _check_reduction_args(fn, reduction, normalizer)
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise _error(fn, f"expected vocab_size to be None or an integer >= 1, but got {vocab_size!r}")
        lead = student_shard.shape[:-1]
        if labels is not None:
            _check_labels(fn, labels, lead, student_shard.device, what="shards")
        if check_inputs:
            info = [1, math.prod(lead), student_shard.shape[-1], _crc(tuple(lead)), _crc(str(student_shard.dtype)),
                    _crc((tuple(options.values()), bool(scale_by_t2), ignore_index, reduction, vocab_size,
                          None if isinstance(normalizer, Tensor) else normalizer)),
                    int(_labels_hash(labels)) if labels is not None else 0, int(labels is not None)]
    except (ValueError, RuntimeError, TypeError) as e:
        if not check_inputs:
            raise
        err = e
        info = [0] * _INFO

    P = dist.get_world_size(group)
    rank = dist.get_rank(group)
    offset, total = 0, None
    if check_inputs:
        cdev = _comm_device(group, device)
        got = _exchange(fn, group, torch.tensor(info, dtype=torch.int64, device=cdev), err)
        for col, what in ((1, "row count (the product of the leading dimensions)"), (3, "leading shape"),
                          (4, "dtype"), (5, "loss options"), (7, "presence of labels"), (6, "labels")):
            vals = got[:, col].tolist()
            if len(set(vals)) != 1:
                shown = vals if col in (1, 7) else "differ"
                raise _error(fn, f"expected every rank of the group to pass the same {what}, but ranks differ "
                                 f"({shown}); the shards of one batch must come from the same rows on every rank")
        widths = got[:, 2].tolist()
        offset, total = sum(widths[:rank]), sum(widths)
        if vocab_size is not None and vocab_size > total:
            raise _error(fn, f"expected vocab_size <= the vocabulary of the concatenated shards ({total} = "
                             f"{' + '.join(map(str, widths))} over {P} ranks), but got {vocab_size}")
        if total < 1:
            raise _error(fn, f"expected a vocabulary of at least 1 entry over the group, but the shards' widths are "
                             f"{widths}")
    elif vocab_size is not None:
        raise _error(fn, "expected check_inputs=True with vocab_size (the shards' offsets come from the exchange)")

    s, t = student_shard, teacher_shard
    if vocab_size is not None:
        w_keep = max(0, min(s.shape[-1], vocab_size - offset))
        s, t = s[..., :w_keep], t[..., :w_keep]
    lead = s.shape[:-1]
    Vr = s.shape[-1]
    s2 = s.reshape(math.prod(lead), Vr)
    t2 = t.reshape(math.prod(lead), Vr)
    if Vr > 1 and s2.stride(-1) != 1:
        s2 = s2.contiguous()
    if Vr > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    n = s2.shape[0]
    ldt = _ops.loss_dtype(s2.dtype)
    t2_scale = options["temperature"] ** 2 if scale_by_t2 else 1.0
    weight = _row_weights(labels, ignore_index, reduction, normalizer, lead, n, ldt, s2.device, t2_scale)
    if weight is not None:
        weight = weight.contiguous()
    if _ops.forward_ad_active(s2):
        raise _error(fn, _ops.FORWARD_AD_ERROR)
    comm = _GroupComm(group, comm_counter)
    rows, _stats = _VocabParallelRows.apply(s2, t2, weight, comm, grad_in_forward, *options.values())
    if reduction == "none":
        return rows.reshape(lead)
    return rows.sum()


def vocab_parallel_rows(student_shard: Tensor, teacher_shard: Tensor, row_weight: Optional[Tensor] = None, *,
                        group=None, comm_counter: Optional[CommCounter] = None, **options) -> Tuple[Tensor, Tensor]:
    """Low level: (row losses [N], stats [N, 8]) of 2-D shards [N, V_r] with a row weight, no checks,
    no autograd; every rank must call it with the same N and options."""
    opts = _options_from("vocab_parallel_rows", options)
    rows, stats = _merged_forward([(student_shard, teacher_shard)], row_weight, opts,
                                  _GroupComm(group, comm_counter), student_shard.shape[0], student_shard.device)
    return rows.to(_ops.loss_dtype(student_shard.dtype)), stats


# ------------------------------------------------------------------------------------------------
# DTensor

is_dtensor = _is_dtensor


def _local_replicated(fn: str, name: str, x):
    """A replicated DTensor (labels, normaliser) as its local tensor; anything else unchanged."""
    if not is_dtensor(x):
        return x
    if not all(p.is_replicate() for p in x.placements):
        raise _error(fn, f"expected {name} as a plain tensor or a replicated DTensor, but got placements "
                         f"{list(x.placements)}")
    return x.to_local()


def dtensor_amid_loss(student_logits, teacher_logits, labels=None, *, _fn: str = "amid_loss", **kwargs) -> Tensor:
    """amid.amid_loss on DTensor logits sharded on the last dimension over a 1-D DeviceMesh
    (placements ``[Shard(-1)]``, even or uneven): :func:`vocab_parallel_amid_loss` on the local shards
    with the mesh's process group. The gradient reaches ``student_logits`` as a DTensor with the same
    placements. Returns the loss as a plain tensor, the same on every rank of the mesh."""
    fn = _fn
    if not (is_dtensor(student_logits) and is_dtensor(teacher_logits)):
        raise _error(fn, "expected student_logits and teacher_logits to be both DTensors or both plain tensors, "
                         f"but got {type(student_logits).__name__} and {type(teacher_logits).__name__}")
    mesh = student_logits.device_mesh
    if teacher_logits.device_mesh != mesh:
        raise _error(fn, "expected student_logits and teacher_logits on the same DeviceMesh")
    if mesh.ndim != 1:
        raise _error(fn, f"expected DTensor logits on a 1-D DeviceMesh (the tensor-parallel group), but got a "
                         f"{mesh.ndim}-D mesh of shape {tuple(mesh.shape)}")
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        (p,) = x.placements
        if not (p.is_shard() and p.dim in (-1, x.dim() - 1)):
            raise _error(fn, f"expected {name} sharded on the last dimension (placements [Shard(-1)]), but got "
                             f"placements {list(x.placements)}")
    if student_logits.shape != teacher_logits.shape:
        raise _error(fn, "expected student_logits and teacher_logits to have the same shape, but got "
                         f"{_shape(student_logits)} and {_shape(teacher_logits)}")
    labels = _local_replicated(fn, "labels", labels)
    for key in ("normalizer", "num_items_in_batch"):
        if key in kwargs:
            kwargs[key] = _local_replicated(fn, key, kwargs[key])
    return vocab_parallel_amid_loss(student_logits.to_local(), teacher_logits.to_local(), labels,
                                    group=mesh.get_group(), _fn=fn, **kwargs)


# ------------------------------------------------------------------------------------------------
# Column-parallel LM heads: the fused linear path

class _VocabParallelFusedLinear(torch.autograd.Function):
    """Row losses from replicated hidden states and this rank's rows of the heads, chunk by chunk.
    The forward keeps only the merged per-row stats; the backward recomputes each chunk's logits
    (two GEMMs), takes the shard's gradient with amid_loss_bwd and all-reduces the hidden states'
    gradient over the group (every rank must run the backward)."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, weight, comm, chunk, reduce_hidden_grad, *opts):
        n = hs.shape[0]
        options = dict(zip(_ops._OPTION_NAMES, opts))
        rows = hs.new_empty((n,), dtype=torch.float64)
        stats = hs.new_empty((n, _ops.NUM_STATS), dtype=torch.float64)
        for a in range(0, max(n, 1), chunk):  # at least one pass, so that every rank enters the collectives
            b = min(a + chunk, n)
            s = torch.nn.functional.linear(hs[a:b], ws, bs)
            t = torch.nn.functional.linear(ht[a:b], wt, bt).to(s.dtype)
            w = None if weight is None else weight[a:b]
            rows[a:b], stats[a:b] = _merged_forward([(s, t)], w, options, comm, b - a, s.device)
        ctx.opts, ctx.comm, ctx.chunk, ctx.reduce_hidden_grad = opts, comm, chunk, reduce_hidden_grad
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, weight, stats)
        ctx.mark_non_differentiable(stats)
        return rows.to(_ops.loss_dtype(hs.dtype)), stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_stats):
        import torch.distributed as dist

        hs, ws, bs, ht, wt, bt, weight, stats = ctx.saved_tensors
        if any(ctx.needs_input_grad[i] for i in (3, 4, 5)):
            raise RuntimeError("amid.vocab_parallel_fused_linear_amid_loss: gradients with respect to the teacher "
                               "are not supported; detach the teacher")
        n = hs.shape[0]
        ldt = _ops.loss_dtype(hs.dtype)
        gh = torch.zeros_like(hs)
        gw = torch.zeros_like(ws) if ctx.needs_input_grad[1] else None
        gb = torch.zeros(ws.shape[0], dtype=ldt, device=ws.device) if bs is not None and ctx.needs_input_grad[2] \
            else None
        grad_rows = grad_rows.to(ldt).contiguous()
        for a in range(0, n, ctx.chunk):
            b = min(a + ctx.chunk, n)
            if ws.shape[0] == 0:
                break
            s = torch.nn.functional.linear(hs[a:b], ws, bs)
            t = torch.nn.functional.linear(ht[a:b], wt, bt).to(s.dtype)
            w = None if weight is None else weight[a:b]
            g = _ops.amid_loss_bwd(grad_rows[a:b], s, t, w, stats[a:b].to(ldt), *ctx.opts)
            gh[a:b] = g @ ws
            if gw is not None:
                gw.addmm_(g.t(), hs[a:b])
            if gb is not None:
                gb += g.sum(0, dtype=ldt)
        if ctx.reduce_hidden_grad and isinstance(ctx.comm, _GroupComm):
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=ctx.comm.group)  # the column-parallel backward
        return (gh, gw, None if gb is None else gb.to(bs.dtype), None, None, None) + (None,) * (5 + len(ctx.opts))


def vocab_parallel_fused_linear_amid_loss(
    student_hidden: Tensor,
    student_weight_shard: Tensor,
    teacher_hidden: Tensor,
    teacher_weight_shard: Tensor,
    labels: Optional[Tensor] = None,
    *,
    group=None,
    student_bias_shard: Optional[Tensor] = None,
    teacher_bias_shard: Optional[Tensor] = None,
    alpha: float = DEFAULT_ALPHA,
    lam: float = DEFAULT_LAM,
    divergence: str = "kl",
    order: str = "pr",
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    detach_assistant: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Optional[Union[float, Tensor]] = None,
    num_items_in_batch: Optional[Union[float, Tensor]] = None,
    chunk_size: Optional[int] = None,
    reduce_hidden_grad: bool = True,
    comm_counter: Optional[CommCounter] = None,
) -> Tensor:
    r"""AMiD loss of column-parallel LM heads: :func:`amid.fused_linear_amid_loss`'s AMiD term when each
    rank of ``group`` holds the rows ``[v_r, v_r + V_r)`` of both heads and the hidden states are
    replicated. Never forms more than a ``[chunk, V_r]`` block of logits per rank.

    ``student_hidden`` ``[..., Hs]`` / ``teacher_hidden`` ``[..., Ht]``: the same on every rank.
    ``student_weight_shard`` ``[V_r, Hs]``, ``teacher_weight_shard`` ``[V_r, Ht]`` (and the optional
    ``[V_r]`` bias shards): this rank's rows of the heads, the same vocabulary rows for both.
    Options as :func:`amid.amid_loss`. Returns the loss of the whole vocabulary, the same on every
    rank. The forward runs five all-reduces of O(chunk) values per chunk; it keeps the per-row stats
    only, and the backward recomputes each chunk's two GEMMs. Gradients: the student head shard (and
    bias shard) get their own rows' gradient; ``student_hidden``'s gradient is all-reduced over the
    group in the backward (every rank gets the full gradient, as Megatron's column-parallel layer
    does; pass ``reduce_hidden_grad=False`` if your framework all-reduces it itself), so every rank
    must run the backward. Not here (use :func:`amid.fused_linear_amid_loss` in one process): the
    CE / z-loss terms, ``kd_weight``, ``vocab_size``, ``accum_dtype`` and ``return_components``.
    """
    import torch.distributed as dist

    fn = "vocab_parallel_fused_linear_amid_loss"
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        from .fused_linear import fused_linear_amid_loss

        return fused_linear_amid_loss(
            student_hidden, student_weight_shard, teacher_hidden, teacher_weight_shard, labels,
            student_bias=student_bias_shard, teacher_bias=teacher_bias_shard, alpha=alpha, lam=lam,
            divergence=divergence, order=order, ab_alpha=ab_alpha, ab_beta=ab_beta, temperature=temperature,
            scale_by_t2=scale_by_t2, detach_assistant=detach_assistant, ignore_index=ignore_index, reduction=reduction,
            normalizer=normalizer, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)
    err: Optional[BaseException] = None
    info = [0] * _INFO
    try:
        for name, x in (("student_hidden", student_hidden), ("student_weight_shard", student_weight_shard),
                        ("teacher_hidden", teacher_hidden), ("teacher_weight_shard", teacher_weight_shard)):
            if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
                raise _error(fn, f"expected {name} to be a floating-point tensor")
        if student_weight_shard.dim() != 2 or teacher_weight_shard.dim() != 2 \
                or student_weight_shard.shape[0] != teacher_weight_shard.shape[0]:
            raise _error(fn, "expected student_weight_shard [V_r, Hs] and teacher_weight_shard [V_r, Ht] with the same "
                             f"V_r, but got {_shape(student_weight_shard)} and {_shape(teacher_weight_shard)}")
        if student_hidden.shape[:-1] != teacher_hidden.shape[:-1] or student_hidden.dim() < 1:
            raise _error(fn, "expected student_hidden and teacher_hidden with the same leading dimensions, but got "
                             f"{_shape(student_hidden)} and {_shape(teacher_hidden)}")
        if student_hidden.shape[-1] != student_weight_shard.shape[1] \
                or teacher_hidden.shape[-1] != teacher_weight_shard.shape[1]:
            raise _error(fn, "expected the hidden sizes to match the heads' (student "
                             f"{_shape(student_hidden)} x {_shape(student_weight_shard)}, teacher "
                             f"{_shape(teacher_hidden)} x {_shape(teacher_weight_shard)})")
        for name, x in (("teacher_hidden", teacher_hidden), ("teacher_weight_shard", teacher_weight_shard),
                        ("teacher_bias_shard", teacher_bias_shard)):
            if x is not None and x.requires_grad and torch.is_grad_enabled():
                raise _error(fn, f"expected {name} not to require grad (detach the teacher), but it requires grad")
        options = _loss_options(fn, alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant)
        try:
            _ops.check_options(fn, *options.values(), _ops.loss_dtype(student_hidden.dtype))
        except RuntimeError as e:
            raise _error(fn, str(e).split(": ", 1)[-1]) from None
        ignore_index = _integer(fn, "ignore_index", ignore_index)
        normalizer = _normalizer_alias(fn, normalizer, num_items_in_batch)
        _check_reduction_args(fn, reduction, normalizer)
        lead = student_hidden.shape[:-1]
        if labels is not None:
            _check_labels(fn, labels, lead, student_hidden.device, what="hidden states")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise _error(fn, f"expected chunk_size to be None or an integer >= 1, but got {chunk_size!r}")
        info = [1, math.prod(lead), student_weight_shard.shape[0], _crc((tuple(lead), student_hidden.shape[-1])),
                _crc(str(student_hidden.dtype)),
                _crc((tuple(options.values()), bool(scale_by_t2), ignore_index, reduction, chunk_size,
                      None if isinstance(normalizer, Tensor) else normalizer)),
                int(_labels_hash(labels)) if labels is not None else 0, int(labels is not None)]
    except (ValueError, RuntimeError, TypeError) as e:
        err = e
    device = student_hidden.device if isinstance(student_hidden, Tensor) else torch.device("cpu")
    got = _exchange(fn, group, torch.tensor(info, dtype=torch.int64, device=_comm_device(group, device)), err)
    for col, what in ((1, "row count"), (3, "hidden shapes"), (4, "dtype"), (5, "loss options"),
                      (7, "presence of labels"), (6, "labels")):
        if len(set(got[:, col].tolist())) != 1:
            raise _error(fn, f"expected every rank of the group to pass the same {what}, but ranks differ")
    v_max = max(got[:, 2].tolist())

    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    n = hs.shape[0]
    ldt = _ops.loss_dtype(hs.dtype)
    t2_scale = options["temperature"] ** 2 if scale_by_t2 else 1.0
    weight = _row_weights(labels, ignore_index, reduction, normalizer, lead, n, ldt, hs.device, t2_scale)
    if weight is not None:
        weight = weight.contiguous()
    if chunk_size is None:  # the same on every rank (from the widest shard), so the chunks' collectives pair up
        from .fused_linear import default_chunk_size

        chunk_size = default_chunk_size(max(n, 1), max(v_max, 1), hs.dtype)
    comm = _GroupComm(group, comm_counter)
    rows, _stats = _VocabParallelFusedLinear.apply(hs, student_weight_shard, student_bias_shard, ht,
                                                   teacher_weight_shard, teacher_bias_shard, weight, comm,
                                                   int(chunk_size), bool(reduce_hidden_grad), *options.values())
    if reduction == "none":
        return rows.reshape(lead)
    return rows.sum()
