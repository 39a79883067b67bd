#!/usr/bin/env bash
# One-GPU check (about 5 minutes on an H200): installs the pinned package, runs the flex-vs-SDPA equality test and
# benchmarks/gpu_check.py. Results go to $OUT (the device tool's output folder) or the current directory.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet torch==2.13.0
  .venv/bin/pip install --quiet -e '.[dev]'
fi
.venv/bin/python -m pytest -q tests/test_model.py -k "flex or compiled" 2>&1 | tail -3 | tee "$out/gpu_tests.txt"
.venv/bin/python benchmarks/gpu_check.py --out "$out/gpu_check.md"
