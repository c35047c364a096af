#!/usr/bin/env bash
# One-shot GPU verification of amid: build with the CUDA kernels, run the CUDA tests, the clustered
# sanitizer case (poisoned gradient buffers compared with the CPU op; compute-sanitizer racecheck and
# synccheck), the benchmarks, a counter profile of the headline kernel (where the time goes: DRAM
# bandwidth vs the special-function unit vs instruction issue) and a compute-sanitizer memcheck on
# small cases, in that order.
#
#   bash bench/gpu_check.sh all                  # every stage, in order, within $BUDGET seconds
#   bash bench/gpu_check.sh build test           # any subset of: build test sanitize bench profile memcheck
#
# Sized for a short GPU lease (the device tool: 10 min per command, 15 min per session): the whole
# run stops after BUDGET seconds (default 540), each stage has its own cap (CAP_<STAGE>, seconds),
# benchmark rows are written to their CSVs as they are measured, and a stage that runs out of time
# keeps what it measured. Everything lands in $WORK (default /tmp/amid-gpu-check) and is packed into
# $OUT/gpu_check.tgz (plus $OUT/summary.txt), few files, as the device tool wants; without $OUT the
# pack goes to bench/results/. Needs: a CUDA GPU, nvcc, torch (CUDA build), pytest; no network.
# Liger-Kernel is benchmarked when importable; a wheel placed in .whl/ (git-ignored; send it along
# with the tree) is installed first. To fetch it on a machine with PyPI access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
WORK=${WORK:-/tmp/amid-gpu-check}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the card at hand only: a faster build
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
SUMMARY="$WORK/summary.txt"
: > "$SUMMARY"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
want() { for s in "${stages[@]}"; do [ "$s" = all ] || [ "$s" = "$1" ] && return 0; done; return 1; }
say() { echo "[gpu_check $(date +%T) +${SECONDS}s] $*" | tee -a "$SUMMARY"; }
# Seconds a stage may take: its cap, or what is left of the budget if that is less.
cap() { local left=$((BUDGET - SECONDS)); local c=$1; [ "$left" -lt "$c" ] && c=$left; [ "$c" -lt 1 ] && c=1; echo "$c"; }
# run_capped NAME CAP LOG CMD...: run CMD with a time cap, log to $WORK/LOG, record the outcome.
run_capped() {
  local name=$1 c; c=$(cap "$2"); local log="$WORK/$3"; shift 3
  say "$name: start (cap ${c}s)"
  timeout --signal=INT --kill-after=15 "$c" "$@" > "$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && say "$name: STOPPED at its ${c}s cap (partial results kept)" || say "$name: exit $rc"
  return $rc
}
pack() {
  cp bench/results/cuda-* "$WORK"/ 2>/dev/null
  tar czf "$OUT/gpu_check.tgz" -C "$WORK" . && cp "$SUMMARY" "$OUT/summary.txt"
}
trap pack EXIT

say "stages: ${stages[*]}; budget ${BUDGET}s; arch ${TORCH_CUDA_ARCH_LIST}; git $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$SUMMARY"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$SUMMARY"

# Wheels sent along in .whl/ (Liger-Kernel; setuptools >= 77, which pyproject.toml's license field needs).
ls .whl/*.whl > /dev/null 2>&1 && $PY -m pip install -q --no-deps --no-index .whl/*.whl
# This checkout's amid, also for the scripts under bench/ (whether or not the build stage installs it).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# AMID_PREBUILT=1: use amid/_C*.so as it came (built elsewhere against the same torch, sent along to
# save the GPU lease the compile), when it loads with CUDA kernels; else build here.
prebuilt_ok() {
  [ "${AMID_PREBUILT:-0}" = 1 ] && $PY -c "import amid, sys; b = amid.build_info(); print('prebuilt:', b)
sys.exit(0 if b['cuda_kernels'] and b['torch_built_against'] == b['torch_runtime'] else 1)" 2>&1 | tee -a "$SUMMARY"  # pipefail: python's status
}
if want build && prebuilt_ok; then
  say "build: skipped, the prebuilt library loads with CUDA kernels"
elif want build; then
  export AMID_FORCE_CUDA=1 AMID_PTXAS_VERBOSE=1
  # Each CUDA unit's optimizer and ptxas on several threads too (nvcc reads NVCC_APPEND_FLAGS itself): 11 units on
  # 16 cores would otherwise leave most cores idle while the float64 ones finish. (On 2 cores, 2 threads took the
  # float64 alpha-beta unit for sm_90a from 236 s to 134 s; the gauge read the same SASS.)
  export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }--split-compile=${SPLIT_COMPILE:-4}"
  if ! run_capped build "${CAP_BUILD:-300}" build.log $PY -m pip install -v --no-build-isolation --no-deps -e .; then
    tail -40 "$WORK/build.log" | tee -a "$SUMMARY"
    exit 1
  fi
  $PY -c "import amid, json; print(json.dumps(amid.build_info()))" 2>&1 | tee -a "$SUMMARY"
  # Registers, stack and spills per kernel, as ptxas reported them.
  grep -E "ptxas info *: (Compiling|Function properties|Used)|spill" "$WORK/build.log" > "$WORK/ptxas.txt"
  say "ptxas: $(grep -cE '[1-9][0-9]* bytes spill (stores|loads)' "$WORK/ptxas.txt") kernel(s) with spills (see ptxas.txt)"
  # The SASS gauge of the library just built (per-element instructions / MUFU ops, CTAs per SM), to set
  # beside ncu's InstructionStats of the profile stage.
  timeout 120 $PY bench/sass_gauge.py --csv "$WORK/sass_gauge.csv" > "$WORK/sass_gauge.txt" 2>&1
  grep -E "kl/pr +resident|ab/rq +resident" "$WORK/sass_gauge.txt" | cut -c1-200 | tee -a "$SUMMARY"
fi

if want test; then
  # Every CUDA test: tests/test_cuda.py and tests/test_topk_cuda.py (the sparse-teacher kernel) whole, and
  # the CUDA parametrisations of the others.
  # With pytest-xdist (in the H200 image), worker processes: a test that crashes its process (as a CPU op's
  # segfault once did, ending the stage) then costs one worker, which xdist replaces, not the stage.
  # XDIST_WORKERS (default 4), each with OMP_NUM_THREADS = the cores / the workers: the float64 references run on
  # the CPU, and on the H200 machine (16 cores) 8 workers of 16 threads each passed fewer tests per second than 4
  # (session 45, over much the same early tests of test_cuda.py: 457 in 265 s against 397 in 150 s). The smaller
  # files first, test_cuda.py's grid last, so a stage stopped at its
  # cap has run every kind of test. The JUnit XML names every test with its outcome and time. PYTEST_K (default
  # "cuda") narrows the selection, e.g. to the tests an earlier capped run did not reach.
  XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n "${XDIST_WORKERS:-4}")
  THREADS=$(( $(nproc) / ${XDIST_WORKERS:-4} )); [ "$THREADS" -lt 1 ] && THREADS=1
  [ ${#XDIST[@]} -gt 0 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}
  run_capped test "${CAP_TEST:-180}" pytest_cuda.log $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" --maxfail=25 -rfE \
    --durations=15 --junitxml="$WORK/pytest_cuda.xml" \
    tests/test_topk_cuda.py tests/test_amid_loss.py tests/test_compile.py tests/test_registration.py \
    tests/test_fused_linear.py tests/test_cuda.py -k "${PYTEST_K:-cuda}"
  tail -25 "$WORK/pytest_cuda.log" | tee -a "$SUMMARY"
fi

if want sanitize; then
  # bench/sanitize_case.py: V = 151936 bf16 with AMID_CUDA_PATH=resident (clusters of 16 with the kept log terms;
  # the comparison also with AMID_CUDA_STASH=0: clusters of 8) and the default streaming path, N = 3 x the
  # clusters of 8 that fit at once, rows mixing NaN / +inf, ignored and -inf-masked; the gradient buffers are
  # poisoned with NaN before each op call. First the comparison with the CPU op (and float64), then the kernels
  # alone under racecheck (shared and distributed shared memory hazards) and synccheck (barrier misuse),
  # instrumenting amid's kernels only.
  run_capped sanitize_compare "${CAP_SANITIZE:-45}" sanitize_compare.log $PY bench/sanitize_case.py
  tail -14 "$WORK/sanitize_compare.log" | tee -a "$SUMMARY"
  for tool in ${SANITIZE_TOOLS-racecheck synccheck}; do  # SANITIZE_TOOLS="": the comparison alone
    capvar=CAP_${tool^^}
    run_capped "$tool" "${!capvar:-60}" "$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      --kernel-name kns=amid_ $PY bench/sanitize_case.py --no-compare
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|Barrier|Invalid|error" "$WORK/$tool.log" | head -8 | tee -a "$SUMMARY"
  done
fi

if want bench; then
  # CSVs: bench/results/cuda-<gpu>-{amid_loss,fused_linear}.csv, one row written per measurement.
  run_capped bench_amid_loss "${CAP_BENCH_LOSS:-150}" bench_amid_loss.log $PY bench/bench_amid_loss.py --device cuda
  grep -E "^\[cuda\]" "$WORK/bench_amid_loss.log" | tee -a "$SUMMARY"
  run_capped bench_fused_linear "${CAP_BENCH_FUSED:-90}" bench_fused_linear.log \
    $PY bench/bench_fused_linear.py --device cuda
  tail -15 "$WORK/bench_fused_linear.log" | tee -a "$SUMMARY"
  $PY bench/plot.py > /dev/null 2>&1 && cp bench/results/cuda-*.png "$WORK"/ 2>/dev/null
fi

if want profile; then
  # Counters of the headline kernel (8192 x 151936 bf16, kl/pr, alpha = lam = 0.5, gradient in the
  # forward; the default path, streaming). --clock-control none: the card's clocks are left as they are.
  run_capped profile "${CAP_PROFILE:-60}" profile.log ncu --clock-control none -k regex:amid_fwd \
    --launch-skip 2 --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy --section InstructionStats \
    --section WarpStateStats --section SourceCounters --print-details all $PY bench/profile_step.py
  # InstructionStats: executed / issued instructions (compare with bench/sass_gauge.py's per-element
  # counts x N x V); WarpStateStats: what the warps wait on (stall reasons).
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|XU|Registers|Occupancy|Block Size|Cluster|Executed Instructions|Issued Instructions|Issue Slots|Executed Ipc|Warp Cycles Per|Stall" \
    "$WORK/profile.log" | head -45 | tee -a "$SUMMARY"
  # The forward kernel's time (CUDA events, no profiler) on both paths: the default (streaming) kl/pr, ab/rq, kl/jsd at
  # alpha = -1 (GKD's JSD; its and ab/rq's streaming kernels compile for three CTAs per SM since session 53, two before)
  # and alpha = 1; every row on the general (masked-row) R2 / W (AMID_CUDA_BOUNDED=0: what the bounded-row policy
  # saves); the resident kernel (AMID_CUDA_PATH=resident) with its kept terms, with them but without its L2 prefetch of
  # the next row (AMID_CUDA_PREFETCH=0; session 55, not yet timed), and without them
  # (AMID_CUDA_STASH=0: 8-CTA clusters, twice the elements per CTA and row against the per-row reductions); T = 1.7
  # (R1's other form: the raw logits with the scale L / T; the same loop as T = 1's by the SASS gauge since session 50).
  run_capped variants "${CAP_VARIANTS:-105}" variants.log bash -c "
    $PY bench/profile_step.py --calls 10 &&
    $PY bench/profile_step.py --calls 10 --divergence ab --order rq &&
    $PY bench/profile_step.py --calls 10 --order jsd --alpha -1 &&
    $PY bench/profile_step.py --calls 10 --alpha 1 &&
    $PY bench/profile_step.py --calls 10 --temperature 1.7 &&
    AMID_CUDA_BOUNDED=0 $PY bench/profile_step.py --calls 10 &&
    AMID_CUDA_PATH=resident $PY bench/profile_step.py --calls 10 &&
    AMID_CUDA_PATH=resident AMID_CUDA_PREFETCH=0 $PY bench/profile_step.py --calls 10 &&
    AMID_CUDA_PATH=resident AMID_CUDA_STASH=0 $PY bench/profile_step.py --calls 10 &&
    AMID_CUDA_PATH=resident $PY bench/profile_step.py --calls 10 --divergence ab --order rq &&
    AMID_CUDA_PATH=resident AMID_CUDA_STASH=0 $PY bench/profile_step.py --calls 10 --divergence ab --order rq"
  grep -E "^amid_loss_fwd" "$WORK/variants.log" | tee -a "$SUMMARY"
fi
if want memcheck; then
  run_capped memcheck "${CAP_MEMCHECK:-60}" memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
    $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_topk_cuda.py \
    -k "test_small_detach_and_temperature or test_edge_ignored_rows or test_edge_neg_inf or test_edge_logit_scales or test_nan_inf_and_ignored_rows_as_cpu or test_bad_indices_raise_the_cpu_error"
  tail -6 "$WORK/memcheck.log" | tee -a "$SUMMARY"
fi

say "done"
