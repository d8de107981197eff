#!/usr/bin/env bash
# What the gateway adds, and the whole cluster's TTFT and tokens/s, for `mini` (4 expert workers, 1
# coordinator, the gateway: the layout of `epserve up`). The same token-id prompts go to the
# coordinator's Generate RPC directly and through the gateway's /v1/completions, in one run.
# Usage: bench/gateway.sh [REQUESTS]
source "$(dirname "$0")/common.sh"
model=$(ensure_model mini)
n="${1:-32}"
machine
start_workers "$model" 4
start_serving "$model"
coordinator=$COORDINATOR gateway=$GATEWAY
common=(--input-len 64 --output-len 32 --warmup 2 --json)
direct=$("$EPSERVE" bench --coordinator "$coordinator" --concurrency 1 --requests "$n" "${common[@]}" 2>/dev/null)
http=$("$EPSERVE" bench --url "http://$gateway/v1" --model mini --token-prompts --concurrency 1 --requests "$n" "${common[@]}" 2>/dev/null)
c8=$("$EPSERVE" bench --url "http://$gateway/v1" --model mini --token-prompts --concurrency 8 --requests "$((n * 2))" "${common[@]}" 2>/dev/null)
c32=$("$EPSERVE" bench --url "http://$gateway/v1" --model mini --token-prompts --concurrency 32 --requests "$((n * 2))" "${common[@]}" 2>/dev/null)
python3 - "$direct" "$http" "$c8" "$c32" <<'PY'
import json, sys
direct, http, c8, c32 = (json.loads(a) for a in sys.argv[1:])
print("| path | concurrency | TTFT p50 ms | TTFT p90 ms | e2e p50 ms | ITL p50 ms | output tokens/s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, r in [("coordinator gRPC (direct)", direct), ("gateway HTTP", http), ("gateway HTTP", c8), ("gateway HTTP", c32)]:
    print(f"| {name} | {r['concurrency']} | {r['ttft']['p50_ms']:.1f} | {r['ttft']['p90_ms']:.1f} | {r['e2e']['p50_ms']:.1f} | {r['itl']['p50_ms']:.2f} | {r['output_tokens_per_s']:.1f} |")
print()
print(f"gateway added latency at concurrency 1: TTFT p50 {http['ttft']['p50_ms'] - direct['ttft']['p50_ms']:+.2f} ms, "
      f"end-to-end p50 {http['e2e']['p50_ms'] - direct['e2e']['p50_ms']:+.2f} ms per request")
PY
