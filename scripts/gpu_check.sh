#!/usr/bin/env bash
# The one call a session with a lent GPU makes (the `device` tool's `run`; torch and triton are
# preinstalled there, nothing can be downloaded):
#
#     bash scripts/gpu_check.sh            # timeout_s=540 on the call
#
# Finishes within BUDGET seconds (default 470, under 8 minutes) with every phase under its own
# `timeout`, most valuable first, so a call cut short still returns what ran: logs go straight
# into $OUT (default ./gpu_out), and summary.txt gets one line per phase as it ends.
#
#   1. build the extension for the GPU present (CUDA kernels; register spills = build error)
#   2. the AOT compile test under this machine's Triton (checks the shared-memory estimates there)
#   3. tests/test_gpu_sizes_cuda.py (issue 9: GPU sizes, > 2^31 elements, cuda:1, plans, launches)
#   4. every other `-m cuda` test                 (pytest-xdist over 8 workers when installed)
#   5. the Triton kernel tests on the GPU         (the -m triton_interpret files, run on cuda)
#   6. the benchmarks in quick mode, JSON rows in $OUT/bench.json
#
# Knobs: BUDGET=seconds; SANITIZE=1 adds compute-sanitizer memcheck over the CUDA C++ op tests
# (slow; off by default); FULL=1 runs the benchmarks' full grids instead of phases 2-5 (a second
# call). $OUT gets at most 8 files: summary.txt build.log aot.log sizes.log cuda.log triton.log
# bench.log bench.json.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${BUDGET:-470}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
PY=${PYTHON:-python3}

left() { echo $((BUDGET - ($(date +%s) - START))); }

# phase NAME CAP LOG CMD...: runs CMD under `timeout min(CAP, time left)`, output to LOG, one summary line.
phase() {
  local name=$1 cap=$2 log=$3
  shift 3
  local t
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 15 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1
  rc=$?
  local status="rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMED OUT after ${t}s"
  local tail_line
  tail_line=$(grep -E "passed|failed|error|PROBLEM|cases," "$log" | tail -1)
  echo "$name: $status in $(($(date +%s) - t0))s; ${tail_line:-see $(basename "$log")}" | tee -a "$SUMMARY"
  return 0
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  $PY -c "import torch, triton, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'python', sys.version.split()[0], 'gpus', torch.cuda.device_count())"
} >"$SUMMARY" 2>&1
cat "$SUMMARY"

cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} BIGKERNELS_BUILD_CUDA=1 BIGKERNELS_PTXAS_STRICT=1
export MAX_JOBS=${MAX_JOBS:-16}
phase "1 build (sm_${cap/./})" 240 "$OUT/build.log" $PY setup.py build_ext --inplace
$PY -m bigkernels info >>"$OUT/build.log" 2>&1
if ! $PY -c "import bigkernels, sys; sys.exit(0 if bigkernels.info()['extension_loaded'] else 1)"; then
  echo "build failed: the tests below run on the references / Triton only" | tee -a "$SUMMARY"
fi

XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8 --dist loadfile"
PYTEST="$PY -m pytest -q -p no:cacheprovider -rfE"

if [ "${FULL:-0}" != 1 ]; then
  export BIGKERNELS_AOT_WORKERS=16
  phase "2 aot compile" 90 "$OUT/aot.log" $PYTEST tests/test_triton_aot.py
  phase "3 gpu sizes" 150 "$OUT/sizes.log" $PYTEST -m cuda tests/test_gpu_sizes_cuda.py
  phase "4 cuda tests" 150 "$OUT/cuda.log" $PYTEST $XDIST -m cuda --ignore=tests/test_gpu_sizes_cuda.py tests
  phase "5 triton on gpu" 120 "$OUT/triton.log" $PYTEST $XDIST -m triton_interpret tests
  if [ "${SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
    phase "5b sanitizer" 120 "$OUT/cuda.log" compute-sanitizer --tool memcheck --error-exitcode 1 \
      $PYTEST -x tests/test_optim_cuda.py tests/test_quant_cuda.py
  fi
fi

quick=$([ "${FULL:-0}" = 1 ] && echo "" || echo "--quick")
benchcap=$([ "${FULL:-0}" = 1 ] && echo 300 || echo 60)
for b in optim quant sparse; do
  phase "6 bench_$b" "$benchcap" "$OUT/bench.log" $PY "benchmarks/bench_$b.py" --device cuda $quick \
    --out "$OUT/bench_$b.json"
done
# One JSON file (the tool returns at most 8 files).
$PY - "$OUT" <<'EOF' >>"$SUMMARY" 2>&1
import json, os, sys
out = sys.argv[1]
rows = {}
for b in ("optim", "quant", "sparse"):
    p = os.path.join(out, f"bench_{b}.json")
    if os.path.exists(p):
        with open(p) as f:
            rows[b] = json.load(f)
        os.remove(p)
with open(os.path.join(out, "bench.json"), "w") as f:
    json.dump(rows, f, indent=1)
print("bench.json:", {k: len(v) if isinstance(v, list) else "?" for k, v in rows.items()})
EOF
echo "total $(($(date +%s) - START))s" | tee -a "$SUMMARY"
