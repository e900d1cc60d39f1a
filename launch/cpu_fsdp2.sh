#!/usr/bin/env bash
# FSDP2 on several CPU processes (gloo, default 2): DropGrad masks sharded gradients; for testing without GPUs.
set -euo pipefail
source "$(dirname "$0")/_accelerate.sh"
accelerate_launch cpu_fsdp2.yaml --cpu "$@"
