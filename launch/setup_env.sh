#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install dropgrad-dist with
# its dev extra. Reinstalls only when pyproject.toml changed. Source it or run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DROPGRAD_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.dropgrad-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dropgrad-dist[dev] (torch, torchvision, accelerate, pytest) into $venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$root[dev]"
  echo "$want" > "$stamp"
fi
# torchvision must match torch (a CPU-only torch pin breaks it: "operator torchvision::nms does not exist").
"$venv/bin/python" -c "import torch, torchvision, accelerate; print(f'[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, accelerate {accelerate.__version__}')"
