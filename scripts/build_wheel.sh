#!/usr/bin/env bash
# Builds the one bigkernels wheel for every node: dist/bigkernels-<version>-cp310-abi3-linux_x86_64.whl.
#   - abi3: _C uses only Python's limited API (3.10), so one wheel serves CPython 3.10, 3.11, 3.12, ...
#   - LibTorch stable ABI: _C calls torch only through torch/csrc/stable (setup.py's TORCH_TARGET_VERSION),
#     so the wheel loads on every torch from 2.10 on (Requires-Dist: torch>=2.10,<3), CPU or CUDA builds.
#   - CUDA kernels for TORCH_CUDA_ARCH_LIST (default 8.0;8.6;8.9;9.0+PTX: A100, A10/A40/RTX 30xx,
#     L4/L40/RTX 40xx, H100/H200, and PTX for anything newer), built here with nvcc; no GPU needed.
#     They need a CUDA 13 torch at run time (the cu13 libcudart/cuSPARSELt torch ships); on a CPU-only
#     torch the CPU kernels load and the CUDA ones are simply not there.
# Run it in an environment with a CUDA build of torch (>= the version you build with is what the
# headers are; the ABI target is fixed by setup.py) and nvcc, e.g. this repo's .venv:
#   bash scripts/build_wheel.sh                      # all four architectures (slow on a small machine)
#   TORCH_CUDA_ARCH_LIST=9.0 bash scripts/build_wheel.sh
#   BIGKERNELS_BUILD_CUDA=0 bash scripts/build_wheel.sh   # CPU kernels only (CI's quick wheel)
# Env: PYTHON (default python), WHEEL_DIR (default dist), MAX_JOBS (default nproc).
# The build uses its own build directory (build/wheel-<cpu|cuda>), so it never disturbs the in-place
# developer build (python setup.py build_ext --inplace / pip install -e .).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
WHEEL_DIR=${WHEEL_DIR:-dist}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export BIGKERNELS_BUILD_CUDA=${BIGKERNELS_BUILD_CUDA:-1} BIGKERNELS_WHEEL=1  # WHEEL: no build-machine rpath
kind=$([ "$BIGKERNELS_BUILD_CUDA" = 1 ] && echo cuda || echo cpu)
start=$(date +%s)
mkdir -p "$WHEEL_DIR"
# `build --build-base` keeps this build's objects apart; bdist_wheel then packages that build.
"$PY" setup.py -q build --build-base "build/wheel-$kind" bdist_wheel --dist-dir "$WHEEL_DIR" >/dev/null
wheel=$(ls -t "$WHEEL_DIR"/bigkernels-*-cp310-abi3-*.whl | head -1)
echo "built $wheel in $(( $(date +%s) - start )) s (CUDA: $BIGKERNELS_BUILD_CUDA, archs: $TORCH_CUDA_ARCH_LIST)"
