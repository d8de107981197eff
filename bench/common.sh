# Shared by the benchmark scripts: a release build, a checkpoint cache, worker start/stop.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/ensure-tools
cargo build --release -p epserve-cli >&2
EPSERVE="${CARGO_TARGET_DIR:-$root/target}/release/epserve"
MODELS="${EPSERVE_BENCH_MODELS:-$root/target/bench-models}"
export EPSERVE_LOG="${EPSERVE_LOG:-warn}"
WORKER_PIDS=()

# ensure_model PRESET: prints the checkpoint directory, generating it once (seed 0). One cached before
# the presets had a vision tower is written again: the same text weights, now with the tower.
ensure_model() {
  local dir="$MODELS/$1"
  if [ ! -f "$dir/config.json" ]; then
    "$EPSERVE" gen-model --preset "$1" --seed 0 --out "$dir" >&2
  elif [ ! -f "$dir/preprocessor_config.json" ]; then
    "$EPSERVE" gen-model --preset "$1" --seed 0 --out "$dir" --force >&2
  fi
  echo "$dir"
}

# start_workers MODEL N: starts N workers (shard i/N) on free ports; sets WORKERS=addr,addr,...
start_workers() {
  local model="$1" n="$2" i out addrs=()
  for ((i = 0; i < n; i++)); do
    out=$(mktemp)
    "$EPSERVE" worker --model "$model" --listen 127.0.0.1:0 --shard "$i/$n" >"$out" &
    WORKER_PIDS+=($!)
    for _ in $(seq 1 600); do grep -q '^listening on ' "$out" && break; sleep 0.1; done
    addrs+=("$(sed -n 's/^listening on //p' "$out")")
    rm -f "$out"
  done
  WORKERS=$(IFS=,; echo "${addrs[*]}")
}

# start_serving MODEL [COORDINATOR_FLAGS...]: one coordinator over $WORKERS (start_workers first) and
# a gateway in front of it, as `epserve up` lays them out; sets COORDINATOR and GATEWAY (host:port) and
# returns once the gateway is ready.
start_serving() {
  local model="$1" out
  shift
  out=$(mktemp)
  "$EPSERVE" coordinator --model "$model" --listen 127.0.0.1:0 --workers "$WORKERS" "$@" >"$out" &
  WORKER_PIDS+=($!)
  for _ in $(seq 1 600); do grep -q '^listening on ' "$out" && break; sleep 0.1; done
  COORDINATOR=$(sed -n 's/^listening on //p' "$out")
  "$EPSERVE" gateway --model "$model" --listen 127.0.0.1:0 --coordinators "$COORDINATOR" >"$out" &
  WORKER_PIDS+=($!)
  for _ in $(seq 1 600); do grep -q '^listening on ' "$out" && break; sleep 0.1; done
  GATEWAY=$(sed -n 's/^listening on //p' "$out")
  for _ in $(seq 1 100); do curl -sf "http://$GATEWAY/ready" >/dev/null && break; sleep 0.1; done
  rm -f "$out"
}

stop_workers() {
  for pid in "${WORKER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  WORKER_PIDS=()
}
trap stop_workers EXIT

machine() {
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d)"
}
