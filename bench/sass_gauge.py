"""GPU-free performance gauge of the AMiD CUDA kernels: reads their sm_90a machine code (SASS).

For every kernel variant (fwd / bwd, loss, order, resident / streaming) of one input dtype it reports
registers, spills, static and dynamic shared memory, CTAs per SM on an H100 / H200 (sm_90) for
V = 151936, and the **issued instructions and MUFU (special-function unit) ops per element** of the
hot loops of the passes: `stage` (the resident kernel's copy of the row slice into shared memory),
`R1` (log-sum-exps), `R2` (mixture and row sums) and `W` (the gradient). The kernels are bound by
instruction issue and the MUFU pipe long before memory (docs/performance.md §1.3), so these counts
predict their speed without a GPU.

Where the cubins come from (first that applies):
  --library PATH   a built amid library (amid/_C*.so, build/libamid.so) or a .cubin: the sm_90a
                   cubins embedded in it are extracted with `cuobjdump -xelf`;
  --compile        nvcc compiles csrc/cuda/amid_loss_<dtype>_{kl,ab}.cu for sm_90a here, the two side by side
                   (on 2 cores: bf16 ~2.5 min to compile, float64 ~4 min; reading float64's SASS adds minutes);
  (neither)        the installed amid library if it holds CUDA kernels, else --compile.
Tools: cuobjdump and nvdisasm from $CUDA_HOME/bin, PATH, or the triton wheel beside torch.

Method (what is counted, and how)
---------------------------------
1. `nvdisasm -c -gi` disassembles each kernel with line info including the inline chain: every
   instruction carries its frames (innermost source line ... the kernel's own line). The kernel
   sources tag the calls that run each pass with a trailing `// gauge:<pass>` comment
   (csrc/cuda/amid_loss_kernels.cuh); an instruction belongs to the pass whose tagged line is its
   outermost frame. Keep the tags on those lines when the kernels change.
2. Basic blocks are split at branch targets and after BRA / EXIT / RET / CALL. A **loop** is a
   backward branch (source address >= target address); its body is the address range
   [target, branch]. The **hot loop** of a pass is its innermost loop that holds 128-bit loads of
   the logits (LDG.E.128 / LDS.128 / LD.E.128): the vectorised chunk loop of `visit_row`, which
   handles all but the <= 15 head / tail elements of a row slice. Scalar head / tail loops are not
   hot. If a pass has several such loops (a compiler-unrolled copy and its remainder), the one
   with the most elements per iteration is reported.
3. **Elements per iteration** = (number of 128-bit logit loads in the loop / 2) x (16 / sizeof(dtype)):
   every chunk reads one 16-byte vector of the teacher row and one of the student row, so a loop
   that the compiler unrolled u times holds 2u such loads. Logit loads are those whose inline chain
   holds visit_row's load line (cuda/utils.cuh); the 128-bit loads of the kept terms
   (W from R2's terms) are not, wherever the compiler attributes them. A loop that writes the gradient
   (every W) counts its 16-byte gradient stores instead, one per chunk: the line table may give a kept-term
   load the logit loads' line (nvcc 13.0, f16 kl/rp's resident W at 1150d80: four such loads for a chunk of
   eight), or the logit loads the lines that use them (a W whose logit vectors hold kept values).
4. **Cold regions** are excluded: (a) blocks outside the loop's address range (out-of-line slow
   paths the compiler moved away); (b) blocks that CALL a subroutine (the slow paths of IEEE
   division, sqrt and friends); (c) blocks whose instructions come mostly from source regions that
   run only when a row's running maximum grows (O(log n) times per row for random data, never in
   steady state), listed in COLD_REGIONS below by file and code anchor. A region that cannot be found
   any more is reported as a warning (then its code counts as hot).
5. The per-iteration count is the **longest path** (most instructions) from the loop header to the
   backward branch through the remaining blocks, the back edge removed (the body is then acyclic).
   Every instruction on it counts once (predicated-off instructions still issue; NOPs are not
   counted). Data-dependent branches that are not cold (masked elements, a runtime switch on a
   parameter) therefore count their more expensive side: the numbers are an upper bound on the
   steady-state issue count of one iteration, exact when the loop body has no such branch. If every
   path crosses a cold block (the compiler merged or predicated cold code into the path: it issues),
   the cold blocks that the loop can go around stay excluded and the others count (a warning says so).
   MUFU ops are the MUFU.* instructions on the same path.
6. Per element = per iteration / elements per iteration. "all passes" = R1 + R2 + W of the forward
   kernel (the forward computes the gradient: the product's fused step), the stage copy excluded.
7. The forward kernel holds R2 and W twice (amid_loss_kernels.cuh: BoundedRow): for rows whose logits are
   all finite with |x / T| < 2^100 (R1 checks; nearly every row), without the guards for -inf masks and
   overflow, tagged R2 / W / Ws; and for the other rows, tagged R2m / Wm / Wsm. "all passes" and the
   targets count the first; the "general" columns (R1 + R2m + Wm) the second.
8. The float power-mean kernels hold the bounded rows' R2 twice more (amid_math.h: WideWeights): where the
   mixture's weight on the side that is not the loss's reference is >= 0.32 (both weights for jsd; lam = 0.5 in
   every order, 0.1 in pr and rp), R2 needs no log1p series and takes the logarithm of a sum <= 1 (one MUFU.LG2
   without the mantissa split): tagged R2, as in 7; for other lam, tagged R2n,
   reported in the "narrow" columns (R1 + R2n + W). So do the W passes that recompute the mixture (the jsd
   kernels', the streaming path's and the backward kernel's): W, and Wn for other lam.
9. In the float power-mean kernels (bf16, fp16, float32), bounded rows take the power mean's near-gap policy
   (amid_math.h: NearGaps, near_gaps) where R1's extremes show that no element has |k (lp - lq)| > 79 (every row of
   an ordinary distillation at |k| <= 1): the R2 of step 8 and the W from R2's kept terms without the far-gap form,
   tagged R2 / Ws, and (kernels that keep no terms: the streaming path's, the jsd kernels') the W of step 8
   recomputing the mixture without it, tagged W. The other bounded rows run them with it, tagged R2f / Wsf / Wf,
   reported in the "far" columns (R1 + R2f + Wsf or Wf, each pass in its near form where it has no other).
10. At alpha = 0.5 (1 / k = 4, the library's default alpha; a runtime choice per launch) the streaming kl/pr and kl/qr
   kernels' near rows take a third W (amid_math.h: grad_from_logits_pow2, p, q and r from one exponential and
   squarings), tagged Wi and reported in the "alpha = 1/2" columns (R1 + R2 + Wi) with their own target check; W and
   "all passes" stay those of any other alpha. At alpha = -1 (k = 1: the arithmetic mixture, DistiLLM's skew KLs)
   they take the same W at N = 1 (no squaring), tagged Wa and reported in the "alpha = -1" columns (R1 + R2 + Wa).
11. R1 runs in two forms (a runtime choice per launch): at temperature T = 1 (the default) on the widened logits,
   tagged R1 and counted everywhere above; at any other T on the raw logits with the scale L / T (amid_online.h:
   OnlineLSE::raise, kRaw), tagged R1t (CSV columns R1t_*; add R1t - R1 per element to a total for T != 1; the same
   loop since session 50, where it scaled each logit by 1 / T first).

12. Per-row code that only thread 0 runs (the CSV's row_once_* columns; not in any total): the forward kernels of
   amid_loss_kernels.cuh's kRowOnce form a row's constants in thread 0 alone after a reduction and hand them to the
   CTA (utils.cuh: cluster_reduce_groups' finish), where the other kernels' threads each form them. In the SASS such a
   block is a conditional forward branch over it whose target is followed within four instructions by BAR.SYNC, the
   block ending in stores to shared memory (STS among its last eight instructions) and holding more than 60
   instructions (the hand-over of a plain state is its stores and their addresses: 24 at most). row_once_blocks
   counts them; row_once_instr sums their longest paths (their inner branches form a DAG): R1's constants and R2's
   closing formulas after each of its two reductions (FixedShift, general), of which a row runs one (a rerun both).
   The other warps of the CTA do not issue that code; the kernels without such blocks form those constants in every
   thread, in code the loop counts leave out.

Static shared memory is ptxas's (cuobjdump -res-usage's SHARED minus the 1 KiB reservation it includes).
Occupancy follows cuda_occupancy.h for sm_90 (65536 registers per SM in 4 sub-partitions, 256-register
allocation per warp, 64 warps and 32 CTAs per SM, 228 KiB of shared memory per SM with 1 KiB reserved
per CTA, 128-byte granules). The dynamic shared memory of a resident kernel is the launcher's choice
for V = 151936 (the smallest cluster whose row slice fits the budget; constants read from the source).
The resident power-mean kernels of a single order keep R2's term d (or c) per element in shared memory
for W (one fp32 per element beside the slice) where a cluster of at most kMaxCluster fits it; their W
loop is then the one tagged `gauge:Ws` (reported as W), and the loads of those terms do not count as
logit loads in step 3.

Output: a table on stdout, and with --csv a CSV (default bench/results/sass_gauge-sm_90a-<commit>.csv)
whose rows --readme turns into the README's table (between the `sass-gauge` markers).

  python bench/sass_gauge.py                       # installed library, or compile bf16
  python bench/sass_gauge.py --compile --dtype bf16 --csv
  python bench/sass_gauge.py --library build/libamid.so --json
  python bench/sass_gauge.py --readme bench/results/sass_gauge-sm_90a-<commit>.csv
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
KERNELS_CUH = os.path.join(ROOT, "csrc", "cuda", "amid_loss_kernels.cuh")
ARCH = "sm_90a"
V_GAUGE = 151936

# dtype: (mangled template argument, bytes, translation unit suffix)
DTYPES = {
    "bf16": ("N3c108BFloat16E", 2, "bf16"),
    "f16": ("N3c104HalfE", 2, "f16"),
    "f32": ("f", 4, "f32"),
    "f64": ("d", 8, "f64"),
}
DIVERGENCES = {0: "kl", 1: "ab"}
ORDERS = {0: "pr", 1: "qr", 2: "rp", 3: "rq", 4: "jsd"}
PASSES = ("stage", "R1", "R2", "W")
# "Ws": the resident power-mean kernels' W pass from R2's kept terms (RowArgs::stash), reported
# as W where the launcher keeps them at V_GAUGE. "stash": the load of those terms (not a logit load).
# The forward kernel runs R2 and W in two forms, chosen per row after R1: rows whose logits are all finite
# and below 2^100 in magnitude (bounded: nearly every row) take the tags above; the others ("m": -inf
# masks or huge logits) the tags R2m, Wm and Wsm, reported in the "general" columns.
GENERAL = ("R2m", "Wm")
# "R3": the exact pass, which the forward kernel runs only for the rare rows whose closing formulas would
# lose too much (amid_online.h: cond_of, ExactAcc); its own columns, not in "all passes".
EXACT = "R3"
# "R2n", "Wn": the bounded rows' R2 and (recomputing) W of the float power-mean kernels under narrow weights
# (method, step 8).
NARROW = ("R2n", "Wn")
# "R2f", "Wsf", "Wf": the bounded rows' R2 and W (from the kept terms; recomputing the mixture) where a logit gap may
# be far (method, step 9).
FAR = ("R2f", "Wsf", "Wf")
# "Ws3": the W of the 16-bit alpha-beta qr / rq resident kernels from the three values their R2 keeps (RowArgs::stash
# 2: d and q^g beside the slice, q in place of the logits; amid_math.h: ab_grad_from_kept3), reported as W where the
# launcher keeps them at V_GAUGE.
KEPT3 = ("Ws3",)
# "Wi": the streaming kl kernels' W of a near row at alpha = 0.5 (1 / k = 4, the library's default; amid_math.h:
# grad_from_logits_pow2: p, q, r from one exponential and squarings), reported in the "alpha = 1/2" columns
# (R1 + R2 + Wi); W stays the general alpha's. "Wa": the same W at alpha = -1 (k = 1, the arithmetic mixture), in the
# "alpha = -1" columns (R1 + R2 + Wa).
POW2 = ("Wi", "Wa")
# "R1t": R1 at a temperature other than 1 (the raw logits with the scale L / T; "R1" is T = 1's, the default), in the CSV.
R1T = ("R1t",)
TAGS = PASSES + ("Ws",) + GENERAL + ("Wsm", EXACT) + NARROW + FAR + KEPT3 + POW2 + R1T

# Targets of issue 9 (bf16, sm_90a): (instructions, MUFU) per element over R1 + R2 + W.
TARGETS = {"kl": (130, 11), "ab": (170, 14)}
TARGET_CTAS_KL = 3

# Cold source regions (method, step 4c): (file name, anchors, why). The region is the body (between the
# braces) of the block opened on the first line matching the last anchor, searched from the line
# matching the previous anchors in turn.
COLD_REGIONS = [
    ("amid_online.h", [r"struct OnlineLSE", r"if \(x > m\) \{"], "OnlineLSE::add: a new running max"),
    ("amid_online.h", [r"struct OnlineLSE", r"void raise\(", r"if \(cm > m\) \{"],
     "OnlineLSE::raise: a new running max (at most once per chunk)"),
    ("amid_online.h", [r"struct LseAcc", r"void add_chunk\(", r"if \(\(ct > t\.m\) \| \(cs > s\.m\)\) \{"],
     "LseAcc::add_chunk: a new running max on either side (at most once per chunk)"),
    ("amid_online.h", [r"void rebase\(", r"if \(mx > m\) \{"],
     "RowAcc::rebase: a new running max (rescaling the sums to it)"),
    ("amid_math.h", [r"AMID_HD T power_log\(", r"if \(TINY_LAM && !M::kBounded && P\.lam_tiny\) \{"],
     "mixture: lam or 1 - lam below the normal range of the math type (a parameter: a uniform branch)"),
    ("amid_math.h", [r"void power_finish\(", r"if \(TINY_LAM && !M::kBounded && P\.lam_tiny\) \{"],
     "mixture: the scaled weight for lam < 2^-60 (a parameter: a uniform branch)"),
    ("amid_math.h", [r"void power_mixture_from_d\(", r"if \(P\.lam_tiny\) \{"],
     "W's mixture from d: the dominant non-reference side's term under a tiny lam (a parameter: a uniform branch)"),
]

# sm_90 (H100 / H200) resources, as cuda_occupancy.h models them.
SM90 = dict(regs_per_sm=65536, sub_partitions=4, reg_granule=256, max_warps=64, max_ctas=32,
            smem_per_sm=233472, smem_reserved=1024, smem_granule=128, max_regs_per_thread=255)


# ------------------------------------------------------------------------------------------------
# Tools and cubins

def find_tool(name: str) -> str:
    """cuobjdump / nvdisasm / nvcc: $CUDA_HOME/bin, PATH, then the copies shipped in the triton wheel."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", name))
    w = shutil.which(name)
    if w:
        cands.append(w)
    for p in sys.path:
        cands += sorted(glob.glob(os.path.join(p, "triton", "backends", "nvidia", "bin", name)))
    cands.append(os.path.join("/usr/local/cuda", "bin", name))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"sass_gauge: expected the CUDA tool '{name}' (CUDA_HOME, PATH or the triton wheel), "
                            "but found none")


def run(cmd: Sequence[str], cwd: Optional[str] = None) -> str:
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"sass_gauge: `{' '.join(cmd)}` failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


def extract_cubins(library: str, workdir: str, arch: str = ARCH) -> List[str]:
    """The `arch` cubins embedded in a shared library / fatbin (a .cubin is returned as it is)."""
    if library.endswith(".cubin"):
        return [os.path.abspath(library)]
    cuobjdump = find_tool("cuobjdump")
    listing = run([cuobjdump, "-lelf", os.path.abspath(library)])
    names = [m.group(1) for m in re.finditer(r"ELF file\s+\d+:\s*(\S+)", listing)]
    wanted = sorted({n for n in names if f".{arch}." in n})  # (a name may be listed twice)
    if not wanted:
        return []
    run([cuobjdump, "-xelf", "all", os.path.abspath(library)], cwd=workdir)
    return [os.path.join(workdir, n) for n in wanted if os.path.exists(os.path.join(workdir, n))]


def nvcc_include_flags() -> List[str]:
    import torch.utils.cpp_extension as ce

    inc = [os.path.join(os.path.dirname(ce.__file__), "..", "include"),
           os.path.join(os.path.dirname(ce.__file__), "..", "include", "torch", "csrc", "api", "include")]
    try:  # headers a minimal toolkit lacks (setup.py's _extra_cuda_includes)
        import nvidia

        for base in list(nvidia.__path__):
            inc += sorted(d for d in glob.glob(os.path.join(base, "*", "include"))
                          if os.path.exists(os.path.join(d, "cublas_v2.h")))
    except ImportError:
        pass
    return [f"-I{os.path.abspath(d)}" for d in inc]


def compile_cubins(dtype: str, workdir: str, arch: str = ARCH) -> List[str]:
    """nvcc -cubin of csrc/cuda/amid_loss_<dtype>_<divergence>.cu (kl, ab) with setup.py's flags (and torch's
    defines), the two units side by side.

    Compiled from a snapshot of csrc/ taken now, in a new folder under `workdir`, so the line info (and the
    pass tags read back from it) match the code compiled even when csrc/ is edited meanwhile, and a workdir
    used before never supplies an older snapshot."""
    nvcc = find_tool("nvcc")
    snap = os.path.join(tempfile.mkdtemp(prefix="snapshot-", dir=workdir), "csrc")
    shutil.copytree(os.path.join(ROOT, "csrc"), snap)
    jobs = []
    for div in DIVERGENCES.values():
        tu = os.path.join(snap, "cuda", f"amid_loss_{DTYPES[dtype][2]}_{div}.cu")
        out = os.path.join(workdir, f"amid_loss_{dtype}_{div}.{arch}.cubin")
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++20",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "-DAMID_WITH_CUDA", *nvcc_include_flags(), "-o", out, tu]
        jobs.append((cmd, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for cmd, _, proc in jobs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"sass_gauge: `{' '.join(cmd)}` failed ({proc.returncode}):\n{err[-3000:]}")
    return [out for _, out, _ in jobs]


def installed_library() -> Optional[str]:
    """The installed amid library, if it was built with the CUDA kernels."""
    try:
        import amid

        info = amid.build_info()
    except Exception:  # noqa: BLE001 -- no amid: nothing installed to read
        return None
    return info.get("library") if info.get("cuda_kernels") else None


# ------------------------------------------------------------------------------------------------
# Parsing nvdisasm output

@dataclass
class Ins:
    addr: int
    pred: str
    op: str          # full opcode with modifiers, e.g. LDG.E.128
    text: str
    target: Optional[str]  # branch / call target label
    frames: Tuple[Tuple[str, int], ...]  # (file, line), innermost first

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclass
class Function:
    name: str
    ins: List[Ins] = field(default_factory=list)
    labels: Dict[str, int] = field(default_factory=dict)


_FUNC_RE = re.compile(r"^\.text\.(\S+):\s*$")
_LABEL_RE = re.compile(r"^(\.L_x_\d+|\$\S+):\s*$")
_INS_RE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*$")
_LINE_RE = re.compile(r'//## File "([^"]+)", line (\d+)')
_TARGET_RE = re.compile(r"`\(([^)]+)\)")


def parse_sass(text: str) -> Dict[str, Function]:
    funcs: Dict[str, Function] = {}
    cur: Optional[Function] = None
    group: List[Tuple[str, int]] = []
    frames: Tuple[Tuple[str, int], ...] = ()
    in_group = False
    pending: List[str] = []
    for raw in text.splitlines():
        m = _FUNC_RE.match(raw)
        if m:
            cur = funcs.setdefault(m.group(1), Function(m.group(1)))
            frames, group, in_group, pending = (), [], False, []
            continue
        if cur is None:
            continue
        s = raw.strip()
        if s.startswith("//##"):
            if not in_group:
                group, in_group = [], True
            lm = _LINE_RE.search(s)
            if lm:
                group.append((lm.group(1), int(lm.group(2))))
            continue
        if in_group:
            frames, in_group = tuple(group), False
        lm = _LABEL_RE.match(s)
        if lm:
            pending.append(lm.group(1))  # resolved to the next instruction's address
            continue
        im = _INS_RE.match(raw)
        if not im or s.startswith("."):
            continue
        addr = int(im.group(1), 16)
        body = im.group(2).strip().rstrip(";").strip()
        pred = ""
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        op = body.split(None, 1)[0] if body else ""
        tm = _TARGET_RE.search(body)
        for k in pending:
            cur.labels[k] = addr
        pending = []
        cur.ins.append(Ins(addr, pred, op, body, tm.group(1) if tm else None, frames))
    return funcs


@dataclass
class Block:
    start: int  # index into Function.ins
    end: int    # exclusive
    succ: List[int] = field(default_factory=list)  # indices of successor blocks


def basic_blocks(fn: Function) -> Tuple[List[Block], Dict[int, int]]:
    """Blocks of fn and a map instruction index -> block index."""
    ins = fn.ins
    addr_idx = {x.addr: i for i, x in enumerate(ins)}
    leaders = {0}
    for i, x in enumerate(ins):
        if x.base in ("BRA", "EXIT", "RET", "CALL", "BRX", "JMP", "JMX") and i + 1 < len(ins):
            leaders.add(i + 1)
        if x.base == "BRA" and x.target in fn.labels and fn.labels[x.target] in addr_idx:
            leaders.add(addr_idx[fn.labels[x.target]])
    starts = sorted(leaders)
    blocks = [Block(s, e) for s, e in zip(starts, starts[1:] + [len(ins)])]
    bidx = {}
    for b, blk in enumerate(blocks):
        for i in range(blk.start, blk.end):
            bidx[i] = b
    for b, blk in enumerate(blocks):
        last = ins[blk.end - 1]
        uncond = last.pred in ("", "@PT")
        falls = blk.end < len(ins)
        if last.base == "BRA":
            t = fn.labels.get(last.target or "", None)
            if t is not None and t in addr_idx:
                blk.succ.append(bidx[addr_idx[t]])
            if not uncond and falls:
                blk.succ.append(b + 1)
        elif last.base in ("EXIT", "RET", "BRX", "JMP", "JMX"):
            if not uncond and falls:
                blk.succ.append(b + 1)
        elif falls:
            blk.succ.append(b + 1)
    return blocks, bidx


# ------------------------------------------------------------------------------------------------
# Source tags and cold regions

_line_cache: Dict[str, List[str]] = {}


def source_lines(path: str) -> List[str]:
    """The lines of a source file named in the line info; the checkout's copy when the build path is gone."""
    if path not in _line_cache:
        cand = [path]
        base = os.path.basename(path)
        cand += [os.path.join(ROOT, "csrc", base), os.path.join(ROOT, "csrc", "cuda", base)]
        lines: List[str] = []
        for c in cand:
            if os.path.isfile(c):
                with open(c, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
                break
        _line_cache[path] = lines
    return _line_cache[path]


_TAG_RE = re.compile(r"//\s*gauge:(\w+)")


def pass_of_line(path: str, line: int) -> Optional[str]:
    lines = source_lines(path)
    if 1 <= line <= len(lines):
        m = _TAG_RE.search(lines[line - 1])
        if m and m.group(1) in TAGS:
            return m.group(1)
    return None


def is_stash_line(path: str, line: int) -> bool:
    lines = source_lines(path)
    if 1 <= line <= len(lines):
        m = _TAG_RE.search(lines[line - 1])
        return bool(m and m.group(1) == "stash")
    return False


def block_body_range(lines: List[str], open_line: int) -> Tuple[int, int]:
    """1-based [first, last] lines strictly inside the brace block opened on `open_line`."""
    depth = 0
    for k in range(open_line - 1, len(lines)):
        code = lines[k].split("//", 1)[0]
        for ch in code:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return open_line + 1, k  # k is 0-based index of the closing line -> last body line = k
    return open_line + 1, len(lines)


def cold_ranges(files: Sequence[str], warnings: List[str]) -> Dict[str, List[Tuple[int, int, str]]]:
    """{file path: [(first, last, why)]} for the COLD_REGIONS found in the files of the line info."""
    out: Dict[str, List[Tuple[int, int, str]]] = {}
    for base, anchors, why in COLD_REGIONS:
        paths = [p for p in files if os.path.basename(p) == base]
        if not paths:
            continue  # the kernels do not use that file
        for p in paths:
            lines = source_lines(p)
            pos = 0
            for a in anchors:
                rx = re.compile(a)
                while pos < len(lines) and not rx.search(lines[pos]):
                    pos += 1
            if pos >= len(lines):
                warnings.append(f"cold region not found ({base}: {why}); its code counts as hot")
                continue
            lo, hi = block_body_range(lines, pos + 1)
            out.setdefault(p, []).append((lo, hi, why))
    return out


def is_cold_ins(x: Ins, cold: Dict[str, List[Tuple[int, int, str]]]) -> bool:
    for f, ln in x.frames:
        for lo, hi, _ in cold.get(f, ()):
            if lo <= ln <= hi:
                return True
    return False


# ------------------------------------------------------------------------------------------------
# Hot loops

@dataclass
class LoopCount:
    pass_name: str
    elems_per_iter: int
    instr_per_iter: int
    mufu_per_iter: int
    mufu_kinds: Dict[str, int]
    body_instr: int  # all instructions in the loop's address range (hot + cold), for reference

    @property
    def instr_per_elem(self) -> float:
        return self.instr_per_iter / self.elems_per_iter

    @property
    def mufu_per_elem(self) -> float:
        return self.mufu_per_iter / self.elems_per_iter


# The one source line that loads the logits' 16-byte vectors (cuda/utils.cuh: visit_row).
_LOGIT_LOAD_RE = re.compile(r"const uint4 a = t4\[c\], b = s4\[c\];")


def _is_logit_load_line(path: str, line: int) -> bool:
    lines = source_lines(path)
    return os.path.basename(path) == "utils.cuh" and 1 <= line <= len(lines) and \
        bool(_LOGIT_LOAD_RE.search(lines[line - 1]))


def _is_vec_load(x: Ins) -> bool:
    return x.base in ("LDG", "LDS", "LD") and ".128" in x.op


def _logit_loads(ins: Sequence[Ins]) -> int:
    """The 128-bit loads of the logits among ins: those whose inline chain holds visit_row's load line
    (not the kept terms, which the compiler may attribute to the line that uses them); all
    128-bit loads when none carries that line (older sources, hand-written tests), minus any from a
    `// gauge:stash` line."""
    vec = [x for x in ins if _is_vec_load(x)]
    tagged = [x for x in vec if any(_is_logit_load_line(f, ln) for f, ln in x.frames)]
    if tagged:
        return len(tagged)
    return sum(1 for x in vec if not any(is_stash_line(f, ln) for f, ln in x.frames))


def longest_paths(ins: Sequence[Ins], blocks: List[Block], first: int, last: int,
                  excluded: set = frozenset()) -> Dict[int, Tuple[int, int, Counter]]:
    """Per block b of first..last reached from first: (instructions, MUFU ops, MUFU kinds) along the longest path that
    ends with b, over forward edges only (blocks in address order), the excluded blocks left out; NOPs not counted."""
    best: Dict[int, Tuple[int, int, Counter]] = {}
    for b in range(first, last + 1):
        if b in excluded:
            continue
        seg = [x for x in ins[blocks[b].start:blocks[b].end] if x.base != "NOP"]
        cost, mufu = len(seg), Counter(x.op for x in seg if x.base == "MUFU")
        if b == first:
            prev = (0, 0, Counter())
        else:
            preds = [best[p] for p in best if b in blocks[p].succ and p < b]
            if not preds:
                continue
            prev = max(preds, key=lambda v: (v[0], v[1]))
        best[b] = (prev[0] + cost, prev[1] + sum(mufu.values()), prev[2] + mufu)
    return best


def hot_loops(fn: Function, elem_bytes: int, cold: Dict[str, List[Tuple[int, int, str]]],
              warnings: List[str]) -> Dict[str, LoopCount]:
    ins = fn.ins
    kfiles = Counter(x.frames[-1][0] for x in ins
                     if x.frames and os.path.basename(x.frames[-1][0]) == os.path.basename(KERNELS_CUH))
    kernel_file = kfiles.most_common(1)[0][0] if kfiles else KERNELS_CUH
    blocks, bidx = basic_blocks(fn)
    addr_idx = {x.addr: i for i, x in enumerate(ins)}
    loops = []  # (header index, latch index)
    for i, x in enumerate(ins):
        if x.base == "BRA" and x.target in fn.labels:
            t = fn.labels[x.target]
            if t in addr_idx and addr_idx[t] <= i:
                loops.append((addr_idx[t], i))
    innermost = [(h, l) for (h, l) in loops
                 if not any((h2, l2) != (h, l) and h <= h2 and l2 <= l for (h2, l2) in loops)]
    kw = 16 // elem_bytes
    found: Dict[str, LoopCount] = {}
    for h, l in innermost:
        nvec = _logit_loads(ins[h:l + 1])
        # A loop that writes the gradient stores one 16-byte vector per chunk of kw elements: counted by those stores,
        # which no other value shares (method, step 3); other loops by their logit loads, a pair per chunk.
        nst = sum(1 for x in ins[h:l + 1] if x.base == "STG" and ".128" in x.op)
        if nvec < 2 and nst == 0:
            continue
        outer = Counter(ins[i].frames[-1] for i in range(h, l + 1) if ins[i].frames)
        tags = Counter()
        for (f, ln), c in outer.items():
            # The outermost frame is the kernel's own line; its file name is sometimes wrong in the
            # line table (seen with nvcc 13.0: amid_math.h instead of the kernels' header).
            p = pass_of_line(f, ln) or pass_of_line(kernel_file, ln)
            if p:
                tags[p] += c
        if not tags:
            continue
        pname = tags.most_common(1)[0][0]
        elems = nst * kw if nst else (nvec // 2) * kw
        # Blocks of the loop body, minus cold ones; longest path header -> latch (back edge removed).
        hb, lb = bidx[h], bidx[l]
        def is_call(b: int) -> bool:
            return any(x.base == "CALL" for x in ins[blocks[b].start:blocks[b].end])

        def is_cold(b: int) -> bool:
            body = [x for x in ins[blocks[b].start:blocks[b].end] if x.base != "NOP"]
            return bool(body) and b not in (hb, lb) and 2 * sum(is_cold_ins(x, cold) for x in body) >= len(body)

        def longest(excluded: set) -> Dict[int, Tuple[int, int, Counter]]:
            return longest_paths(ins, blocks, hb, lb, excluded | {b for b in range(hb, lb + 1) if is_call(b)})

        cold_blocks = {b for b in range(hb, lb + 1) if is_cold(b)}
        best = longest(cold_blocks)
        if lb not in best:
            # Some path needs a cold block: the compiler merged or predicated cold code into it (that code
            # issues). Exclude only the cold blocks that the loop can go around, one at a time; count the
            # others (an upper bound, as step 5 says).
            avoidable = {b for b in cold_blocks if lb in longest({b})}
            best = longest(avoidable)
            if lb not in best:
                best = longest(set())
            warnings.append(f"{fn.name[:200]}...: every path through the {pname} loop at {ins[h].addr:#x} "
                            "crosses a mostly-cold block; counted with the cold blocks it cannot go around")
        if lb not in best:
            warnings.append(f"{fn.name[:200]}...: no hot path through the {pname} loop at "
                            f"{ins[h].addr:#x}; skipped")
            continue
        n, m, kinds = best[lb]
        lc = LoopCount(pname, elems, n, m, dict(kinds), l + 1 - h)
        if pname not in found or elems > found[pname].elems_per_iter:
            found[pname] = lc
    return found


def thread0_blocks(fn: Function) -> List[Tuple[int, int]]:
    """(static size, longest path) of each block that only thread 0 runs before a barrier (method, step 12)."""
    ins = fn.ins
    addr_idx = {x.addr: i for i, x in enumerate(ins)}
    blocks, bidx = basic_blocks(fn)
    found = []
    for i, x in enumerate(ins):
        if x.base != "BRA" or not x.pred or x.target not in fn.labels:
            continue
        j = addr_idx.get(fn.labels[x.target])
        if j is None or j <= i + 61:
            continue
        body = [k for k in range(i + 1, j) if ins[k].base != "NOP"]
        if not any(ins[k].base == "BAR" for k in range(j, min(j + 4, len(ins)))) or \
                not any(ins[k].base == "STS" for k in range(max(i + 1, j - 8), j)) or len(body) <= 60:
            continue
        # The code between the branch and its target (j leads a block): a DAG that only j leaves.
        first, end = bidx[i + 1], bidx[j]
        region = range(first, end)
        if any(s < b or s > end for b in region for s in blocks[b].succ) or \
                any(ins[blocks[b].end - 1].base in ("EXIT", "RET", "BRX", "JMP", "JMX") for b in region):
            continue
        best = longest_paths(ins, blocks, first, end - 1)
        ends = [best[p][0] for p in best if end in blocks[p].succ]
        if ends:
            found.append((len(body), max(ends)))
    return found


# ------------------------------------------------------------------------------------------------
# Resources and occupancy

def resource_usage(cubin: str) -> Dict[str, Dict[str, int]]:
    """{mangled name: {REG, SHARED, LOCAL, STACK}} from cuobjdump -res-usage."""
    out = run([find_tool("cuobjdump"), "-res-usage", cubin])
    res: Dict[str, Dict[str, int]] = {}
    name = None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            res[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            name = None
    return res


def source_constants() -> Dict[str, int]:
    """kThreads, kResidentBudget, kMaxCluster from the kernels' header (the launcher's policy)."""
    with open(KERNELS_CUH, encoding="utf-8") as f:
        src = f.read()

    def const(name: str, default: int) -> int:
        m = re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*([^;]+);", src)
        if not m:
            return default
        expr = m.group(1).split("//")[0]
        try:
            return int(eval(expr, {"__builtins__": {}}))  # noqa: S307 -- arithmetic of literals only
        except Exception:  # noqa: BLE001
            return default

    return {"threads": const("kThreads", 256), "budget": const("kResidentBudget", 96 * 1024),
            "max_cluster": const("kMaxCluster", 16)}


def resident_smem(V: int, elem_bytes: int, static_smem: int, consts: Dict[str, int],
                  stash_bytes: int = 0, kept3: bool = False) -> Tuple[int, int, int]:
    """(cluster size, dynamic bytes, stash level) the launcher picks for a resident row of V elements on sm_90
    (amid_loss_kernels.cuh: launch_fwd_mode, resident_bytes, RowArgs::stash): with kept3 (the 16-bit alpha-beta qr / rq
    kernels) first the smallest cluster whose slice and two kept values per element fit the shared memory of two CTAs
    per SM (level 2); with stash_bytes > 0 (the kept logarithm term, bytes per element) the smallest cluster whose
    slice and term fit the budget (level 1); then without them (level 0)."""
    kw = 16 // elem_bytes
    optin = SM90["smem_per_sm"] - SM90["smem_reserved"]  # 227 KiB per CTA
    budget = min(consts["budget"], optin - static_smem)
    two_per_sm = min(optin - static_smem,
                     SM90["smem_per_sm"] // 2 // SM90["smem_granule"] * SM90["smem_granule"] - SM90["smem_reserved"]
                     - static_smem)
    levels = ([2] if kept3 and stash_bytes else []) + ([1] if stash_bytes else []) + [0]
    for level in levels:
        lim = two_per_sm if level == 2 else budget
        c = 1
        while c <= consts["max_cluster"]:
            cap = ((V + c - 1) // c + kw - 1) // kw * kw + kw
            b = (2 * cap * elem_bytes + 31) // 32 * 32 + cap * stash_bytes * level
            if b <= lim:
                return c, b, level
            c *= 2
    return 0, 0, 0


def ctas_per_sm(regs: int, static_smem: int, dyn_smem: int, threads: int) -> Tuple[int, str]:
    """CTAs per sm_90 SM and the limiting resource."""
    warps = (threads + 31) // 32
    per_warp = -(-regs * 32 // SM90["reg_granule"]) * SM90["reg_granule"]
    by_regs = ((SM90["regs_per_sm"] // SM90["sub_partitions"]) // per_warp * SM90["sub_partitions"]) // warps
    by_warps = SM90["max_warps"] // warps
    smem = -(-(static_smem + dyn_smem + SM90["smem_reserved"]) // SM90["smem_granule"]) * SM90["smem_granule"]
    by_smem = SM90["smem_per_sm"] // smem
    lim = {"registers": by_regs, "warps": by_warps, "shared memory": by_smem, "CTAs": SM90["max_ctas"]}
    n = min(lim.values())
    return n, "/".join(k for k, v in lim.items() if v == n)


# ------------------------------------------------------------------------------------------------
# The gauge

# The dtype is a nested name (N3c108BFloat16E) or a builtin type code (f, d).
# Template arguments after the order: fwd <RESIDENT, POWER>, bwd <POWER>; kernels built before the
# mixture split (one kernel for every mode) have no POWER argument.
_KERNEL_RE = re.compile(r"amid_(fwd|bwd)_kernelI(N\w+?E|[a-z])LNS_10DivergenceE(\d)ELNS_5OrderE(\d)"
                        r"(?:ELb([01]))?(?:ELb([01]))?E")


def classify(name: str) -> Optional[Tuple[str, str, str, str, str, str]]:
    """(kind, dtype, divergence, order, path, mixture) of an amid kernel's mangled name. mixture: "power"
    (the power-mean kernels, kPower), "cheap" (lam in {0, 1} or alpha = 1), or "any" (older builds)."""
    m = _KERNEL_RE.search(name)
    if not m:
        return None
    kind, targ, d, o, b1, b2 = m.groups()
    dtype = next((k for k, v in DTYPES.items() if targ == v[0]), None)
    if dtype is None:
        return None
    res, power = (b1, b2) if kind == "fwd" else (None, b1)
    path = "resident" if res == "1" else ("stream" if kind == "fwd" else "-")
    mixture = "any" if power is None else ("power" if power == "1" else "cheap")
    return kind, dtype, DIVERGENCES[int(d)], ORDERS[int(o)], path, mixture


def gauge_cubin(cubin: str, dtypes: Sequence[str], warnings: List[str]) -> List[Dict[str, object]]:
    sass = run([find_tool("nvdisasm"), "-c", "-gi", cubin])
    funcs = parse_sass(sass)
    res = resource_usage(cubin)
    consts = source_constants()
    files = sorted({f for fn in funcs.values() for x in fn.ins for f, _ in x.frames})
    cold = cold_ranges(files, warnings)
    rows = []
    for name, fn in funcs.items():
        cls = classify(name)
        if not cls or cls[1] not in dtypes:
            continue
        kind, dtype, div, order, path, mixture = cls
        eb = DTYPES[dtype][1]
        r = res.get(name, {})
        # cuobjdump's SHARED includes the 1 KiB the driver reserves per CTA (sm_80+: a kernel without
        # __shared__ variables shows 1024; ptxas -v prints the static size without it).
        regs, static = r.get("REG", 0), max(0, r.get("SHARED", 0) - SM90["smem_reserved"])
        spills = sum(1 for x in fn.ins if x.base in ("STL", "LDL"))
        stash_bytes = (8 if dtype == "f64" else 4) if (mixture == "power" and order != "jsd") else 0
        kept3 = eb == 2 and div == "ab" and order in ("qr", "rq")  # (amid_loss_kernels.cuh: kept3_kernel)
        cluster, dyn, stash = (resident_smem(V_GAUGE, eb, static, consts, stash_bytes, kept3) if path == "resident"
                               else (1, 0, 0))
        ctas, limiter = ctas_per_sm(regs, static, dyn, consts["threads"])
        loops = hot_loops(fn, eb, cold, warnings)
        ws, wsm, wsf = loops.pop("Ws", None), loops.pop("Wsm", None), loops.pop("Wsf", None)  # the W at V_GAUGE
        ws3 = loops.pop("Ws3", None)
        if stash == 2 and ws3:
            ws = wsf = ws3  # (every bounded row, near or far: one W)
        if stash and ws:
            loops["W"] = ws
            loops.pop("Wn", None)  # (W from the kept terms has no log, so one form)
        if stash and wsm:
            loops["Wm"] = wsm
        if stash and wsf:
            loops["Wf"] = wsf
        if "W" not in loops and "Wf" in loops:
            # (a resident kernel that can keep R2's terms but does not at V_GAUGE, e.g. float32's: its W recomputes the
            # mixture in the one form it has there, the far-gap one, on every row)
            loops["W"] = loops["Wf"]
        if kind == "fwd" and not loops:
            warnings.append("no pass-tagged hot loop in the forward kernels: is csrc/ the source the cubins "
                            "were built from (the line info must match the `// gauge:` tags)?")
        row: Dict[str, object] = dict(kernel=kind, dtype=dtype, loss=f"{div}/{order}", path=path, mixture=mixture,
                                      registers=regs,
                                      spill_instructions=spills, local_bytes=r.get("LOCAL", 0),
                                      static_smem=static, dyn_smem=dyn, cluster=cluster, stash=stash,
                                      ctas_per_sm=ctas,
                                      cta_limit=limiter)
        tot_i = tot_m = 0.0
        for p in PASSES:
            lc = loops.get(p)
            row[f"{p}_elems_per_iter"] = lc.elems_per_iter if lc else ""
            row[f"{p}_instr_per_elem"] = round(lc.instr_per_elem, 2) if lc else ""
            row[f"{p}_mufu_per_elem"] = round(lc.mufu_per_elem, 3) if lc else ""
            row[f"{p}_mufu_kinds"] = " ".join(f"{k}:{v}" for k, v in sorted(lc.mufu_kinds.items())) if lc else ""
            if lc and p != "stage":
                tot_i += lc.instr_per_elem
                tot_m += lc.mufu_per_elem
        row["all_instr_per_elem"] = round(tot_i, 2)
        row["all_mufu_per_elem"] = round(tot_m, 3)
        # Rows with -inf masks or huge logits: R1 + R2m + Wm (forward kernels; "" where there is no such form).
        gen = [loops.get("R1")] + [loops.get(p) for p in GENERAL]
        for p, lc in zip(GENERAL, gen[1:]):
            row[f"{p}_instr_per_elem"] = round(lc.instr_per_elem, 2) if lc else ""
            row[f"{p}_mufu_per_elem"] = round(lc.mufu_per_elem, 3) if lc else ""
        ok = all(gen)
        row["general_instr_per_elem"] = round(sum(lc.instr_per_elem for lc in gen), 2) if ok else ""
        row["general_mufu_per_elem"] = round(sum(lc.mufu_per_elem for lc in gen), 3) if ok else ""
        # Bounded rows under narrow weights (float power means): R1 + R2n + Wn, each pass in its wide form where it
        # has no other ("" where no pass has a narrow form).
        for p in NARROW:
            lc = loops.get(p)
            row[f"{p}_instr_per_elem"] = round(lc.instr_per_elem, 2) if lc else ""
            row[f"{p}_mufu_per_elem"] = round(lc.mufu_per_elem, 3) if lc else ""
        nar = [loops.get(p + "n", loops.get(p)) for p in ("R1", "R2", "W") if p in loops]
        ok = any(p in loops for p in NARROW)
        row["narrow_instr_per_elem"] = round(sum(lc.instr_per_elem for lc in nar), 2) if ok else ""
        row["narrow_mufu_per_elem"] = round(sum(lc.mufu_per_elem for lc in nar), 3) if ok else ""
        # Bounded rows with a far logit gap: R1 + R2f + Wsf, each pass in its near form where it has no other.
        for p, lc in (("R2f", loops.get("R2f")), ("Wsf", loops.get("Wf"))):
            row[f"{p}_instr_per_elem"] = round(lc.instr_per_elem, 2) if lc else ""
            row[f"{p}_mufu_per_elem"] = round(lc.mufu_per_elem, 3) if lc else ""
        far = [loops.get(p + "f", loops.get(p)) for p in ("R1", "R2", "W") if p in loops]
        ok = "R2f" in loops or "Wf" in loops
        row["far_instr_per_elem"] = round(sum(lc.instr_per_elem for lc in far), 2) if ok else ""
        row["far_mufu_per_elem"] = round(sum(lc.mufu_per_elem for lc in far), 3) if ok else ""
        # alpha = 1/2 (the library's default alpha; 1 / k = 4): R1 + R2 + Wi where the kernel has that W (streaming kl/pr,
        # kl/qr), "" elsewhere.
        lc = loops.get("Wi")
        row["Wi_instr_per_elem"] = round(lc.instr_per_elem, 2) if lc else ""
        row["Wi_mufu_per_elem"] = round(lc.mufu_per_elem, 3) if lc else ""
        half = [loops.get("R1"), loops.get("R2"), lc]
        ok = all(half)
        half_i = sum(x.instr_per_elem for x in half) if ok else 0.0
        half_m = sum(x.mufu_per_elem for x in half) if ok else 0.0
        row["alpha_half_instr_per_elem"] = round(half_i, 2) if ok else ""
        row["alpha_half_mufu_per_elem"] = round(half_m, 3) if ok else ""
        # alpha = -1 (k = 1, the arithmetic mixture): R1 + R2 + Wa, the same kernels
        lc = loops.get("Wa")
        row["Wa_instr_per_elem"] = round(lc.instr_per_elem, 2) if lc else ""
        row["Wa_mufu_per_elem"] = round(lc.mufu_per_elem, 3) if lc else ""
        arith = [loops.get("R1"), loops.get("R2"), lc]
        ok = all(arith)
        row["alpha_m1_instr_per_elem"] = round(sum(x.instr_per_elem for x in arith), 2) if ok else ""
        row["alpha_m1_mufu_per_elem"] = round(sum(x.mufu_per_elem for x in arith), 3) if ok else ""
        lc = loops.get(EXACT)
        row[f"{EXACT}_instr_per_elem"] = round(lc.instr_per_elem, 2) if lc else ""
        row[f"{EXACT}_mufu_per_elem"] = round(lc.mufu_per_elem, 3) if lc else ""
        # R1 at T != 1 (the logits scaled by 1 / T; the R1 columns are T = 1's, the default), for the CSV
        lc = loops.get("R1t")
        row["R1t_instr_per_elem"] = round(lc.instr_per_elem, 2) if lc else ""
        row["R1t_mufu_per_elem"] = round(lc.mufu_per_elem, 3) if lc else ""
        def target_text(instr: float, mufu: float) -> str:  # issue 9's targets, met or not, for these totals
            ti, tm = TARGETS[div]
            met = [instr <= ti, mufu <= tm, spills == 0] + ([ctas >= TARGET_CTAS_KL] if div == "kl" else [])
            return (f"instr<={ti}:{'met' if met[0] else 'UNMET'} mufu<={tm}:{'met' if met[1] else 'UNMET'} "
                    f"spills=0:{'met' if met[2] else 'UNMET'}"
                    + (f" ctas>={TARGET_CTAS_KL}:{'met' if met[3] else 'UNMET'}" if div == "kl" else ""))
        # Both forward paths: the resident kernel the targets were set for, and the streaming one, the launcher's
        # default since an H200 measured it faster (amid_loss_kernels.cuh, launch_fwd_mode).
        if kind == "fwd" and path in ("resident", "stream") and dtype == "bf16" and mixture != "cheap" and \
                f"{div}/{order}" in ("kl/pr", "ab/rq"):
            missing = [p for p in ("R1", "R2", "W") if p not in loops]
            row["target"] = (f"unknown (no hot loop found for {','.join(missing)})" if missing
                             else target_text(tot_i, tot_m))
        else:
            row["target"] = ""
        row["target_alpha_half"] = (target_text(half_i, half_m)
                                    if row["target"] and row["alpha_half_instr_per_elem"] != "" else "")
        once = thread0_blocks(fn) if kind == "fwd" else []
        row["row_once_blocks"] = len(once) if kind == "fwd" else ""
        row["row_once_instr"] = sum(n for _, n in once) if kind == "fwd" else ""
        rows.append(row)
    order_key = {"fwd": 0, "bwd": 1}
    mix_key = {"power": 0, "any": 0, "cheap": 1}
    rows.sort(key=lambda r: (r["dtype"], mix_key[r["mixture"]], order_key[r["kernel"]], r["loss"], r["path"]))
    return rows


def git_commit() -> str:
    try:
        sha = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).strip()
        dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", "csrc"]).strip()
        return sha + ("-dirty" if dirty else "")
    except (RuntimeError, OSError):
        return "unknown"


def tool_version() -> str:
    try:
        out = run([find_tool("nvdisasm"), "--version"])
        m = re.search(r"release ([\d.]+)", out)
        return m.group(1) if m else "?"
    except (RuntimeError, FileNotFoundError):
        return "?"


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    hdr = ["kernel", "dtype", "loss", "path", "mix", "regs", "spill", "smem", "dyn", "C", "CTA/SM", "R1 i/m", "R2 i/m",
           "W i/m", "all i/m", "narrow i/m", "far i/m", "general i/m", "stage i", "target", "alpha=1/2 i/m", "target alpha=1/2", "alpha=-1 i/m"]
    out = [hdr]
    for r in rows:
        def im(p: str) -> str:
            i = r[f"{p}_instr_per_elem"]
            return "-" if i == "" else f"{float(i):.1f}/{float(r[f'{p}_mufu_per_elem']):.2f}"
        st = r["stage_instr_per_elem"]
        out.append([r["kernel"], r["dtype"], r["loss"], r["path"], str(r["mixture"]), str(r["registers"]), str(r["spill_instructions"]),
                    str(r["static_smem"]), str(r["dyn_smem"]), str(r["cluster"]), f"{r['ctas_per_sm']} ({r['cta_limit']})",
                    im("R1"), im("R2"), im("W"), f"{float(r['all_instr_per_elem']):.1f}/{float(r['all_mufu_per_elem']):.2f}",
                    "-" if r.get("narrow_instr_per_elem", "") == "" else
                    f"{float(r['narrow_instr_per_elem']):.1f}/{float(r['narrow_mufu_per_elem']):.2f}",
                    "-" if r.get("far_instr_per_elem", "") == "" else
                    f"{float(r['far_instr_per_elem']):.1f}/{float(r['far_mufu_per_elem']):.2f}",
                    "-" if r.get("general_instr_per_elem", "") == "" else
                    f"{float(r['general_instr_per_elem']):.1f}/{float(r['general_mufu_per_elem']):.2f}",
                    "-" if st == "" else f"{float(st):.1f}", str(r["target"]),
                    "-" if r.get("alpha_half_instr_per_elem", "") == "" else
                    f"{float(r['alpha_half_instr_per_elem']):.1f}/{float(r['alpha_half_mufu_per_elem']):.2f}",
                    str(r.get("target_alpha_half", "")),
                    "-" if r.get("alpha_m1_instr_per_elem", "") == "" else
                    f"{float(r['alpha_m1_instr_per_elem']):.1f}/{float(r['alpha_m1_mufu_per_elem']):.2f}"])
    w = [max(len(row[i]) for row in out) for i in range(len(hdr))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in out)


README_BEGIN = "<!-- sass-gauge:begin -->"
README_END = "<!-- sass-gauge:end -->"


def readme_table(csv_path: str) -> str:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"sass_gauge: expected rows in {csv_path}, but got an empty file")
    r0 = rows[0]
    lines = [f"SASS gauge of the {r0['arch']} kernels (`{os.path.basename(csv_path)}`: commit {r0['commit']}, "
             f"nvdisasm {r0['tools']}, source {r0['source']}). Per element: issued instructions / MUFU ops in the hot "
             f"loop of each pass (method: `bench/sass_gauge.py`); CTAs per SM on sm_90 at V = {V_GAUGE}. "
             "The power-mean kernels (the mixture of 0 < λ < 1, α ≠ 1): the forward kernel's resident path "
             "(`AMID_CUDA_PATH=resident`) and, for kl/pr and ab/rq, its streaming path (the default since session 45: "
             "faster on an H200; W recomputes the mixture); the other streaming variants and the "
             "cheap-mode kernels (λ ∈ {0, 1} or α = 1: no special function in the mixture) in the CSV. "
             "R2 and W are those of rows whose logits are all finite and below 2^100 in magnitude (nearly every "
             "row), at λ = 0.5 (every order; in pr and rp any λ ≤ 0.68, in qr and rq any λ ≥ 0.32: the weight "
             "on the side that is not the reference is at least 0.32, and R2's power mean needs no log1p series); "
             "\"other λ\" is R1 + R2 + W of those rows at the other λ; \"far gaps\" of those rows where a logit gap "
             "may exceed 79 / |k| nats (R1's extremes; at |k| <= 1 a row with a gap of 79 nats or more), which keep "
             "the power mean's far-gap form. Rows with −inf masks or huge logits run R2 "
             "and W with their guards (R1 + R2 + W, \"masked / huge rows\"). \"α = ½\": at α = 0.5 (the library's default; "
             "1 / k = 4) the streaming kl/pr and kl/qr kernels' near rows take another W (p, q and r from one exponential "
             "and squarings), R1 + R2 + that W, and at α = −1 (k = 1, the arithmetic mixture: DistiLLM's skew KLs) "
             "the same W without the squarings, in parentheses; the other columns are those of any α. R1 is that of "
             "temperature 1 (the "
             "default; at other T, the CSV's R1t, the same count since session 50). R3 is "
             "the exact pass, which a row runs in addition only where its closing formulas would lose too much (see the "
             "accuracy notes).",
             "",
             "| kernel | loss | path | regs | spills | smem static + dyn (cluster) | CTAs/SM | R1 | R2 | W | R1+R2+W | target "
             "| α = ½: R1+R2+W, target | other λ | far gaps | masked / huge rows | R3 (rare rows) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["dtype"] != "bf16" or r.get("mixture", "any") == "cheap" or \
                (r["path"] == "stream" and r["loss"] not in ("kl/pr", "ab/rq")):  # in the CSV
            continue

        def im(p: str) -> str:
            return "–" if r[f"{p}_instr_per_elem"] == "" else \
                f"{float(r[f'{p}_instr_per_elem']):.0f} / {float(r[f'{p}_mufu_per_elem']):.1f}"
        def half(r) -> str:  # (CSVs before the alpha = 1/2 W have no such columns)
            i = r.get("alpha_half_instr_per_elem", "")
            if not i:
                return "–"
            tgt = r.get("target_alpha_half", "").replace("UNMET", "**unmet**")
            m1 = r.get("alpha_m1_instr_per_elem", "")  # (CSVs before session 52 have no alpha = -1 columns)
            m1 = f" (α = −1: {float(m1):.0f} / {float(r['alpha_m1_mufu_per_elem']):.1f})" if m1 else ""
            return f"{float(i):.0f} / {float(r['alpha_half_mufu_per_elem']):.1f}" + m1 + (f": {tgt}" if tgt else "")
        def total(r, name: str) -> str:
            i = r.get(f"{name}_instr_per_elem", "")
            return "–" if i == "" else f"{float(i):.0f} / {float(r[f'{name}_mufu_per_elem']):.1f}"
        kept = {"1": " + terms", "2": " + 3 terms"}.get(str(r.get("stash")), "")
        smem = (f"{r['static_smem']} + {r['dyn_smem']} ({r['cluster']}{kept})" if r["path"] == "resident"
                else r["static_smem"])
        lines.append(f"| {r['kernel']} | {r['loss']} | {r['path']} | {r['registers']} | {r['spill_instructions']} | "
                     f"{smem} | {r['ctas_per_sm']} | {im('R1')} | {im('R2')} | {im('W')} | "
                     f"{float(r['all_instr_per_elem']):.0f} / {float(r['all_mufu_per_elem']):.1f} | "
                     f"{r['target'].replace('UNMET', '**unmet**') or ''} | {half(r)} | "
                     f"{total(r, 'narrow')} | {total(r, 'far')} | {total(r, 'general')} | "
                     f"{im(EXACT) if f'{EXACT}_instr_per_elem' in r else '–'} |")
    return "\n".join(lines)


def update_readme(csv_path: str, readme: str) -> None:
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"sass_gauge: expected the markers {README_BEGIN} ... {README_END} in {readme}, "
                         "but found none")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(readme, "w", encoding="utf-8") as f:
        f.write(head + README_BEGIN + "\n" + readme_table(csv_path) + "\n" + README_END + tail)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", help="built amid library (.so) or a .cubin to read")
    ap.add_argument("--compile", action="store_true", help="compile the kernels with nvcc (sm_90a)")
    ap.add_argument("--dtype", default="bf16", help="comma-separated dtypes: bf16,f16,f32,f64 (default bf16)")
    ap.add_argument("--csv", nargs="?", const="", default=None,
                    help="write a CSV (default bench/results/sass_gauge-sm_90a-<commit>.csv)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    ap.add_argument("--readme", metavar="CSV", help="rewrite the README table from CSV and exit")
    ap.add_argument("--commit", help="the commit the cubins were built from (default: this checkout's HEAD, "
                    "'-dirty' when csrc/ has uncommitted changes)")
    args = ap.parse_args(argv)

    if args.readme:
        update_readme(args.readme, os.path.join(ROOT, "README.md"))
        print(readme_table(args.readme))
        return 0
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"expected --dtype among {','.join(DTYPES)}, but got {','.join(bad)}")
    warnings: List[str] = []
    with tempfile.TemporaryDirectory(prefix="amid-sass-") as tmp:
        lib = args.library or (None if args.compile else installed_library())
        if lib:
            cubins = extract_cubins(lib, tmp)
            source = f"{'cubin' if lib.endswith('.cubin') else 'library'} {os.path.basename(lib)}"
            if not cubins:
                print(f"sass_gauge: expected {ARCH} cubins in {lib}, but found none "
                      "(build with TORCH_CUDA_ARCH_LIST containing 9.0a)", file=sys.stderr)
                return 2
        else:
            cubins, source = [c for d in dtypes for c in compile_cubins(d, tmp)], "nvcc -cubin"
        rows = []
        for c in cubins:
            rows += gauge_cubin(c, dtypes, warnings)
    if not rows:
        print(f"sass_gauge: expected amid kernels for {','.join(dtypes)} in the cubins, but found none",
              file=sys.stderr)
        return 2
    commit, tools = args.commit or git_commit(), tool_version()
    for r in rows:
        r.update(arch=ARCH, commit=commit, source=source, tools=tools)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
    for w in sorted(set(warnings)):
        print(f"sass_gauge: warning: {w}", file=sys.stderr)
    if args.csv is not None:
        path = args.csv or os.path.join(RESULTS_DIR, f"sass_gauge-{ARCH}-{commit}.csv")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        keys = ["arch", "commit", "source", "tools"] + [k for k in rows[0] if k not in ("arch", "commit", "source",
                                                                                      "tools")]
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(rows)
        print(f"sass_gauge: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
