#!/usr/bin/env bash
# FSDP2 over all GPUs (NUM_PROCESSES = GPUs): DropGrad masks sharded gradients in global coordinates.
set -euo pipefail
source "$(dirname "$0")/_accelerate.sh"
accelerate_launch fsdp2.yaml "$@"
