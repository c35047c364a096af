"""Benchmark of the AMiD loss, forward + backward w.r.t. the student logits.

CPU (issue: core op; issue 9 item 8): the op against the eager PyTorch formula of the official code and
torch.compile (inductor) of it, N = 2048, V = 32000, fp32, one torch thread by default (--threads);
wall and process CPU time per step. Each (provider, setting) runs in a fresh subprocess so that its
peak resident memory can be read (peak RSS during one step minus the RSS once the inputs exist):

    python bench/bench_amid_loss.py --device cpu            # -> bench/results/cpu-amid_loss.csv

CUDA (issue: CUDA kernels): amid, the eager official formula, torch.compile of it, Liger-Kernel's
LigerKLDIVLoss / LigerJSD with the fp32 log_softmax their callers do (when importable), and a
read-2-write-1 copy of the same bytes (the floor's traffic), bf16, on the issue's shapes; median of
CUDA-event-timed steps after warm-up; GB/s against the 6*N*V-byte floor; extra peak memory:

    python bench/bench_amid_loss.py --device cuda           # -> bench/results/<gpu>-amid_loss.csv

A row per (provider, shape, setting); `python bench/plot.py` turns the CSVs into the README figure.
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

FIELDS = ["op", "provider", "mode", "setting", "N", "V", "dtype", "time_ms_p50", "time_ms_p20", "time_ms_p80",
          "gbps", "pct_of_copy", "peak_extra_mb", "grad_mb", "max_abs_loss_diff", "grad_rel_diff", "device_name",
          "torch_version", "amid_version", "git_sha", "timestamp", "cpu_time_ms_p50", "threads"]

# (divergence, order, alpha, lam)
HEADLINE = ("kl", "pr", 0.5, 0.5)
CUDA_SETTINGS = [HEADLINE, ("kl", "rq", 0.5, 0.5), ("ab", "pr", 0.5, 0.5), ("kl", "pr", -1.0, 0.5),
                 ("kl", "pr", 1.0, 0.5), ("kl", "pr", 3.0, 0.5), ("ab", "pr", -1.0, 0.5), ("kl", "rq", 3.0, 0.5)]
# The headline shape first: a run stopped early (bench/gpu_check.sh caps each stage) has it.
CUDA_SHAPES = [(8192, 151936), (4096, 32000), (8192, 128256), (4096, 262144)]
CPU_SETTINGS = [HEADLINE, ("kl", "rq", -1.0, 0.1), ("ab", "pr", 0.5, 0.1)]


def setting_name(st) -> str:
    return f"{st[0]}/{st[1]} alpha={st[2]:g} lam={st[3]:g}"


def make_inputs(n: int, v: int, dtype, device, seed: int = 0):
    """Fresh N(0, 3^2) logits, generated in place (no temporary of the inputs' size)."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.empty(n, v, dtype=dtype, device=device)
    t = torch.empty(n, v, dtype=dtype, device=device)
    s.normal_(0, 3, generator=g)
    t.normal_(0, 3, generator=g)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    return s, t, labels


# ------------------------------------------------------------------------------------------------
# Providers: each returns a function running one forward + backward and returning (loss, grad).

def provider_step(name: str, s, t, labels, st):
    import amid

    div, order, alpha, lam = st
    official_div = "fkl" if div == "kl" else div

    if name == "amid":
        def step():
            x = s.detach().requires_grad_(True)
            loss = amid.amid_loss(x, t, labels, alpha=alpha, lam=lam, divergence=div, order=order)
            loss.backward()
            return loss, x.grad
    elif name in ("eager", "compile"):
        fn = amid.reference.official_amid_loss
        if name == "compile":
            fn = torch.compile(fn)

        def step():
            x = s.detach().requires_grad_(True)
            loss = fn(x, t, labels, alpha, lam, official_div, order)
            loss.backward()
            return loss, x.grad
    elif name in ("liger_kldiv", "liger_jsd"):
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

        mod = LigerKLDIVLoss(reduction="batchmean", log_target=True) if name == "liger_kldiv" else LigerJSD(beta=0.5)

        def step():
            x = s.detach().requires_grad_(True)
            lq = torch.log_softmax(x.float(), -1)
            lp = torch.log_softmax(t.float(), -1)
            loss = mod(lq, lp) if name == "liger_kldiv" else mod(lq, lp)
            loss.backward()
            return loss, x.grad
    elif name == "copy_r2w1":
        out = torch.empty_like(s)

        def step():
            torch.add(t, s, out=out)
            return None, None
    else:
        raise ValueError(name)
    return step


# ------------------------------------------------------------------------------------------------
# CPU: one subprocess per (provider, setting)

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_worker(provider: str, st, n: int, v: int, reps: int, threads: int) -> dict:
    """Runs in a fresh process: peak-RSS growth of one step, then timed steps.

    The growth is (peak RSS of the process after the step) - (RSS once the inputs exist): an upper
    bound of the step's extra memory (the process peak before the step is at most the latter plus
    the interpreter's own start-up transients, which are far smaller here)."""
    torch.set_num_threads(threads)
    s, t, labels = make_inputs(n, v, torch.float32, "cpu")
    step = provider_step(provider, s, t, labels, st)
    base = _rss_mb()
    loss, grad = step()  # torch.compile compiles here (not timed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"loss": float(loss), "g_rows": grad[:4].double().tolist(), "peak_extra_mb": max(peak - base, 0.0)}
    del loss, grad
    # Wall time and this process's CPU time per step: on a shared machine the CPU time of a fixed number
    # of threads is the steadier measure of the work (wall time also counts waiting for a core).
    result["times"], result["cpu_times"] = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        result["times"].append((time.perf_counter() - w0) * 1e3)
        result["cpu_times"].append((time.process_time() - c0) * 1e3)
    return result


def run_cpu(args) -> None:
    n, v = args.cpu_shape
    grad_mb = n * v * 4 / 2**20
    rows = []
    for st in CPU_SETTINGS if not args.quick else [HEADLINE]:
        results = {}
        for provider in ("amid", "eager", "compile"):
            cmd = [sys.executable, os.path.abspath(__file__), "--cpu-worker",
                   json.dumps([provider, st, n, v, args.reps, args.threads])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[provider] = json.loads(out)
            print(f"[cpu] {setting_name(st)} {provider}: {common.quantiles(results[provider]['times'])['p50']:.0f} ms, "
                  f"CPU {common.quantiles(results[provider]['cpu_times'])['p50']:.0f} ms, "
                  f"+{results[provider]['peak_extra_mb']:.0f} MB", flush=True)
        ga = torch.tensor(results["amid"]["g_rows"])
        ge = torch.tensor(results["eager"]["g_rows"])
        for provider, r in results.items():
            q = common.quantiles(r["times"])
            rows.append({
                "op": "amid_loss", "provider": provider, "mode": "fwd+bwd", "setting": setting_name(st), "N": n, "V": v,
                "dtype": "float32", "time_ms_p50": round(q["p50"], 2), "time_ms_p20": round(q["p20"], 2),
                "time_ms_p80": round(q["p80"], 2), "gbps": "", "pct_of_copy": "",
                "peak_extra_mb": round(r["peak_extra_mb"], 1), "grad_mb": round(grad_mb, 1),
                "cpu_time_ms_p50": round(common.quantiles(r["cpu_times"])["p50"], 2), "threads": args.threads,
                "max_abs_loss_diff": f"{abs(r['loss'] - results['eager']['loss']):.3g}",
                "grad_rel_diff": f"{((ga - ge).abs().max() / ge.abs().max()).item() if provider == 'amid' else 0:.3g}",
                **common.meta("cpu"),
            })
    path = args.out or os.path.join(common.RESULTS_DIR, "cpu-amid_loss.csv")
    common.write_csv(path, rows, FIELDS)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# CUDA

def _liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
        return True
    except Exception:
        return False


def run_cuda(args) -> None:
    dev = "cuda"
    dtype = torch.bfloat16
    rows = []
    meta = common.meta(dev)
    shapes = [tuple(x) for x in args.shapes] if args.shapes else CUDA_SHAPES
    shapes = shapes[:1] if args.quick else shapes
    # Rewritten after every measurement, so a run cut short keeps what it measured.
    path = args.out or os.path.join(common.RESULTS_DIR, f"{common.device_slug(dev)}-amid_loss.csv")
    for n, v in shapes:
        s, t, labels = make_inputs(n, v, dtype, dev)
        floor_bytes = 6 * n * v  # read t and s once, write the gradient once (bf16)
        grad_mb = n * v * 2 / 2**20
        copy_ms = None
        providers = ["copy_r2w1", "amid", "eager", "compile"] + (["liger_kldiv", "liger_jsd"] if _liger_available() else [])
        ref_loss = ref_grad = None
        for provider in providers:
            settings = CUDA_SETTINGS if provider == "amid" else ([HEADLINE] if provider in ("eager", "compile") else [None])
            if args.quick and provider == "amid":
                settings = [HEADLINE]
            for st in settings:
                step = provider_step(provider, s, t, labels, st or HEADLINE)
                try:
                    torch.cuda.synchronize()
                    step()  # warm-up / compile
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    loss, grad = step()
                    torch.cuda.synchronize()
                    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
                    loss_diff = grad_diff = ""
                    if provider == "eager" and st == HEADLINE:
                        ref_loss, ref_grad = float(loss), grad[:64].float()
                    elif st == HEADLINE and ref_loss is not None and loss is not None and provider != "liger_jsd":
                        loss_diff = f"{abs(float(loss) - ref_loss):.3g}"
                        grad_diff = f"{((grad[:64].float() - ref_grad).abs().max() / ref_grad.abs().max()).item():.3g}"
                    del loss, grad
                    times = common.time_cuda_ms(lambda: step(), reps=args.reps, warmup=2)
                except torch.cuda.OutOfMemoryError:
                    print(f"[cuda] {provider} {n}x{v}: out of memory, skipped", flush=True)
                    torch.cuda.empty_cache()
                    continue
                q = common.quantiles(times)
                if provider == "copy_r2w1":
                    copy_ms = q["p50"]
                rows.append({
                    "op": "amid_loss", "provider": provider, "mode": "fwd+bwd",
                    "setting": setting_name(st) if st else "", "N": n, "V": v, "dtype": "bfloat16",
                    "time_ms_p50": round(q["p50"], 3), "time_ms_p20": round(q["p20"], 3), "time_ms_p80": round(q["p80"], 3),
                    "gbps": round(floor_bytes / (q["p50"] * 1e-3) / 1e9, 1),
                    "pct_of_copy": round(100 * copy_ms / q["p50"], 1) if copy_ms else "",
                    "peak_extra_mb": round(extra, 1), "grad_mb": round(grad_mb, 1), "max_abs_loss_diff": loss_diff,
                    "grad_rel_diff": grad_diff, **meta,
                })
                common.write_csv(path, rows, FIELDS)
                print(f"[cuda] {n}x{v} {provider:12s} {setting_name(st) if st else '':28s} {q['p50']:8.3f} ms "
                      f"{rows[-1]['gbps']:7.1f} GB/s  +{extra:8.0f} MB", flush=True)
        del s, t, labels
        torch.cuda.empty_cache()
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 3 on CPU, 20 on CUDA)")
    ap.add_argument("--cpu-shape", type=int, nargs=2, default=[2048, 32000], metavar=("N", "V"))
    ap.add_argument("--quick", action="store_true", help="headline setting and first shape only (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads per provider (default 1)")
    ap.add_argument("--shapes", type=int, nargs=2, action="append", metavar=("N", "V"),
                    help="CUDA shapes to run, repeatable (default: the issue's four, headline first)")
    ap.add_argument("--out", default=None, help="CSV path (default: bench/results/<device>-amid_loss.csv)")
    ap.add_argument("--cpu-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_worker:
        provider, st, n, v, reps, threads = json.loads(args.cpu_worker)
        print(json.dumps(cpu_worker(provider, tuple(st), n, v, reps, threads)))
        return
    if args.reps is None:
        args.reps = 3 if args.device == "cpu" else 20
    run_cpu(args) if args.device == "cpu" else run_cuda(args)


if __name__ == "__main__":
    main()
