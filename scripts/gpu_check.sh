#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool; torch and triton are preinstalled there):
# build with CUDA for the GPU present, run the CUDA tests and the Triton tests on the GPU,
# compute-sanitizer over the CUDA C++ op tests (slow: drop it with SANITIZE=0), and every
# benchmark on cuda; logs and JSON go to $OUT (default ./gpu_out). Pass FULL=1 for the full
# benchmark grids (a second call: they need most of a 10-minute call on their own).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
cap=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
( time MAX_JOBS=16 BIGKERNELS_BUILD_CUDA=1 pip install -q --no-build-isolation --no-deps -e . ) > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
python -m bigkernels info | tee "$OUT/info.txt"
python -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5
python -m pytest -q -m triton_interpret -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_triton_gpu.log" | tail -3
if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -p no:cacheprovider \
    tests/test_optim_cuda.py tests/test_quant_cuda.py -x > "$OUT/sanitizer.log" 2>&1
  echo "compute-sanitizer rc=$? (log: $OUT/sanitizer.log)"
fi
quick=$([ "${FULL:-0}" = 1 ] && echo "" || echo "--quick")
for b in optim quant sparse; do
  python "benchmarks/bench_$b.py" --device cuda $quick --out "$OUT/bench_${b}_cuda.json" 2>&1 | tee "$OUT/bench_$b.log" | tail -25
done
