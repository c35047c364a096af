#!/usr/bin/env bash
# Builds amid's library for the GPU machine here, on the CPU machine, so that bench/gpu_check.sh skips its build
# and the GPU lease goes to the checks: a venv with the GPU image's torch (TORCH, default 2.11.0+cu130: the H200
# image's, see the device tool's KINDS.md), an sm_90a build of this checkout's HEAD in a scratch worktree (about
# 15 minutes on 2 cores), stripped of its debug information (62 -> 53 MB: the device tool carries at most 64 MiB
# with the tree) into .prebuilt/_C.abi3.so (ignored by git, as every .so). Then, with the device tool:
#   run  command: cp .prebuilt/_C.abi3.so amid/ && AMID_PREBUILT=1 bash bench/gpu_check.sh all
#        carry:   [".whl", ".prebuilt"]
# gpu_check.sh uses it only where it loads with CUDA kernels against the same torch; else it builds there.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
VENV=${VENV:-/tmp/amid-prebuild-venv}
SRC=${SRC:-/tmp/amid-prebuild-src}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH" "setuptools>=77,<82" wheel ninja numpy
rm -rf "$SRC"
git worktree prune
git worktree add --detach "$SRC" HEAD > /dev/null
trap 'git worktree remove --force "$SRC" 2>/dev/null || true' EXIT
(cd "$SRC" && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} AMID_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .)
mkdir -p .prebuilt
strip --strip-debug -o .prebuilt/_C.abi3.so "$SRC/amid/_C.abi3.so"
# What gpu_check.sh's AMID_PREBUILT=1 will see there (here without a GPU): CUDA kernels, the torch built against.
cp .prebuilt/_C.abi3.so "$SRC/amid/_C.abi3.so"
(cd "$SRC" && "$VENV/bin/python" -c "import amid, json; print(json.dumps(amid.build_info()))")
echo "prebuild_for_gpu: .prebuilt/_C.abi3.so ($(du -m .prebuilt/_C.abi3.so | cut -f1) MB) from $(git rev-parse --short HEAD)"
