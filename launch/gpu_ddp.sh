#!/usr/bin/env bash
# Multi-GPU DDP over NCCL (NUM_PROCESSES = GPUs over all machines; multi-node via NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP): DropGrad through the DDP comm hook.
set -euo pipefail
source "$(dirname "$0")/_accelerate.sh"
accelerate_launch gpu_ddp.yaml "$@"
