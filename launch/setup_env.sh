#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install dropgrad-dist with one
# extra: `bash launch/setup_env.sh [EXTRA]`, EXTRA from pyproject.toml's optional dependencies
# (default dev: tests, lint and every integration; the demo asks for vit only). Reinstalls only when
# pyproject.toml changed since that extra (or dev, which includes every extra) was installed.
# Source it or run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DROPGRAD_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
extra="${1:-dev}"
extras="$(sed -n '/^\[project.optional-dependencies\]/,/^\[/s/^\([a-z_-]*\) *=.*/\1/p' "$root/pyproject.toml" | tr '\n' ' ')"
if [[ " $extras" != *" $extra "* ]]; then
  echo "[setup] error: unknown extra '$extra'; pyproject.toml declares: $extras" >&2
  exit 2
fi
stamp() { if [ "$1" = dev ]; then echo "$venv/.dropgrad-installed"; else echo "$venv/.dropgrad-installed-$1"; fi; }
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$(stamp "$extra")" 2>/dev/null)" != "$want" ] && [ "$(cat "$(stamp dev)" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dropgrad-dist[$extra] (torch, torchvision, accelerate and the extra's packages) into $venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$root[$extra]"
  echo "$want" > "$(stamp "$extra")"
fi
# torchvision must match torch (a CPU-only torch pin breaks it: "operator torchvision::nms does not exist").
"$venv/bin/python" -c "import torch, torchvision, accelerate; print(f'[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, accelerate {accelerate.__version__}')"
