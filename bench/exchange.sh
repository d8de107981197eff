#!/usr/bin/env bash
# Expert exchange round trip on loopback at Scout's row width (hidden 5120), bf16 wire, for 1, 16,
# 256 and 1,024 rows: one worker hosting tiny experts (intermediate 64), so that the figure is the
# transport, not the expert compute. Usage: bench/exchange.sh [ITERATIONS]
source "$(dirname "$0")/common.sh"
model=$(ensure_model scout-wire)
start_workers "$model" 1
machine
json=$("$EPSERVE" exchange-bench --worker "$WORKERS" --rows 1,16,256,1024 --iterations "${1:-300}")
python3 - "$json" <<'PY'
import json, sys
rows = json.loads(sys.argv[1])
print("| rows | request bytes | p50 µs | p90 µs | p99 µs | worker compute µs |")
print("| ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    print(f"| {r['rows']} | {r['request_bytes']:,} | {r['p50_us']:.0f} | {r['p90_us']:.0f} | {r['p99_us']:.0f} | {r['worker_compute_mean_us']:.0f} |")
PY
