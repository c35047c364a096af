#!/usr/bin/env bash
# One-shot GPU verification of amid: build with the CUDA kernels, run the CUDA tests (and a
# compute-sanitizer memcheck on a small case), run the benchmarks. Results go to $OUT (the device
# tool's output folder) or bench/results/. Meant for a machine with a Hopper GPU, a CUDA toolkit
# and torch already installed (no network needed):
#
#   bash bench/gpu_check.sh all        # build + test + bench (about 10-15 min on an H100)
#   bash bench/gpu_check.sh build test # or any subset, in order: build test memcheck bench
#
# Liger-Kernel is benchmarked when importable; a wheel placed in .whl/ is installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the card at hand only: faster build
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
want() { for s in "${stages[@]}"; do [ "$s" = all ] || [ "$s" = "$1" ] && return 0; done; return 1; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if want build; then
  ls .whl/*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-deps --no-index .whl/*.whl
  AMID_FORCE_CUDA=1 $PY -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  grep -E "amid build" "$OUT/build.log"
  $PY -c "import amid, json; print(json.dumps(amid.build_info()))" | tee "$OUT/build_info.json"
fi
if want test; then
  $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_registration.py tests/test_compile.py \
    tests/test_fused_linear.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
fi
if want memcheck; then
  compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
    -k "test_small_detach_and_temperature or test_edge_ignored_rows or test_edge_neg_inf" 2>&1 \
    | tail -30 > "$OUT/memcheck.log"; echo "memcheck exit: $?" | tee -a "$OUT/memcheck.log"
fi
if want bench; then
  # CSVs land in bench/results/cuda-<gpu>-*.csv (named after the card); copies go to $OUT.
  $PY bench/bench_amid_loss.py --device cuda 2>&1 | tee "$OUT/bench_amid_loss.log" | tail -60
  $PY bench/bench_fused_linear.py --device cuda 2>&1 | tee "$OUT/bench_fused_linear.log" | tail -30
  $PY bench/plot.py
  [ "$OUT" != bench/results ] && cp bench/results/cuda-* "$OUT"/ 2>/dev/null
fi
