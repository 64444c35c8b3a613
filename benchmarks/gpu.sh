#!/usr/bin/env bash
# The GPU checks in one go (about 2-4 minutes on one H100/H200-class GPU):
#   1. the gpu-marked tests (CuPy vs NumPy for every op and model),
#   2. benchmarks/gpu.py: per-op CuPy-vs-NumPy parity, training steps CuPy vs torch CUDA,
#      and the speed-up over the NumPy step on this machine's CPU.
# Runs from the checkout with PYTHONPATH=. (a GPU machine may have no package index, so no
# venv is built). The benchmark writes bench-gpu.json into $OUT (default: the repository
# root, where bench*.json is ignored by git); with $OUT set the test log goes there too.
#
#   benchmarks/gpu.sh              on a machine with a CUDA GPU, CuPy and torch (CUDA)
#   PYTHON=.venv/bin/python benchmarks/gpu.sh --dry-run
#                                  anywhere: the tests skip, the benchmark runs on NumPy/torch CPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
PY=${PYTHON:-python3}
LOG=/dev/null
[ -n "${OUT:-}" ] && LOG="$OUT/pytest-gpu.txt"
OUT=${OUT:-.}
DRY=()
[ "${1:-}" = "--dry-run" ] && DRY=(--dry-run)

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import numpy, torch; print('numpy', numpy.__version__, '| torch', torch.__version__, '| torch.cuda', torch.cuda.is_available())"
"$PY" -c "import cupy; print('cupy', cupy.__version__, '| device:', cupy.cuda.is_available())" 2>/dev/null || echo "no cupy"

echo "== gpu tests"
timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$LOG" | tail -25
tests=${PIPESTATUS[0]}

echo "== gpu benchmark"
timeout 240 "$PY" -m benchmarks.gpu --json "$OUT/bench-gpu.json" "${DRY[@]}"
bench=$?

echo "== done: tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] || [ "$tests" -eq 5 ] && [ "$bench" -eq 0 ]
