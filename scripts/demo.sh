#!/usr/bin/env bash
# The main job (README): set up ./.venv and build amid, then distil SmolLM2-135M-Instruct into a
# smaller student on the shipped data, on CPU, offline. Extra arguments go to amid-distill.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
amid-distill --demo --output-dir runs/demo "$@"
