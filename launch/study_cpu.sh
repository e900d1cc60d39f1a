#!/usr/bin/env bash
# The regularizer x optimizer study on 2 CPU cores, synthetic data: 9 scenarios (baseline, dropout,
# DropGrad, dropout + DropGrad, norm clipping, AutoClip, GNP, GNP + zero-warmup, SAM) x 6 optimizers
# x 3 seeds, two runs at a time (about 17 minutes). Resumable: finished runs are skipped.
# Extra arguments go to sweep.py; arguments after -- go to every train.py run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh" vit
python="${DROPGRAD_VENV:-$root/.venv}/bin/python"
cmd=("$python" "$root/examples/vit/sweep.py" --preset cpu --output_dir "${OUTPUT_DIR:-$root/outputs/study_cpu}" "$@")
echo "[launch] ${cmd[*]}"
"${cmd[@]}"
