"""Benchmark of amid.fused_linear_amid_loss (issue 4): memory and time against the unfused path.

CPU (default; N = 8192, Hs = Ht = 256, V = 32000, float32):

    python bench/bench_fused_linear.py

  Providers: ``unfused`` (full logits, amid.amid_loss, autograd), ``fused`` and ``gemms`` (the four
  head GEMMs alone: student logits, teacher logits, grad of hidden, grad of weight; time floor).
  Each provider runs in a fresh subprocess: inputs are created (and thereby touched), then one
  forward+backward runs cold and the peak resident memory growth is measured as
  ``ru_maxrss after − VmRSS before`` (an upper bound: anything the process peaked at before also
  counts). Then the timed repetitions run (wall clock, median). The fused loss and gradients are
  checked against the unfused ones. Target: fused growth < 25 % of 2·N·V·4 bytes (the two fp32
  logits tensors the unfused path needs).

GPU (``--device cuda``; bf16, N ∈ {4096, 8192, 16384}, H = 4096, V = 151936):

    python bench/bench_fused_linear.py --device cuda

  Providers in one process, per N: ``gemms`` (the floor), ``fused`` (default chunk rule and
  accumulation), ``fused_c1024`` (chunks of 1024 rows: fewer passes over the [V, H] weight-gradient
  accumulator), ``fused_acc32`` (accum_dtype=float32), ``fused_kd_ce`` (0.5·AMiD + 0.5·CE, Liger's default mix),
  ``unfused`` (skipped when it does not fit) and ``liger_jsd`` (``LigerFusedLinearJSDLoss``, β = 0.5,
  when liger_kernel imports). Time: CUDA events, median of ``--reps``; memory: peak
  ``torch.cuda.max_memory_allocated`` minus the allocation before the call (includes the
  gradients it produces; ``grads_mb`` gives their size). Targets: fused ≤ 1.15 × gemms and
  peak extra ≤ 1.5 GB.

CSV: ``bench/results/<device>-fused_linear.csv`` (device = 'cpu' or 'cuda-<gpu name>').
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FIELDS = ["op", "provider", "mode", "N", "H", "V", "dtype", "chunk_size", "time_ms", "time_p20_ms", "time_p80_ms",
          "peak_extra_mb", "grads_mb", "logits_mb", "ratio_vs_gemms", "max_rel_err_vs_unfused", "device_name",
          "torch_version", "amid_version", "git_sha", "timestamp"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MB = 1024.0 * 1024.0
# Providers computing the same objective as ``unfused`` (checked against it); fused_kd_ce and liger differ.
SAME_AS_UNFUSED = ("fused", "fused_c1024", "fused_acc32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help="token rows (default: 8192 on CPU; 4096 8192 16384 on CUDA)")
    p.add_argument("--h", type=int, default=None, help="hidden size (default 256 on CPU, 4096 on CUDA)")
    p.add_argument("--v", type=int, default=None, help="vocabulary (default 32000 on CPU, 151936 on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--divergence", default="ab")
    p.add_argument("--order", default="pr")
    p.add_argument("--chunk-size", type=int, default=None, help="fused chunk rows (default: the memory-budget rule)")
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset of: gemms fused unfused (CPU); gemms fused fused_c1024 fused_acc32 fused_kd_ce "
                        "unfused liger_jsd (CUDA)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before timing (default 0 CPU, 2 CUDA)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/<device>-fused_linear.csv)")
    p.add_argument("--append", action="store_true", help="append to the CSV instead of overwriting it")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    a.n = a.n or ([8192] if cpu else [4096, 8192, 16384])
    a.h = a.h or (256 if cpu else 4096)
    a.v = a.v or (32000 if cpu else 151936)
    a.dtype = a.dtype or ("float32" if cpu else "bfloat16")
    a.reps = a.reps or (3 if cpu else 10)
    a.warmup = a.warmup if a.warmup is not None else (0 if cpu else 2)
    a.providers = a.providers or (["gemms", "fused", "unfused"] if cpu else
                                  ["unfused", "gemms", "fused", "fused_c1024", "fused_acc32", "fused_kd_ce",
                                   "liger_jsd"])
    return a


# ------------------------------------------------------------------------------------------------
# Inputs and providers (each returns a closure running one forward+backward)

def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # Created directly in the target dtype on the target device: no transient copies that would
    # raise the baseline high-water mark.
    hs = torch.randn(n, h, generator=g, dtype=dtype, device=device).requires_grad_()
    w = torch.randn(v, h, generator=g, dtype=dtype, device=device).mul_(h ** -0.5).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype, device=device).mul_(0.1).requires_grad_()
    ht = torch.randn(n, h, generator=g, dtype=dtype, device=device)
    wt = torch.randn(v, h, generator=g, dtype=dtype, device=device).mul_(h ** -0.5 * 1.5)
    bt = torch.randn(v, generator=g, dtype=dtype, device=device).mul_(0.1)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    y[::10] = -100  # 10 % ignored rows
    return dict(hs=hs, w=w, b=b, ht=ht, wt=wt, bt=bt, y=y)


def provider_fn(name, d, a):
    import amid

    opts = dict(alpha=a.alpha, lam=a.lam, divergence=a.divergence, order=a.order)

    if name == "gemms":
        def run():
            with torch.no_grad():
                s = d["hs"] @ d["w"].t()
                t = d["ht"] @ d["wt"].t()
                gh = s @ d["w"]
                gw = s.t() @ d["hs"]
            del s, t, gh, gw
        return run, False

    if name.startswith("fused"):
        kw = dict(opts, chunk_size=a.chunk_size)
        if name == "fused_acc32":
            kw["accum_dtype"] = torch.float32
        if name == "fused_kd_ce":
            kw.update(kd_weight=0.5, ce_weight=0.5)
        if name == "fused_c1024":
            kw["chunk_size"] = 1024

        def run():
            loss = amid.fused_linear_amid_loss(d["hs"], d["w"], d["ht"], d["wt"], d["y"], student_bias=d["b"],
                                               teacher_bias=d["bt"], **kw)
            loss.backward()
            return loss.detach()
        return run, True

    if name == "unfused":
        def run():
            s = F.linear(d["hs"], d["w"], d["b"])
            with torch.no_grad():
                t = F.linear(d["ht"], d["wt"], d["bt"])
            loss = amid.amid_loss(s, t, d["y"], **opts)
            loss.backward()
            return loss.detach()
        return run, True

    if name == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(beta=0.5)  # defaults: 0.5·CE + 0.5·JSD, chunks of 1024 rows

        def run():
            loss = fn(d["hs"], d["w"], d["ht"], d["wt"], d["y"], d["b"], d["bt"])
            loss.backward()
            return loss.detach()
        return run, True

    raise SystemExit(f"unknown provider {name!r}")


def zero_grads(d):
    for k in ("hs", "w", "b"):
        d[k].grad = None


def grads_bytes(d):
    return sum(d[k].grad.numel() * d[k].grad.element_size() for k in ("hs", "w", "b") if d[k].grad is not None)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def chunk_used(a, n, dtype, name):
    from amid.fused_linear import default_chunk_size

    if not name.startswith("fused"):
        return ""
    if name == "fused_c1024":
        return 1024
    if a.chunk_size:
        return a.chunk_size
    acc = torch.float32 if name == "fused_acc32" else dtype
    return default_chunk_size(n, a.v, dtype, teacher_dtype=dtype, ce_or_z=(name == "fused_kd_ce"), accum_dtype=acc,
                              fused_accum=(acc == dtype or a.device == "cuda"))


# ------------------------------------------------------------------------------------------------
# CPU: one subprocess per provider

def _rss_now_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found")


def cpu_worker(a):
    import amid  # noqa: F401  (loads the library before the baseline)

    dtype = DTYPES[a.dtype]
    n = a.n[0]
    d = make_inputs(n, a.h, a.v, dtype, "cpu")
    run, has_grads = provider_fn(a.worker, d, a)
    gc.collect()
    rss0 = _rss_now_kb()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = run()  # the measured, cold call
    peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {"growth_mb": (peak1 - rss0) / 1024.0, "rss_before_mb": rss0 / 1024.0, "maxrss_before_mb": peak0 / 1024.0,
           "maxrss_after_mb": peak1 / 1024.0, "grads_mb": grads_bytes(d) / MB}
    if has_grads and a.dump:
        torch.save({"loss": loss, **{k: d[k].grad for k in ("hs", "w", "b")}}, a.dump)
    del loss

    def timed():
        zero_grads(d)
        run()
    res["times_ms"] = common.time_cpu_ms(timed, a.reps, a.warmup)
    print(json.dumps(res))


def cpu_main(a):
    dtype = DTYPES[a.dtype]
    n = a.n[0]
    if len(a.n) > 1:
        print("note: CPU mode runs the first --n only", file=sys.stderr)
    logits_mb = 2 * n * a.v * torch.empty((), dtype=dtype).element_size() / MB
    m = common.meta("cpu")
    results, dumps = {}, {}
    tmp = tempfile.mkdtemp(prefix="amid_bench_fl_")
    for name in a.providers:
        dump = os.path.join(tmp, f"{name}.pt")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--dump", dump, "--device", "cpu",
               "--n", str(n), "--h", str(a.h), "--v", str(a.v), "--dtype", a.dtype, "--alpha", str(a.alpha),
               "--lam", str(a.lam), "--divergence", a.divergence, "--order", a.order, "--reps", str(a.reps),
               "--warmup", str(a.warmup)] + (["--chunk-size", str(a.chunk_size)] if a.chunk_size else [])
        print(f"[{name}] running in a fresh process ...", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stdout, out.stderr, file=sys.stderr)
            raise SystemExit(f"provider {name} failed (exit {out.returncode})")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        if os.path.exists(dump):
            dumps[name] = torch.load(dump)
            os.remove(dump)
        r = results[name]
        print(f"[{name}] peak RSS growth {r['growth_mb']:.1f} MB (RSS before {r['rss_before_mb']:.1f} MB, "
              f"max RSS after {r['maxrss_after_mb']:.1f} MB); times ms {[round(t, 1) for t in r['times_ms']]}",
              flush=True)
    os.rmdir(tmp)

    errs = {}
    if "unfused" in dumps:
        ref = dumps["unfused"]
        for name, dd in dumps.items():
            if name in SAME_AS_UNFUSED:
                errs[name] = max(rel_err(dd[k], ref[k]) for k in ("loss", "hs", "w", "b"))
                print(f"[{name}] max relative error vs unfused (loss, grad hidden / weight / bias): {errs[name]:.2e}")
    gemm_ms = common.quantiles(results["gemms"]["times_ms"])["p50"] if "gemms" in results else None
    rows = []
    for name, r in results.items():
        q = common.quantiles(r["times_ms"])
        rows.append(dict(op="fused_linear_amid", provider=name, mode="full", N=n, H=a.h, V=a.v, dtype=a.dtype,
                         chunk_size=chunk_used(a, n, dtype, name), time_ms=round(q["p50"], 2),
                         time_p20_ms=round(q["p20"], 2), time_p80_ms=round(q["p80"], 2),
                         peak_extra_mb=round(r["growth_mb"], 1), grads_mb=round(r["grads_mb"], 1),
                         logits_mb=round(logits_mb, 1),
                         ratio_vs_gemms=round(q["p50"] / gemm_ms, 3) if gemm_ms else "",
                         max_rel_err_vs_unfused=f"{errs[name]:.2e}" if name in errs else "", **m))
    path = a.out or os.path.join(common.RESULTS_DIR, "cpu-fused_linear.csv")
    common.write_csv(path, rows, FIELDS, append=a.append)
    print(f"wrote {path}")
    if "fused" in results:
        g = results["fused"]["growth_mb"]
        ok = g < 0.25 * logits_mb and errs.get("fused", 0.0) < 1e-3
        print(f"target: fused peak growth {g:.1f} MB < 25% of 2·N·V·4 = {0.25 * logits_mb:.1f} MB "
              f"({100 * g / logits_mb:.1f}% of the logits) and same loss/grads: {'MET' if ok else 'NOT MET'}")


# ------------------------------------------------------------------------------------------------
# GPU: one process, CUDA events and the CUDA caching allocator's peak

def cuda_main(a):
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    import amid

    dtype = DTYPES[a.dtype]
    m = common.meta("cuda")
    providers = list(a.providers)
    if not amid.cuda_kernels_available():
        dropped = [p for p in providers if p.startswith("fused") or p == "unfused"]
        providers = [p for p in providers if p not in dropped]
        print(f"skipping {dropped}: this amid build has no CUDA kernels ({amid.build_info()})")
    if "liger_jsd" in providers:
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except Exception as e:  # noqa: BLE001
            print(f"skipping liger_jsd: liger_kernel not importable ({type(e).__name__}: {e})")
            providers.remove("liger_jsd")
    rows = []
    total_mem = torch.cuda.get_device_properties(0).total_memory
    path = a.out or os.path.join(common.RESULTS_DIR, f"{common.device_slug('cuda')}-fused_linear.csv")
    written = 0  # rows are written after each N, so a run cut short keeps the sizes it finished
    for n in a.n:
        d = make_inputs(n, a.h, a.v, dtype, "cuda")
        logits_mb = 2 * n * a.v * torch.empty((), dtype=dtype).element_size() / MB
        ref = None
        res, errs = {}, {}
        for name in providers:
            if name == "unfused" and 5 * n * a.v * d["w"].element_size() > 0.8 * total_mem:
                print(f"[N={n}] skipping unfused: its logits do not fit")
                continue
            run, has_grads = provider_fn(name, d, a)
            zero_grads(d)
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = run()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / MB
            gmb = grads_bytes(d) / MB
            if has_grads:
                cur = {"loss": loss, **{k: d[k].grad for k in ("hs", "w", "b")}}
                if name == "unfused":
                    ref = cur  # kept (in the baseline of the later providers) to check them
                elif name in SAME_AS_UNFUSED and ref is not None:
                    errs[name] = max(rel_err(cur[k], ref[k]) for k in ("loss", "hs", "w", "b"))
                    print(f"[N={n}] {name} vs unfused max relative error (loss, grads): {errs[name]:.2e}")
                del cur
            del loss

            def timed():
                zero_grads(d)
                run()
            ts = common.time_cuda_ms(timed, a.reps, a.warmup)
            zero_grads(d)
            q = common.quantiles(ts)
            res[name] = (q, peak, gmb)
            print(f"[N={n}] {name}: {q['p50']:.2f} ms (p20 {q['p20']:.2f}, p80 {q['p80']:.2f}), peak extra "
                  f"{peak:.0f} MB (of which gradients {gmb:.0f} MB)", flush=True)
        gemm = res["gemms"][0]["p50"] if "gemms" in res else None
        for name in providers:
            if name not in res:
                continue
            q, peak, gmb = res[name]
            rows.append(dict(op="fused_linear_amid", provider=name, mode="full", N=n, H=a.h, V=a.v, dtype=a.dtype,
                             chunk_size=chunk_used(a, n, dtype, name), time_ms=round(q["p50"], 3),
                             time_p20_ms=round(q["p20"], 3), time_p80_ms=round(q["p80"], 3),
                             peak_extra_mb=round(peak, 1), grads_mb=round(gmb, 1), logits_mb=round(logits_mb, 1),
                             ratio_vs_gemms=round(q["p50"] / gemm, 3) if gemm else "",
                             max_rel_err_vs_unfused=f"{errs[name]:.2e}" if name in errs else "", **m))
            if name.startswith("fused") and gemm:
                print(f"[N={n}] {name}: target ≤ 1.15 × gemms: {q['p50'] / gemm:.3f}×; peak extra ≤ 1536 MB: "
                      f"{peak:.0f} MB")
        del d, res, ref
        common.write_csv(path, rows[written:], FIELDS, append=a.append or written > 0)
        written = len(rows)
        print(f"wrote {path}", flush=True)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return cpu_worker(a)
    return cpu_main(a) if a.device == "cpu" else cuda_main(a)


if __name__ == "__main__":
    main()
