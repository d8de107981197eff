#!/usr/bin/env bash
# `mini` decode tokens/s at batch 1 and 32: experts in process (`local`) vs 4 gRPC workers on
# loopback (bf16 wire), each with and without micro-batch overlap, measured in one run.
# Usage: bench/expert_parallel.sh [STEPS]
source "$(dirname "$0")/common.sh"
model=$(ensure_model mini)
steps="${1:-32}"
machine
local_json=$("$EPSERVE" decode-bench --model "$model" --batch 1,32 --steps "$steps" --both-overlap)
start_workers "$model" 4
grpc_json=$("$EPSERVE" decode-bench --model "$model" --batch 1,32 --steps "$steps" --both-overlap --workers "$WORKERS")
stop_workers
python3 - "$local_json" "$grpc_json" <<'PY'
import json, sys
local, grpc = json.loads(sys.argv[1]), json.loads(sys.argv[2])
base = {(r["batch"], r["overlap"]): r["tokens_per_s"] for r in local}
print("| transport | batch | overlap | step ms | tokens/s | vs local, no overlap |")
print("| --- | ---: | --- | ---: | ---: | ---: |")
for r in local + grpc:
    name = r["transport"] + (f" ×{r['workers']} ({r['wire']})" if r["transport"] == "grpc" else "")
    ratio = r["tokens_per_s"] / base[(r["batch"], False)]
    print(f"| {name} | {r['batch']} | {'yes' if r['overlap'] else 'no'} | {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} | {ratio:.2f} |")
PY
