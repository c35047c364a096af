#!/usr/bin/env bash
# The main job (README): set up ./.venv and build amid, then distil SmolLM2-135M-Instruct into a
# smaller student on the shipped data, on CPU, offline. Extra arguments go to amid-distill.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo runs on the CPU: without a GPU, skip compiling the CUDA kernels (minutes on 2 cores).
if ! nvidia-smi -L >/dev/null 2>&1; then export AMID_DISABLE_CUDA=${AMID_DISABLE_CUDA:-1}; fi
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
amid-distill --demo --output-dir runs/demo "$@"
