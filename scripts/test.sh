#!/usr/bin/env bash
# README command (b): set up (scripts/setup.sh) and run every test that this machine can run:
# the main suite, then the Triton kernels under the interpreter in their own process
# (TRITON_INTERPRET must be set before triton is first imported). GPU tests run when a GPU exists.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
run_pytest() {  # pytest's exit code 5 (no tests collected) is a failure here, not a pass
  set +e
  python -m pytest "$@"
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests for: $*" >&2; exit 1; fi
  return "$rc"
}
run_pytest -q -m "not triton_interpret" -p no:cacheprovider tests
TRITON_INTERPRET=1 run_pytest -q -m triton_interpret -p no:cacheprovider tests
