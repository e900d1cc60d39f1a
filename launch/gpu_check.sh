#!/usr/bin/env bash
# The GPU check (docs/gpu_check.md), at most ~8 minutes on one CUDA GPU: the `cuda` tests,
# `bench mask --device cuda`, and 200 steps of the ViT job with fp16 and bf16, with and without
# DropGrad; one summary table, printed and written to outputs/gpu_check/summary.md.
# Refuses (exit 2) without a CUDA device. GPU_CHECK_DEVICE=cpu: a smoke run of the same path on
# the CPU with tiny sizes (it measures nothing). Extra arguments go to launch/gpu_check.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${DROPGRAD_VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python=python
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$root/launch/gpu_check.py" --device "${GPU_CHECK_DEVICE:-cuda}" "$@"
