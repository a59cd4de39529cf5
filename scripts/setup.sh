#!/usr/bin/env bash
# Sets up a virtual environment in .venv with torch, triton and the test tools, and builds
# bigkernels into it (editable). Sourced by scripts/main.sh and scripts/test.sh.
#   TORCH_SPEC            torch requirement (default torch==2.14.1: a CUDA build, so nvcc can compile the kernels)
#   BIGKERNELS_BUILD_CUDA 0/1 forces the CUDA kernels off/on (default: on when torch has CUDA and nvcc exists)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default 8.0;9.0+PTX)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel ninja
python -m pip install -q "${TORCH_SPEC:-torch==2.14.1}" "triton; platform_system == 'Linux'" numpy pytest hypothesis expecttest safetensors "transformers>=4.45" tqdm matplotlib
# torch guesses CUDA_HOME from the nvcc on PATH; point it at the real toolkit when it is there.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} python -m pip install -q --no-build-isolation -e ".[test]"
python -c "import bigkernels, sys; i = bigkernels.info(); sys.exit(0 if i['extension_loaded'] else 'bigkernels._C did not load: ' + str(i['extension_error']))"
