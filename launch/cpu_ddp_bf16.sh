#!/usr/bin/env bash
# Several CPU processes with bf16 autocast (CPU autocast supports bf16, not fp16).
MIXED_PRECISION=bf16 exec "$(dirname "$0")/cpu_ddp.sh" "$@"
