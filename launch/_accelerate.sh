# Sourced by the launch scripts: run examples/vit/train.py through `accelerate launch` with a
# config from launch/configs. Environment overrides (all optional):
#   MIXED_PRECISION=no|fp16|bf16   NUM_PROCESSES=N (the total over all machines, Accelerate's meaning)
#   NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT   (multi-node)
# Multi-node: run the same script on every machine with the same NUM_MACHINES, NUM_PROCESSES,
# MAIN_PROCESS_IP (machine 0's address) and MAIN_PROCESS_PORT, and MACHINE_RANK=0..NUM_MACHINES-1;
# each machine starts NUM_PROCESSES / NUM_MACHINES processes (static rendezvous on machine 0).
# Extra arguments go to train.py (e.g. --drop_rate 0.1 --optimizer lion); the launcher's own flags are
# the variables above (--num_processes 4 is refused, naming NUM_PROCESSES=4).
# CPU configs: OMP_NUM_THREADS defaults to this machine's cores / its processes, OMP_WAIT_POLICY to PASSIVE.
launch_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# `accelerate launch` hands every argument after the script to train.py, which would refuse these
# in a long traceback per rank: name the variable instead, before starting anything.
check_launcher_flags() {
  local arg name value
  while [ $# -gt 0 ]; do
    arg="$1"; shift
    name="${arg%%=*}"
    case "$name" in
      --num_processes|--num_machines|--machine_rank|--main_process_ip|--main_process_port)
        if [[ "$arg" == *=* ]]; then value="${arg#*=}"; else value="${1:-N}"; fi
        local variable; variable="$(echo "${name#--}" | tr '[:lower:]' '[:upper:]')"
        echo "[launch] error: $name is a launcher setting, not a train.py flag: run $variable=$value bash launch/$(basename "$0") ..." >&2
        return 2 ;;
    esac
  done
}

# Threads per process on a CPU: the cores of this machine shared by its processes (torchrun would give
# each of several processes one thread, torch a single process every core). PASSIVE: an OpenMP thread
# waiting at a barrier sleeps instead of spinning; on cores shared with other jobs spinning threads made
# a 2-thread step ~10x slower than a 1-thread one (docs/benchmarks/2026-12-07_cpu-2core.md).
cpu_thread_defaults() {
  local config="$launch_root/launch/configs/$1"
  grep -q '^use_cpu: true' "$config" || return 0
  local processes="${NUM_PROCESSES:-$(sed -n 's/^num_processes: *//p' "$config")}"
  local per_machine=$(( ${processes:-1} / ${NUM_MACHINES:-1} ))
  local cores; cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
  local threads=$(( cores / (per_machine > 0 ? per_machine : 1) ))
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
}

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
  check_launcher_flags "$@" || return
  cpu_thread_defaults "$config"
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
  echo "[launch] ${OMP_NUM_THREADS:+OMP_NUM_THREADS=$OMP_NUM_THREADS }${OMP_WAIT_POLICY:+OMP_WAIT_POLICY=$OMP_WAIT_POLICY }${cmd[*]}"
  "${cmd[@]}"
}
