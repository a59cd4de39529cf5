#!/usr/bin/env bash
# README command (a): set up (scripts/setup.sh), show what this machine has, and run the quick
# optimizer benchmark (bigkernels vs torch.optim on this device).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
bigkernels info
python benchmarks/bench_optim.py --quick --out bench_out/bench_optim_quick.json
