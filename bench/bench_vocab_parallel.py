"""Vocab-parallel AMiD on CPU (gloo): bytes communicated per step and time, against all-gathering the
logits and against the single-process op.

    python bench/bench_vocab_parallel.py                 # N = 2048, V = 32000, 2 ranks, float32
    python bench/bench_vocab_parallel.py --n 256 --v 4000 --reps 2 --out /tmp/x.csv   # smoke run
    python bench/bench_vocab_parallel.py --passes        # one rank's passes, CPU time, one process

Providers (forward + backward of the 'mean' loss with labels, gradient written in the forward):
  single            amid.amid_loss on the full [N, V] logits in one process (run by rank 0 alone,
                    the other rank waiting);
  vocab_parallel    amid.parallel.vocab_parallel_amid_loss on each rank's [N, V/P] shard;
  allgather_logits  each rank all-gathers the student and teacher shards into [N, V] logits, runs
                    amid_loss on them and keeps its shard's gradient (what the loss costs without
                    the partial ops).
Every process runs on ``--threads`` threads (default 1: one core per rank). Bytes: ``payload``, the
bytes of the tensors handed to the collectives per rank and step (counted, not estimated), and
``wire``, what a ring algorithm sends per rank for them (all-reduce 2(P-1)/P x payload, all-gather
(P-1)/P x output). Times are the median of ``--reps`` steps on rank 0 after one warm-up step,
between barriers. CSV: bench/results/cpu-vocab_parallel.csv (the CPU model and the machine's 1-minute
load average at the time are in every row: on a shared machine the times are only indicative).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, ROOT, meta, quantiles, time_cpu_ms, write_csv  # noqa: E402

sys.path.insert(0, ROOT)  # this checkout's amid, also in the spawned workers

FIELDS = ["op", "provider", "N", "V", "P", "dtype", "threads", "time_ms", "time_p20_ms", "time_p80_ms",
          "payload_bytes_per_rank", "wire_bytes_per_rank", "collectives", "max_rel_err_vs_single", "loadavg_1m",
          "device_name", "torch_version", "amid_version", "git_sha", "timestamp"]


def _worker(rank, world, port, args, out):
    import torch.distributed as dist

    import amid
    from amid.parallel import CommCounter, vocab_parallel_amid_loss

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    N, V = args.n, args.v
    s = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = -100
    cuts = [V * r // world for r in range(world + 1)]
    lo, hi = cuts[rank], cuts[rank + 1]
    s_sh, t_sh = s[:, lo:hi].contiguous(), t[:, lo:hi].contiguous()
    opts = dict(alpha=0.5, lam=0.1, divergence="kl", order="pr")
    rows = []

    def record(provider, times, payload, wire, calls, err):
        q = quantiles(times)
        rows.append(dict(op="amid_loss", provider=provider, N=N, V=V, P=world, dtype=args.dtype, threads=args.threads,
                         time_ms=round(q["p50"], 2), time_p20_ms=round(q["p20"], 2), time_p80_ms=round(q["p80"], 2),
                         payload_bytes_per_rank=payload, wire_bytes_per_rank=wire, collectives=calls,
                         max_rel_err_vs_single=err, loadavg_1m=round(os.getloadavg()[0], 1), **meta("cpu")))

    # single process (rank 0), the reference loss and gradient
    ref = {}

    def single():
        x = s.clone().requires_grad_(True)
        loss = amid.amid_loss(x, t, y, **opts)
        loss.backward()
        ref["loss"], ref["grad"] = loss.detach(), x.grad

    dist.barrier()
    if rank == 0:
        times = time_cpu_ms(single, args.reps, warmup=1)
        record("single", times, 0, 0, 0, "")
    dist.barrier()
    if rank != 0:
        single()  # every rank checks its shard against the one-process gradient (not timed)

    counter = CommCounter()
    got = {}

    def vp():
        x = s_sh.clone().requires_grad_(True)
        loss = vocab_parallel_amid_loss(x, t_sh, y, **opts, comm_counter=counter)
        loss.backward()
        got["loss"], got["grad"] = loss.detach(), x.grad

    vp()
    # the input exchange (one all_gather of 8 int64 per rank) and the five all-reduces
    counter = CommCounter()
    vp()
    exch = 8 * 8
    payload, calls = counter.bytes + exch, counter.calls + 1
    wire = int(2 * (world - 1) / world * counter.bytes + (world - 1) / world * exch * world)
    dist.barrier()
    times = time_cpu_ms(lambda: (dist.barrier(), vp()), args.reps)
    err = max(((got["loss"] - ref["loss"]).abs() / ref["loss"].abs()).item(),
              ((got["grad"].double() - ref["grad"][:, lo:hi].double()).abs().max()
               / ref["grad"].double().abs().max()).item())
    errs = [torch.tensor(err, dtype=torch.float64)]
    dist.all_reduce(errs[0], op=dist.ReduceOp.MAX)
    if rank == 0:
        record("vocab_parallel", times, payload, wire, calls, f"{errs[0].item():.2e}")

    def gathered():
        parts_s = [torch.empty(N, cuts[r + 1] - cuts[r], dtype=dtype) for r in range(world)]
        parts_t = [torch.empty_like(p) for p in parts_s]
        dist.all_gather(parts_s, s_sh)
        dist.all_gather(parts_t, t_sh)
        x = torch.cat(parts_s, 1).requires_grad_(True)
        loss = amid.amid_loss(x, torch.cat(parts_t, 1), y, **opts)
        loss.backward()
        return x.grad[:, lo:hi].contiguous()

    dist.barrier()
    times = time_cpu_ms(lambda: (dist.barrier(), gathered()), args.reps, warmup=1)
    out_bytes = 2 * N * V * s.element_size()
    if rank == 0:
        record("allgather_logits", times, 2 * s_sh.numel() * s.element_size(), int((world - 1) / world * out_bytes), 2,
               "")
        write_csv(out, rows, FIELDS)
        for r in rows:
            print(f"{r['provider']:>17}: {r['time_ms']:9.1f} ms  payload {r['payload_bytes_per_rank']:>11} B  "
                  f"wire {r['wire_bytes_per_rank']:>11} B  err {r['max_rel_err_vs_single']}")
    dist.destroy_process_group()


def cpu_passes(args, out):
    """CPU time (time.process_time, one thread, best of --reps) of what one rank computes, in this process
    alone: the single-process op on [N, V] and on [N, V/P] against the partial passes on [N, V/P]
    (R1, R2, R3 and the gradient pass W = amid_loss_bwd). Free of the other ranks' load."""
    import time

    import amid  # noqa: F401  (loads the ops)
    from amid.parallel import merged_rows_from_slices

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    N, V, Vr = args.n, args.v, args.v // args.world
    s = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    o = dict(alpha=0.5, lam=0.1, divergence="kl", order="pr", ab_alpha=0.2, ab_beta=0.7, temperature=1.0,
             detach_assistant=False)
    ov = tuple(o.values())

    def cpu_ms(f):
        f()
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.process_time()
            f()
            best = min(best, time.process_time() - t0)
        return best * 1e3

    sh, th = s[:, :Vr].contiguous(), t[:, :Vr].contiguous()
    _rows, st = merged_rows_from_slices([sh], [th], None, **o)
    ldt = amid.ops.loss_dtype(dtype)
    ones = torch.ones(N, dtype=ldt)
    res = [("single fwd+grad", V, cpu_ms(lambda: torch.ops.amid.amid_loss_fwd(s, t, None, *ov, True))),
           ("single fwd+grad", Vr, cpu_ms(lambda: torch.ops.amid.amid_loss_fwd(sh, th, None, *ov, True))),
           ("R1 amid_partial_lse", Vr, cpu_ms(lambda: torch.ops.amid.amid_partial_lse(sh, th, None, 1.0))),
           ("R2 amid_partial_mix", Vr, cpu_ms(lambda: torch.ops.amid.amid_partial_mix(sh, th, None, st, *ov))),
           ("R3 amid_partial_sums", Vr, cpu_ms(lambda: torch.ops.amid.amid_partial_sums(sh, th, None, st, *ov))),
           ("W amid_loss_bwd", Vr, cpu_ms(lambda: torch.ops.amid.amid_loss_bwd(ones, sh, th, None, st.to(ldt), *ov)))]
    rows = [dict(op="amid_loss", provider=name, N=N, V=v, P=args.world, dtype=args.dtype, threads=1,
                 time_ms=round(ms, 1), loadavg_1m=round(os.getloadavg()[0], 1), **meta("cpu")) for name, v, ms in res]
    write_csv(out, rows, FIELDS)
    for name, v, ms in res:
        print(f"CPU time {name:>22} [{N}, {v}]: {ms:8.1f} ms")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "cpu-vocab_parallel.csv"))
    p.add_argument("--passes", action="store_true",
                   help="instead: CPU time of one rank's passes in this process (cpu-vocab_parallel_passes.csv)")
    args = p.parse_args()
    if args.passes:
        out = args.out.replace("cpu-vocab_parallel.csv", "cpu-vocab_parallel_passes.csv")
        cpu_passes(args, out)
        print(f"wrote {out}")
        return
    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    mp.start_processes(_worker, args=(args.world, port, args, args.out), nprocs=args.world, join=True,
                       start_method="spawn")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
