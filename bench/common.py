"""Small helpers shared by the benchmark scripts: timing, quantiles, device name, git sha, CSV rows.

Nothing here touches a GPU at import; CUDA is only used by the functions that are asked to.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, Iterable, List, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' for CUDA; for CPU the model (from /proc/cpuinfo) and the instruction sets
    that amid's loops and ATen's kernels run: 'AMD EPYC (amid x86-64-v4, ATen AVX512)'; a
    -DAMID_CPU_TARGET=x86-64-v3 build run with ATEN_CPU_CAPABILITY=avx2 gives the AVX2 numbers."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import amid

    return f"{_cpu_model()} (amid {amid.build_info()['cpu_isa']}, ATen {torch.backends.cpu.get_cpu_capability()})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: str) -> str:
    """File-name form of the device: 'cpu', or 'cuda-nvidia-h100-80gb-hbm3'."""
    if not device.startswith("cuda"):
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def git_sha() -> str:
    """Short HEAD sha, with '-dirty' when the work tree has uncommitted changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def meta(device: str) -> Dict[str, str]:
    """The columns every result row carries: where, with what, when."""
    import amid

    return {
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "amid_version": amid.__version__,
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def quantiles(xs: Sequence[float]) -> Dict[str, float]:
    """Median, 20th and 80th percentiles (the single value for one sample)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return {"p50": xs[0], "p20": xs[0], "p80": xs[0]}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"p50": statistics.median(xs), "p20": q[1], "p80": q[7]}


def time_cpu_ms(fn: Callable[[], None], reps: int, warmup: int = 0) -> List[float]:
    """Wall-clock milliseconds of ``fn()`` per repetition (perf_counter)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_cuda_ms(fn: Callable[[], None], reps: int, warmup: int = 1) -> List[float]:
    """Milliseconds of ``fn()`` per repetition, measured with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def write_csv(path: str, rows: Iterable[Dict[str, object]], fieldnames: Sequence[str], append: bool = False) -> None:
    """Write rows (dicts) to ``path`` with a header; with ``append`` add to an existing file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
        if not (append and exists):
            w.writeheader()
        for r in rows:
            w.writerow(r)
