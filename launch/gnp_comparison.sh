#!/usr/bin/env bash
# The GNP paper's comparison on a small ViT: Adam, Adam + gradient regularization (GNP alpha 0.8,
# r 0.05) and Adam + GR + zero-warmup, 3 seeds each, CIFAR-10 on all GPUs of this machine (bf16).
# The CPU synthetic analogue is part of study_cpu.sh (adam x baseline/gnp/gnp_zero_warmup).
# Extra arguments go to sweep.py (e.g. --output_dir); arguments after -- go to every train.py run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${DROPGRAD_VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python=python
cmd=("$python" "$root/examples/vit/sweep.py" --preset gnp --output_dir "${OUTPUT_DIR:-$root/outputs/gnp_comparison}" "$@")
echo "[launch] ${cmd[*]}"
"${cmd[@]}"
