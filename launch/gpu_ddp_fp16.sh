#!/usr/bin/env bash
# Multi-GPU DDP with fp16 autocast and GradScaler (overflowing steps are skipped on every rank).
MIXED_PRECISION=fp16 exec "$(dirname "$0")/gpu_ddp.sh" "$@"
