#!/usr/bin/env bash
# Several CPU processes (gloo, default 2; NUM_PROCESSES=N): DropGrad through the DDP comm hook.
set -euo pipefail
source "$(dirname "$0")/_accelerate.sh"
accelerate_launch cpu_ddp.yaml --cpu "$@"
