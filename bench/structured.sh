#!/usr/bin/env bash
# What constrained decoding costs: output tokens/s of `mini` (the layout of bench/gateway.sh: 4 expert
# workers, 1 coordinator, the gateway) at concurrency 1 and 32, free text against JSON following
# bench/schemas/records.json (`--json-schema`), and the coordinator's mask time per token
# (epserve_grammar_mask_seconds, p50/p99 from its /metrics).
# Usage: bench/structured.sh [REQUESTS]
source "$(dirname "$0")/common.sh"
model=$(ensure_model mini)
n="${1:-32}"
machine
start_workers "$model" 4
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start_serving "$model" --metrics-listen "127.0.0.1:$metrics_port"
gateway=$GATEWAY
schema="$root/bench/schemas/records.json"
common=(--url "http://$gateway/v1" --model mini --endpoint chat --input-len 64 --output-len 128 --warmup 2 --json)
free1=$("$EPSERVE" bench "${common[@]}" --concurrency 1 --requests "$n" 2>/dev/null)
json1=$("$EPSERVE" bench "${common[@]}" --concurrency 1 --requests "$n" --json-schema "$schema" 2>/dev/null)
free32=$("$EPSERVE" bench "${common[@]}" --concurrency 32 --requests "$((n * 4))" 2>/dev/null)
json32=$("$EPSERVE" bench "${common[@]}" --concurrency 32 --requests "$((n * 4))" --json-schema "$schema" 2>/dev/null)
metrics=$(curl -sf "http://127.0.0.1:$metrics_port/metrics")
python3 - "$free1" "$json1" "$free32" "$json32" "$metrics" <<'PY'
import json, re, sys
free1, json1, free32, json32 = (json.loads(a) for a in sys.argv[1:5])
metrics = sys.argv[5]
print("| output | concurrency | requests | output tokens | TTFT p50 ms | ITL p50 ms | ITL p99 ms | output tokens/s | vs free |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, r, base in [("free text", free1, free1), ("json_schema", json1, free1), ("free text", free32, free32), ("json_schema", json32, free32)]:
    print(f"| {name} | {r['concurrency']} | {r['requests_ok']} | {r['output_tokens']} | {r['ttft']['p50_ms']:.1f} | "
          f"{r['itl']['p50_ms']:.2f} | {r['itl']['p99_ms']:.2f} | {r['output_tokens_per_s']:.1f} | "
          f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x |")
def quantile(q):
    m = re.search(r'^epserve_grammar_mask_seconds\{quantile="%s"\} (\S+)' % q, metrics, re.M)
    return float(m.group(1)) * 1e3 if m else float("nan")
count = re.search(r"^epserve_grammar_mask_seconds_count (\S+)", metrics, re.M)
print()
print(f"mask time per token (coordinator, {count.group(1) if count else '?'} masks): "
      f"p50 {quantile('0.5'):.3f} ms, p99 {quantile('0.99'):.3f} ms, max {quantile('1'):.3f} ms")
PY
