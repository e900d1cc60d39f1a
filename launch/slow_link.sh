#!/usr/bin/env bash
# The ViT training script on 2 CPU processes (launch/cpu_ddp.sh) over a bandwidth-limited link: a
# private network namespace (unshare -n) whose loopback tc limits to LINK=RATE[,DELAY] (default 1gbit;
# dropgrad_dist/bench/link.py). All rank traffic shares that one link. Needs root or CAP_NET_ADMIN;
# without it says why and runs unshaped. Extra arguments go to train.py, e.g.
#   LINK=1gbit bash launch/slow_link.sh --drop_rate 0.9 --communication compact --output_dir outputs/c09
# Afterwards the loopback's transmitted bytes (every rank's traffic, the run's own namespace) are
# printed and written to OUTPUT_DIR/link.json (OUTPUT_DIR: the --output_dir argument).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${DROPGRAD_VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python=python
link="${LINK:-1gbit}"
if [ -z "${DROPGRAD_LINK_NAMESPACE:-}" ]; then
  if unshare -n true 2>/dev/null; then
    DROPGRAD_LINK_NAMESPACE=1 exec unshare -n bash "${BASH_SOURCE[0]}" "$@"
  fi
  echo "[slow_link] no private network namespace (unshare -n needs root or CAP_NET_ADMIN): running unshaped" >&2
  exec bash "$root/launch/cpu_ddp.sh" "$@"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m dropgrad_dist.bench.link "$link" || echo "[slow_link] running unshaped" >&2
out="outputs/vit"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --output_dir) out="${args[i + 1]:-$out}" ;;
    --output_dir=*) out="${args[i]#--output_dir=}" ;;
  esac
done
bash "$root/launch/cpu_ddp.sh" "$@"
sent=$(awk -F'[: ]+' '$2 == "lo" {print $11}' /proc/net/dev)
echo "[slow_link] loopback transmitted $sent bytes (all ranks) on link $link"
mkdir -p "$out"
printf '{"link": "%s", "lo_tx_bytes": %s, "processes": %s}\n' "$link" "$sent" "${NUM_PROCESSES:-2}" > "$out/link.json"
