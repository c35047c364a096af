"""Benchmark of the one-pass generalized JSD (issue 11 item 9) against amid's old two-pass form and
Liger-Kernel's JSD, on logits and from hidden states (fused linear).

    python bench/bench_jsd.py                  # CPU, float32, beta = 0.5
    python bench/bench_jsd.py --device cuda    # GPU (bf16), adds Liger's Triton LigerJSD / LigerFusedLinearJSD

Providers (forward + backward of the loss, ``mode = full``):

* logits level ([N, V] student and teacher logits given):
  ``amid_jsd`` (amid.generalized_jsd: the op once, order 'jsd'), ``amid_two_pass`` (the form before:
  β·amid_loss(order='pr') + (1-β)·amid_loss(order='qr'), two ops and two gradients),
  ``liger_torch`` (the eager torch JSD that Liger's chunked path applies per chunk,
  ``LigerFusedLinearJSDFunction.distillation_loss_fn``, on the whole logits, autograd), and on CUDA
  ``liger_jsd`` (Liger's Triton ``LigerJSD`` on fp32 log-softmaxes).
* fused linear (hidden states and LM heads; soft 0.5 + hard 0.5, Liger's default mix):
  ``amid_fl_jsd`` (amid.fused_linear_generalized_jsd), ``amid_fl_two_pass`` (fused_linear_amid_loss once
  per order, the CE in the first), ``liger_fl`` (Liger's ``LigerFusedLinearJSDLoss``, its chunked torch
  path, ``compiled=False`` on CPU), and on CUDA ``liger_fl_triton`` (``LigerFusedLinearJSD``) when it imports.

Each provider runs in a fresh subprocess (CPU): inputs are made, one cold forward+backward measures the
peak resident memory growth (``ru_maxrss`` after − ``VmRSS`` before: an upper bound), then ``--reps``
timed repetitions (wall clock: median, p20, p80; and the median process CPU time, ``cpu_time_ms``, which
on a shared machine is the steadier measure: with ``--threads 1`` it is the compute time whatever else
runs) with ``--threads`` intra-op threads. On CUDA: CUDA
events and ``torch.cuda.max_memory_allocated`` growth, in one process. Every provider's loss is checked
against ``amid_jsd`` / ``amid_fl_jsd`` (``max_rel_err``).

CSV: ``bench/results/<device>-jsd.csv``, one row per (provider, shape); the CPU model is in every row.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FIELDS = ["op", "provider", "mode", "N", "H", "V", "dtype", "beta", "time_ms", "time_p20_ms", "time_p80_ms",
          "cpu_time_ms", "cpu_ratio_vs_amid", "peak_extra_mb", "ratio_vs_amid", "max_rel_err", "threads", "device_name",
          "torch_version", "amid_version",
          "git_sha", "timestamp"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
LOGITS = ("amid_jsd", "amid_two_pass", "liger_torch", "liger_jsd")
FUSED = ("amid_fl_jsd", "amid_fl_two_pass", "liger_fl", "liger_fl_triton")
MB = 1024.0 * 1024.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, default=None, help="token rows of the logits benchmark (default 1024 CPU, 8192 CUDA)")
    p.add_argument("--v", type=int, default=None, help="vocabulary (default 32000 CPU, 151936 CUDA)")
    p.add_argument("--fl-n", type=int, default=None, help="token rows of the fused-linear benchmark (default 2048 CPU, "
                                                          "8192 CUDA)")
    p.add_argument("--h", type=int, default=None, help="hidden size (default 256 CPU, 4096 CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32 CPU, bfloat16 CUDA")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--providers", nargs="+", default=None, help=f"subset of {LOGITS + FUSED}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 CPU, 20 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default torch's)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    a.n = a.n or (1024 if cpu else 8192)
    a.v = a.v or (32000 if cpu else 151936)
    a.fl_n = a.fl_n or (2048 if cpu else 8192)
    a.h = a.h or (256 if cpu else 4096)
    a.dtype = a.dtype or ("float32" if cpu else "bfloat16")
    a.reps = a.reps or (5 if cpu else 20)
    a.out = a.out or os.path.join(common.RESULTS_DIR, f"{common.device_slug(a.device)}-jsd.csv")
    return a


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    return 0.0


def make_case(name: str, a):
    """(step, value) for provider ``name``: step() runs forward + backward once; value() the loss."""
    import amid

    dev, dt, beta = torch.device(a.device), DTYPES[a.dtype], a.beta
    g = torch.Generator().manual_seed(0)
    if name in LOGITS:
        s0 = (torch.randn(a.n, a.v, generator=g) * 2).to(dev, dt)
        t = (torch.randn(a.n, a.v, generator=g) * 2).to(dev, dt)
        if name == "amid_jsd":
            def loss(s):
                return amid.generalized_jsd(s, t, beta=beta)
        elif name == "amid_two_pass":
            def loss(s):
                kw = dict(alpha=-1.0, lam=beta, divergence="kl")
                return beta * amid.amid_loss(s, t, order="pr", **kw) + (1 - beta) * amid.amid_loss(s, t, order="qr", **kw)
        elif name == "liger_torch":
            from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction as LF

            def loss(s):  # Liger's per-chunk formula (fp32 upcast as its base class does), mean over rows
                return LF.distillation_loss_fn(s.float(), t.float(), beta=beta) / s.shape[0]
        else:  # liger_jsd (Triton, CUDA only): log-softmax inputs, Liger's argument order (student, teacher)
            from liger_kernel.transformers import LigerJSD

            mod = LigerJSD(beta=beta)

            def loss(s):
                return mod(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))

        def step():
            s = s0.detach().requires_grad_(True)
            out = loss(s)
            out.backward()
            return out

        return step
    hs0 = (torch.randn(a.fl_n, a.h, generator=g)).to(dev, dt)
    ws0 = (torch.randn(a.v, a.h, generator=g) * a.h ** -0.5 * 2).to(dev, dt)
    ht = (torch.randn(a.fl_n, a.h, generator=g)).to(dev, dt)
    wt = (torch.randn(a.v, a.h, generator=g) * a.h ** -0.5 * 2).to(dev, dt)
    y = torch.randint(0, a.v, (a.fl_n,), generator=g).to(dev)
    y[::7] = -100
    if name == "amid_fl_jsd":
        def loss(hs, ws):
            return amid.fused_linear_generalized_jsd(hs, ws, ht, wt, y, beta=beta, kd_weight=0.5, ce_weight=0.5)
    elif name == "amid_fl_two_pass":
        def loss(hs, ws):
            kw = dict(alpha=-1.0, lam=beta, divergence="kl")
            return (amid.fused_linear_amid_loss(hs, ws, ht, wt, y, order="pr", kd_weight=0.5 * beta, ce_weight=0.5, **kw)
                    + amid.fused_linear_amid_loss(hs, ws, ht, wt, y, order="qr", kd_weight=0.5 * (1 - beta), **kw))
    elif name == "liger_fl":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=beta, compiled=a.device != "cpu")

        def loss(hs, ws):
            return mod(hs, ws, ht, wt, y)
    else:  # liger_fl_triton
        from liger_kernel.transformers import LigerFusedLinearJSD

        mod = LigerFusedLinearJSD(jsd_beta=beta)

        def loss(hs, ws):  # Liger's Triton form: soft loss only, its own reduction
            return mod(hs, ws, ht, wt, y)

    def step():
        hs, ws = hs0.detach().requires_grad_(True), ws0.detach().requires_grad_(True)
        out = loss(hs, ws)
        out.backward()
        return out

    return step


def worker(a) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    before = _rss_mb()
    step = make_case(a.worker, a)
    made = _rss_mb()
    val = float(step().detach().float())  # cold run: the memory measurement
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    times, cpu_times = [], []
    for _ in range(a.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu_times.append((time.process_time() - c0) * 1e3)
    print(json.dumps({"value": val, "peak_extra_mb": peak - made, "inputs_mb": made - before, "times": times,
                      "cpu_times": cpu_times, "threads": torch.get_num_threads()}))


def run_cuda(name, a):
    torch.cuda.synchronize()
    step = make_case(name, a)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    val = float(step().detach().float())
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / MB
    times = common.time_cuda_ms(step, a.reps, warmup=2)
    return {"value": val, "peak_extra_mb": peak, "times": times, "threads": 0}


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return
    provs = a.providers or [p for p in LOGITS + FUSED if a.device == "cuda" or p not in ("liger_jsd", "liger_fl_triton")]
    meta = common.meta(a.device)
    rows, ref = [], {}
    for name in provs:
        if a.device == "cpu":
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--device", a.device, "--n", str(a.n),
                   "--v", str(a.v), "--fl-n", str(a.fl_n), "--h", str(a.h), "--dtype", a.dtype, "--beta",
                   str(a.beta), "--reps", str(a.reps)] + (["--threads", str(a.threads)] if a.threads else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{name}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
        else:
            try:
                r = run_cuda(name, a)
            except Exception as e:  # noqa: BLE001  (a provider that does not import / fit is skipped)
                print(f"{name}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                continue
        q = common.quantiles(r["times"])
        op = "jsd_logits" if name in LOGITS else "jsd_fused_linear"
        cpu = common.quantiles(r["cpu_times"])["p50"] if r.get("cpu_times") else None
        if name in ("amid_jsd", "amid_fl_jsd"):
            ref[op] = (r["value"], q["p50"], cpu)
        rv, rt, rc = ref.get(op, (None, None, None))
        rows.append(dict(op=op, provider=name, mode="full", N=a.n if op == "jsd_logits" else a.fl_n,
                         H="" if op == "jsd_logits" else a.h, V=a.v, dtype=a.dtype, beta=a.beta,
                         time_ms=round(q["p50"], 2), time_p20_ms=round(q["p20"], 2), time_p80_ms=round(q["p80"], 2),
                         cpu_time_ms=round(cpu, 2) if cpu is not None else "",
                         cpu_ratio_vs_amid=round(cpu / rc, 3) if cpu is not None and rc else "",
                         peak_extra_mb=round(r["peak_extra_mb"], 1),
                         ratio_vs_amid=round(q["p50"] / rt, 3) if rt else "",
                         max_rel_err=("%.2e" % (abs(r["value"] - rv) / abs(rv))) if rv and name != "liger_fl_triton" else "",
                         threads=r["threads"], **meta))
        print(f"{op:17s} {name:18s} {q['p50']:9.1f} ms (p20 {q['p20']:.1f}, p80 {q['p80']:.1f}, cpu {cpu or 0:.1f})  "
              f"peak +{r['peak_extra_mb']:.0f} MB  value {r['value']:.6g}", flush=True)
    common.write_csv(a.out, rows, FIELDS)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
