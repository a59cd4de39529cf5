#!/usr/bin/env bash
# README command (a): set up (scripts/setup.sh), show what this machine has, and run the demo:
# train a small GPT on Python's own sources, compress it four ways (int8 w8a16, int8 w8a8 +
# SmoothQuant, 2:4 and 75% block sparsity) and print perplexity, memory and speed per variant.
# Extra arguments go to `bigkernels demo` (e.g. --device cuda, --size tiny, --steps 100).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
bigkernels info
bigkernels demo --out bench_out/demo "$@"
