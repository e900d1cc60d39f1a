#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the DropGrad demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh"
cmd=("${DROPGRAD_VENV:-$root/.venv}/bin/python" "$root/examples/basic_usage.py" "$@")
echo "[demo] ${cmd[*]}"
exec "${cmd[@]}"
