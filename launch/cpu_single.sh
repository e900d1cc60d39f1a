#!/usr/bin/env bash
# One process on the CPU: DropGrad as the step wrapper.
set -euo pipefail
source "$(dirname "$0")/_accelerate.sh"
accelerate_launch cpu_single.yaml --cpu "$@"
