"""The CPU kernel's per-element loops must vectorise: a static check, not a timed one.

The CPU kernel (csrc/cpu/amid_loss_cpu.cpp) runs its per-element math (csrc/amid_math.h, shared with
the CUDA kernels) in `#pragma omp simd` loops that GCC vectorises only while every branch in them is a
select it can turn into vector blends. A change to the shared math can silently break that: 840527f's
one-exponential mixture made GCC derive a select between two boolean masks, the mixture loop went
scalar and kl/pr fwd+bwd at 2048 x 32000 took 2448 ms instead of 608 (same results, no test failed).

This test compiles the float loops of the CPU kernel's per-element passes (the mixture in every mode and
both references, the combined order's mixture, the kl / ab element terms and the excess tau) in a
small translation unit with the kernel's flags, for the two x86 clone levels (x86-64-v3: AVX2, x86-64-v4:
AVX-512), and reads GCC's vectoriser report (-fopt-info-vec-optimized): every loop must be reported
vectorised. GCC only (the project's CPU build is GCC's target_clones); skipped elsewhere.
"""
import os
import platform
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which(CXX) is None,
    reason="needs GCC on x86-64 (the CPU kernel's vectorised clones)")

# One loop per line, so that GCC's report (file:line) names the loop. The bodies mirror the CPU
# kernel's passes (pass_mixture, pass_mixture_both, pass_terms, pass_excess) with its math policy.
_LOOPS = {
    "mixture power ref p": "mixture_from_logits<MixMode::kPower, true, M, false>(P, a[v], b[v], A, B, g, x1, x2, x3, x4, x5); o1[v] = x3; o2[v] = x4; o3[v] = x5;",
    "mixture power ref q": "mixture_from_logits<MixMode::kPower, false, M, false>(P, a[v], b[v], A, B, g, x1, x2, x3, x4, x5); o1[v] = x3; o2[v] = x4; o3[v] = x5;",
    "mixture geometric": "mixture_from_logits<MixMode::kGeometric, true, M, false>(P, a[v], b[v], A, B, g, x1, x2, x3, x4, x5); o1[v] = x3; o2[v] = x4; o3[v] = x5;",
    "mixture jsd power": "mixture_both_from_logits<MixMode::kPower, M, false>(P, a[v], b[v], A, B, g, x1, x2, x3, x4, x5, x6); o1[v] = x3; o2[v] = x4; o3[v] = x5 + x6;",
    "terms kl/pr": "const Terms<float> t = element_terms<Divergence::kKL, Order::kPR, M>(P, a[v], b[v], c[v], log_prob<M>(a[v], A), log_prob<M>(b[v], B), c[v] - g, b[v] - g); o1[v] = t.l; o2[v] = t.G; o3[v] = t.l1 + t.lb;",
    "terms kl/rq": "const Terms<float> t = element_terms<Divergence::kKL, Order::kRQ, M>(P, a[v], b[v], c[v], log_prob<M>(a[v], A), log_prob<M>(b[v], B), c[v] - g, b[v] - g); o1[v] = t.l; o2[v] = t.G + t.H; o3[v] = t.l1 + t.lb;",
    "terms ab/pr": "const Terms<float> t = element_terms<Divergence::kAB, Order::kPR, M>(P, a[v], b[v], c[v], log_prob<M>(a[v], A), log_prob<M>(b[v], B), c[v] - g, b[v] - g); o1[v] = t.l; o2[v] = t.G; o3[v] = t.H;",
    "terms ab/rq": "const Terms<float> t = element_terms<Divergence::kAB, Order::kRQ, M>(P, a[v], b[v], c[v], log_prob<M>(a[v], A), log_prob<M>(b[v], B), c[v] - g, b[v] - g); o1[v] = t.l; o2[v] = t.G; o3[v] = t.H;",
    "excess": "o1[v] = assistant_excess<M>(a[v], b[v], c[v]);",
}


def _source() -> str:
    lines = [
        '#include "amid_math.h"',
        '#include "cpu/vec_math.h"',
        "using namespace amid;",
        "using M = VecMath;",
        "#define ARGS const LossParams<float>& P, const float* a, const float* b, const float* c, long V, "
        "RowLse<float> A, RowLse<float> B, float g, float* o1, float* o2, float* o3",
    ]
    for i, body in enumerate(_LOOPS.values()):
        lines.append(f"void loop{i}(ARGS) {{ float x1, x2, x3, x4, x5, x6; (void)x1; (void)x2; (void)x6;")
        lines.append("#pragma omp simd")
        lines.append(f"for (long v = 0; v < V; ++v) {{ {body} }} }}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v4"])
def test_cpu_element_loops_vectorise(tmp_path, arch):
    src = tmp_path / "loops.cpp"
    src.write_text(_source())
    report = tmp_path / "vec.txt"
    cmd = [CXX, "-std=c++17", "-O3", "-fno-trapping-math", "-fopenmp-simd", f"-march={arch}",
           f"-I{os.path.join(ROOT, 'csrc')}", f"-fopt-info-vec-optimized={report}", "-c", str(src),
           "-o", str(tmp_path / "loops.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and "unrecognized" in res.stderr and "march" in res.stderr:
        pytest.skip(f"{CXX} does not know -march={arch}")
    assert res.returncode == 0, f"compiling the CPU loops failed:\n{res.stderr[-3000:]}"
    text = report.read_text()
    vectorised = {int(m.group(1)) for m in re.finditer(r"loops\.cpp:(\d+):\d+: optimized: loop vectorized", text)}
    first_loop_line = 5 + 3  # the header lines, then per loop: signature, pragma, loop
    missing = [name for i, name in enumerate(_LOOPS) if first_loop_line + 3 * i not in vectorised]
    assert not missing, (f"GCC ({arch}) did not vectorise the CPU kernel's loops for: {', '.join(missing)} "
                         f"(the shared math in csrc/amid_math.h has a branch or select it cannot blend; "
                         f"its report: {text[-2000:]})")
