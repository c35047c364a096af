"""The CUDA checks of bench/gpu_check.sh's `sanitize` stage: a clustered case with awkward rows, compared
with the CPU op, on gradient buffers poisoned with NaN; the default (streaming) path on the same rows.

The case: V = 151936 bf16 (AMID_CUDA_PATH=resident on sm_90: clusters of 16 CTAs keeping R2's logarithm terms in
shared memory; with AMID_CUDA_STASH=0, clusters of 8 whose W recomputes; then AMID_CUDA_PATH=stream, the
default: one CTA per row), N = 3 x the clusters of 8 that fit
on the GPU at once (so every CTA handles several rows: the row loop's reuse of shared memory and of the
cluster reduction slots is exercised), rows mixing
  * plain rows (randn * 3),
  * rows with a NaN (teacher or student) or +inf logit: NaN loss / stats / gradient row,
  * ignored rows (row_weight 0): zero loss and gradient, the logits not read,
  * rows with -inf-masked vocabulary entries (the same ~10 % of positions on both sides),
  * and weights other than 0 / 1.
Before each op call a tensor of the gradient's size is filled with NaN and freed, so the caching
allocator hands that memory to the op's gradient (the script checks the pointer): any element the
kernel fails to write stays NaN and the comparison with the CPU op catches it.

  python bench/sanitize_case.py                 # forward (gradient in the forward) + backward, compare: resident
                                                # with the kept terms and with AMID_CUDA_STASH=0, and streaming
  python bench/sanitize_case.py --no-compare    # the kernels only, both paths (under compute-sanitizer)
Exit status 0 when every comparison passes.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import amid  # noqa: F401  (loads the ops)

V = 151936
LOSSES = [("kl", "pr", 0.5, 0.5), ("ab", "rq", 0.5, 0.1)]


def make_case(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, V, generator=g) * 3
    s = torch.randn(n, V, generator=g) * 3
    w = torch.ones(n)
    kinds = []
    for r in range(n):
        k = r % 6
        if k == 1:
            (t if r % 12 == 1 else s)[r, int(torch.randint(V, (1,), generator=g))] = math.nan
            kinds.append("nan")
        elif k == 2:
            w[r] = 0.0
            t[r, :7] = math.nan  # never read: must not leak into the row
            kinds.append("ignored")
        elif k == 3:
            mask = torch.rand(V, generator=g) < 0.1
            t[r, mask] = -math.inf
            s[r, mask] = -math.inf
            kinds.append("masked")
        elif k == 4:
            s[r, int(torch.randint(V, (1,), generator=g))] = math.inf
            kinds.append("posinf")
        else:
            w[r] = 0.25 + float(torch.rand(1, generator=g))
            kinds.append("plain")
    return t.to(dtype), s.to(dtype), w, kinds


def poison(shape, dtype, device) -> int:
    """Fill a block of the gradient's size with NaN and free it; returns its address."""
    buf = torch.full(shape, math.nan, dtype=dtype, device=device)
    ptr = buf.data_ptr()
    del buf
    return ptr


def check(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> bool:
    got, ref = got.float().cpu(), ref.float().cpu()
    same_nan = torch.equal(torch.isnan(got), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    err = (got[fin] - ref[fin]).abs()
    bound = atol + rtol * ref[fin].abs()
    ok = same_nan and bool((err <= bound).all())
    worst = float((err / bound).max()) if err.numel() else 0.0
    print(f"  {name}: {'ok' if ok else 'MISMATCH'} (NaN pattern {'equal' if same_nan else 'DIFFERS'}, "
          f"max err / tolerance {worst:.3f}, NaN entries {int(torch.isnan(got).sum())} vs {int(torch.isnan(ref).sum())})")
    return ok


def check_rows(name: str, got: torch.Tensor, cpu: torch.Tensor, ref: torch.Tensor, kinds, budget: float) -> bool:
    """Each finite row's max |got - ref| over its largest |ref| (rows with a NaN compared by pattern in
    `check`): the worst row against `budget`, the CPU op's (`cpu`) worst beside it, and where the worst is."""
    got, cpu, ref = got.double().cpu(), cpu.double().cpu(), ref.double()
    rows = torch.isfinite(ref).all(-1) & (ref.abs().amax(-1) > 0)
    if not bool(rows.any()):
        print(f"  {name}: no finite nonzero rows")
        return True
    scale = ref[rows].abs().amax(-1, keepdim=True)
    e_got = ((got[rows] - ref[rows]).abs() / scale)
    e_cpu = ((cpu[rows] - ref[rows]).abs() / scale)
    worst = float(e_got.max())
    i, j = divmod(int(e_got.argmax()), ref.shape[1])
    r = int(rows.nonzero()[i])
    ok = worst <= budget
    print(f"  {name}: {'ok' if ok else 'MISMATCH'} (worst row err / its largest element {worst:.3g}, budget "
          f"{budget:g}; the CPU op's {float(e_cpu.max()):.3g}; at row {r} ({kinds[r]}), column {j}: got "
          f"{float(got[r, j]):.6g}, CPU op {float(cpu[r, j]):.6g}, float64 {float(ref[r, j]):.6g}, row's largest "
          f"{float(scale[i]):.4g})")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-compare", action="store_true", help="run the CUDA ops only (for compute-sanitizer)")
    ap.add_argument("--rows", type=int, default=0, help="N (default: 3 x the clusters of 8 that fit at once)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not amid.cuda_kernels_available():
        print("sanitize_case: expected a GPU and amid's CUDA kernels, but got none", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    # Counted as clusters of 8 at two CTAs per SM: with either path (8 or 16 CTAs, 2 or 3 per SM) every
    # cluster gets several rows.
    n = args.rows or 3 * max(1, (2 * sms) // 8)
    dtype = torch.bfloat16
    t, s, w, kinds = make_case(n, dtype)
    print(f"sanitize_case: N = {n} ({sms} SMs), V = {V}, {dtype}; rows: "
          + ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds))))
    td, sd, wd = t.to(dev), s.to(dev), w.to(dev)
    ok = True
    ref, ref64 = {}, {}
    # (path, AMID_CUDA_STASH): the kept terms are the resident kernel's alone.
    runs = [("resident", "1")] + ([] if args.no_compare else [("resident", "0")]) + [("stream", "1")]
    cases = [(loss, run) for loss in LOSSES for run in runs]
    for (div, order, alpha, lam), (path, kept) in cases:
        os.environ["AMID_CUDA_PATH"] = path  # both read by the launcher at each call
        os.environ["AMID_CUDA_STASH"] = kept
        opts = (alpha, lam, div, order, 0.5, 0.5, 1.0, False)
        p = poison((n, V), dtype, dev)
        loss, stats, grad = torch.ops.amid.amid_loss_fwd(sd, td, wd, *opts, True)
        reused = grad.data_ptr() == p
        gl = (torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5).to(loss.dtype)
        p2 = poison((n, V), dtype, dev)
        gb = torch.ops.amid.amid_loss_bwd(gl.to(dev), sd, td, wd, stats, *opts)
        reused2 = gb.data_ptr() == p2
        torch.cuda.synchronize()
        print(f"{div}/{order} alpha={alpha} lam={lam} AMID_CUDA_PATH={path} AMID_CUDA_STASH={kept}: poisoned buffer "
              f"reused by fwd grad: {reused}, bwd grad: {reused2}")
        if args.no_compare:
            continue
        if opts not in ref:  # the CPU op once per loss (both paths compare with it)
            lc_, stc_, gc_ = torch.ops.amid.amid_loss_fwd(s, t, w, *opts, True)
            ref[opts] = (lc_, stc_, gc_, torch.ops.amid.amid_loss_bwd(gl, s, t, w, stc_, *opts))
        lc, stc, gc, gbc = ref[opts]
        ok &= check("loss", loss, lc, 1e-4, 1e-6)
        ok &= check("stats", stats, stc, 1e-4, 1e-5)
        # bf16 gradients element by element against the CPU op: one rounding of a value computed in fp32 on both
        # sides (a 1-ulp split allowed). Reported, not judged: an element formed as the small difference of two
        # terms (alpha-beta) carries the fp32 error of the terms, which differs between the two computations.
        check("grad (fwd) vs CPU op, per element", grad, gc, 2 ** -7, 1e-9)
        check("grad (bwd) vs CPU op, per element", gb, gbc, 2 ** -7, 1e-9)
        # Judged: each row against the CPU op in float64 (the tests' reference), err over the row's largest
        # element (tests/test_cuda.py's 16-bit budget, 4e-3: half a bf16 ulp of it, the rounding of the stored value, plus
        # 1e-4 for the fp32 computation), the CPU op's own bf16
        # output measured the same way beside it.
        if opts not in ref64:
            ref64[opts] = torch.ops.amid.amid_loss_fwd(s.double(), t.double(), w.double(), *opts, True)[2]
        g64 = ref64[opts]
        ok &= check_rows("grad (fwd) vs float64", grad, gc, g64, kinds, 4e-3)
        ok &= check_rows("grad (bwd) vs float64", gb, gbc, g64 * gl.double()[:, None], kinds, 4e-3)
        ign = torch.tensor([k == "ignored" for k in kinds])
        z = bool((grad.cpu()[ign] == 0).all()) and bool((gb.cpu()[ign] == 0).all())
        print(f"  ignored rows: gradient exactly 0: {z}")
        ok &= z
    print("sanitize_case: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
