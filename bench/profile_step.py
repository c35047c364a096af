"""One AMiD forward-with-gradient kernel call to put under a profiler (bench/gpu_check.sh, stage
`profile`): the headline case of the CUDA benchmark, 8192 x 151936 bf16, kl/pr, alpha = lam = 0.5.

    ncu --clock-control none -k regex:amid_fwd --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis python bench/profile_step.py

Runs the op three times (the profiler skips the first two) and prints the CUDA-event time of the
last, so the numbers can be read beside the copy-kernel floor of the benchmark CSV.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_amid_loss import make_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--divergence", default="kl")
    ap.add_argument("--order", default="pr")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0, help="T (R1 takes its other form at T != 1)")
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    import amid

    s, t, _ = make_inputs(a.n, a.v, torch.bfloat16, "cuda")
    args = (s, t, None, a.alpha, a.lam, a.divergence, a.order, 0.2, 0.7, a.temperature, False, True)
    times = []
    for _ in range(a.calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        amid.ops.amid_loss_fwd(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    # The median of the calls after the first two (the first pays the launcher's one-time set-up).
    timed = sorted(times[2:] or times)
    ms = timed[len(timed) // 2]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("AMID_CUDA_PATH", "AMID_CUDA_STASH", "AMID_CUDA_BOUNDED",
                                                      "AMID_CUDA_PREFETCH") if k in os.environ)
    print(f"amid_loss_fwd (gradient in the forward) {a.n}x{a.v} bf16 {a.divergence}/{a.order} alpha={a.alpha} "
          f"lam={a.lam}{f' T={a.temperature}' if a.temperature != 1.0 else ''}{' ' + env if env else ''}: {ms:.3f} ms (median of {len(timed)}), "
          f"{6 * a.n * a.v / ms / 1e6:.0f} GB/s against the 6*N*V-byte floor")


if __name__ == "__main__":
    main()
