#!/usr/bin/env bash
# The test command (README, .ci/run): set up ./.venv and build amid, run the C++ tests (CMake +
# ctest, CPU build) and the Python suite. CUDA tests are skipped without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torch.compile's on-disk cache inside this checkout: a cache left by another version of amid (whose fake
# kernels had other output shapes) would otherwise be reused and fail the compile tests.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/build/inductor-cache}"
mkdir -p build
cmake -S . -B build/cmake -DAMID_CUDA=OFF -DAMID_BUILD_TESTS=ON -G Ninja > build/cmake.log 2>&1 \
  || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j "$(nproc)"
ctest --test-dir build/cmake --output-on-failure
python -m pytest -q "$@"
