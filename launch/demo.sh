#!/usr/bin/env bash
# The main job: set up .venv if needed, then train the ViT with DropGrad on the embedded synthetic
# dataset (no download) and plot its curves. 2 CPU processes (gloo) where only a CPU is present;
# all GPUs (DDP) when there are several, one GPU or MPS otherwise. Extra arguments go to train.py.
# Writes $OUTPUT_DIR (default outputs/demo): metrics.jsonl, model.pt, curves.png (train loss per
# step with the test loss, train and test accuracy), grad_norms.png, summary.md and summary.csv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh" vit  # the ViT example's extras: no test tools, no other engines
python="${DROPGRAD_VENV:-$root/.venv}/bin/python"
out="${OUTPUT_DIR:-$root/outputs/demo}"
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
mps=$("$python" -c "import torch; print(int(torch.backends.mps.is_available()))")
if [ "$gpus" -ge 2 ]; then
  NUM_PROCESSES="$gpus" bash "$root/launch/gpu_ddp.sh" --output_dir "$out" "$@"
elif [ "$gpus" -eq 1 ] || [ "$mps" -eq 1 ]; then
  bash "$root/launch/gpu_single.sh" --output_dir "$out" "$@"
else
  bash "$root/launch/cpu_ddp.sh" --output_dir "$out" "$@"
fi
echo "[demo] \"$python\" $root/examples/vit/plot.py $out"
"$python" "$root/examples/vit/plot.py" "$out"
