#!/usr/bin/env bash
# `mini` through the serving engine in process: output tokens/s and time to first token at
# concurrency 1, 8, 32, 64 (closed loop, 64-token prompts, 64 output tokens, 2 requests per client).
# Usage: bench/engine.sh [REQUESTS_PER_CLIENT]
source "$(dirname "$0")/common.sh"
model=$(ensure_model mini)
machine
json=$("$EPSERVE" engine-bench --model "$model" --concurrency 1,8,32,64 --requests-per-client "${1:-2}")
python3 - "$json" <<'PY'
import json, sys
rows = json.loads(sys.argv[1])
base = rows[0]["output_tokens_per_s"]
print("| concurrency | requests | output tokens/s | vs concurrency 1 | TTFT p50 ms | TTFT p90 ms |")
print("| ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    print(f"| {r['concurrency']} | {r['requests']} | {r['output_tokens_per_s']:.1f} | {r['output_tokens_per_s']/base:.2f}× | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} |")
PY
