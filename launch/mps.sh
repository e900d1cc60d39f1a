#!/usr/bin/env bash
# One process on an Apple-silicon GPU (MPS): DropGrad as the step wrapper.
set -euo pipefail
source "$(dirname "$0")/_accelerate.sh"
accelerate_launch single_gpu.yaml "$@"
