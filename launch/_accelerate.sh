# Sourced by the launch scripts: run examples/vit/train.py through `accelerate launch` with a
# config from launch/configs. Environment overrides (all optional):
#   MIXED_PRECISION=no|fp16|bf16   NUM_PROCESSES=N
#   NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT   (multi-node)
# Extra arguments go to train.py (e.g. --drop_rate 0.1 --optimizer lion).
launch_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

accelerate_launch() {
  local config="$1"; shift
  local accelerate="accelerate"
  [ -x "$launch_root/.venv/bin/accelerate" ] && accelerate="$launch_root/.venv/bin/accelerate"
  local cmd=("$accelerate" launch --config_file "$launch_root/launch/configs/$config")
  [ -n "${NUM_PROCESSES:-}" ] && cmd+=(--num_processes "$NUM_PROCESSES")
  [ -n "${MIXED_PRECISION:-}" ] && cmd+=(--mixed_precision "$MIXED_PRECISION")
  [ -n "${NUM_MACHINES:-}" ] && cmd+=(--num_machines "$NUM_MACHINES")
  [ -n "${MACHINE_RANK:-}" ] && cmd+=(--machine_rank "$MACHINE_RANK")
  [ -n "${MAIN_PROCESS_IP:-}" ] && cmd+=(--main_process_ip "$MAIN_PROCESS_IP")
  [ -n "${MAIN_PROCESS_PORT:-}" ] && cmd+=(--main_process_port "$MAIN_PROCESS_PORT")
  cmd+=("$launch_root/examples/vit/train.py" "$@")
  echo "[launch] ${cmd[*]}"
  "${cmd[@]}"
}
