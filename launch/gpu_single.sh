#!/usr/bin/env bash
# One process on one CUDA GPU: DropGrad as the step wrapper (MIXED_PRECISION=fp16|bf16 for AMP).
set -euo pipefail
source "$(dirname "$0")/_accelerate.sh"
accelerate_launch single_gpu.yaml "$@"
