# Sourced by the launch scripts: run examples/vit/train.py through `accelerate launch` with a
# config from launch/configs. Environment overrides (all optional):
#   MIXED_PRECISION=no|fp16|bf16   NUM_PROCESSES=N (the total over all machines, Accelerate's meaning)
#   NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT   (multi-node)
# Multi-node: run the same script on every machine with the same NUM_MACHINES, NUM_PROCESSES,
# MAIN_PROCESS_IP (machine 0's address) and MAIN_PROCESS_PORT, and MACHINE_RANK=0..NUM_MACHINES-1;
# each machine starts NUM_PROCESSES / NUM_MACHINES processes (static rendezvous on machine 0).
# Extra arguments go to train.py (e.g. --drop_rate 0.1 --optimizer lion).
launch_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# With NUM_MACHINES > 1, a machine left to the configs' defaults (machine_rank 0, 127.0.0.1) would
# wait for the others until the rendezvous times out: refuse that before starting anything.
check_multinode() {
  local machines="${NUM_MACHINES:-1}"
  if ! [[ "$machines" =~ ^[1-9][0-9]*$ ]]; then
    echo "[launch] error: NUM_MACHINES must be a positive integer, got '$machines'" >&2; return 2
  fi
  [ "$machines" -gt 1 ] || return 0
  local missing=""
  [ -n "${MACHINE_RANK:-}" ] || missing="MACHINE_RANK"
  [ -n "${MAIN_PROCESS_IP:-}" ] || missing="${missing:+$missing and }MAIN_PROCESS_IP"
  if [ -n "$missing" ]; then
    echo "[launch] error: NUM_MACHINES=$machines needs $missing set on every machine (MACHINE_RANK=0..$((machines - 1)), MAIN_PROCESS_IP = the address of machine 0)" >&2
    return 2
  fi
  if ! [[ "$MACHINE_RANK" =~ ^[0-9]+$ ]] || [ "$MACHINE_RANK" -ge "$machines" ]; then
    echo "[launch] error: MACHINE_RANK must be in 0..$((machines - 1)), got '$MACHINE_RANK'" >&2; return 2
  fi
  if [ -n "${NUM_PROCESSES:-}" ] && { ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || (( NUM_PROCESSES % machines )); }; then
    echo "[launch] error: NUM_PROCESSES is the total over all machines: a multiple of NUM_MACHINES=$machines, got '$NUM_PROCESSES'" >&2
    return 2
  fi
}

accelerate_launch() {
  local config="$1"; shift
  check_multinode || return
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
