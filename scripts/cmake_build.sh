#!/usr/bin/env bash
# Builds csrc/ with CMake against the libtorch inside the active Python's torch, and runs the C++
# test. Usage: scripts/cmake_build.sh [BUILD_DIR] (default build-cmake). Extra CMake options via
# CMAKE_ARGS, e.g. CMAKE_ARGS="-DBIGKERNELS_CUDA=ON".
# A CUDA build of torch wants to find the CUDA runtime and NVRTC even for CPU-only code: they come
# from CUDA_HOME (default /usr/local/cuda) and the nvidia-* wheels torch installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD=${1:-build-cmake}
PREFIX=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DBIGKERNELS_BUILD_TESTS=ON -DCMAKE_PREFIX_PATH="$PREFIX" -DPython3_EXECUTABLE="$(command -v python)")
if python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  cuda=${CUDA_HOME:-/usr/local/cuda}
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda" -DCUDAToolkit_ROOT="$cuda")
  nvrtc=$(python -c 'import glob, os, torch; d = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia"); print(next(iter(sorted(glob.glob(d + "/*/lib/libnvrtc.so.*"))), ""))')
  [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$(realpath "$nvrtc")")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # else torch's CMake probes for a GPU
fi
# shellcheck disable=SC2086
cmake -S . -B "$BUILD" "${args[@]}" ${CMAKE_ARGS:-}
cmake --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"
(cd "$BUILD" && ctest --output-on-failure)
