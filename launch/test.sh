#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite in parallel.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh" dev
cd "$root"
echo "[test] .venv/bin/python -m pytest -n auto $*"
exec "${DROPGRAD_VENV:-$root/.venv}/bin/python" -m pytest -n auto "$@"
