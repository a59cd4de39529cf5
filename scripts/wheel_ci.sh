#!/usr/bin/env bash
# CI's wheel job (run by scripts/test.sh after the test suites): the one wheel, installed into two clean
# virtual environments with different torch versions, outside the source tree, passes
# scripts/wheel_smoke.py in each (imports without a warning, `bigkernels info`, one op per family on
# its C++ CPU kernel, equal to the reference; fused_adamw_ bumps autograd versions).
#   WHEEL_TORCH_SPECS   the torch of each venv (default "torch==2.13.0 torch==2.14.1": 2.13 CPU-only and
#                       2.14.1 CUDA 13, both on this machine's local package index)
#   WHEEL_FROM_INPLACE  1 (default when bigkernels/_C*.so exist): package the extensions the in-place
#                       build (scripts/setup.sh) just compiled -- CI's single build, for TORCH_CUDA_ARCH_LIST
#                       (9.0 in CI) -- instead of compiling them again; 0: scripts/build_wheel.sh compiles.
# Needs the repo's .venv active (scripts/setup.sh). Took 253 s on this 2-core VM (load ~10, pip cache
# warm), nearly all of it installing torch twice from the local index; a cold cache took 8-14 min.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bigkernels-wheel-ci.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

if [ -z "${WHEEL_FROM_INPLACE:-}" ]; then
  WHEEL_FROM_INPLACE=$(ls bigkernels/_C.*so >/dev/null 2>&1 && echo 1 || echo 0)
fi
BIGKERNELS_WHEEL_FROM_INPLACE=$WHEEL_FROM_INPLACE WHEEL_DIR="$WORK/dist" bash scripts/build_wheel.sh
wheel=$(ls "$WORK"/dist/bigkernels-*-cp310-abi3-*.whl)
python -m zipfile -l "$wheel" | grep -E "_C|_build_info" || true
python - "$wheel" <<'EOF'
import sys, zipfile
meta = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(".dist-info/METADATA")][0]
text = zipfile.ZipFile(sys.argv[1]).read(meta).decode()
req = [l for l in text.splitlines() if l.startswith(("Requires-Dist: torch", "Requires-Python"))]
print("\n".join(req))
assert any("torch" in l and ">=2.10" in l for l in req), text
EOF

cp scripts/wheel_smoke.py "$WORK/"
# Nothing of the source tree on the path: with it, pip would take the tree's bigkernels.egg-info for an
# installed bigkernels and skip the wheel.
unset PYTHONPATH
for spec in ${WHEEL_TORCH_SPECS:-torch==2.13.0 torch==2.14.1}; do
  venv="$WORK/venv-${spec//[^A-Za-z0-9.]/_}"
  t0=$(date +%s)
  python -m venv "$venv"
  # outside the source tree: a fresh venv, the wheel file, and the working directory $WORK
  (cd "$WORK" && "$venv/bin/python" -m pip install -q "$wheel" "$spec")
  echo "== $spec: installed in $(( $(date +%s) - t0 )) s"
  (cd "$WORK" && "$venv/bin/python" wheel_smoke.py --source-tree "$ROOT")
done
echo "wheel CI passed in $(( $(date +%s) - start )) s"
