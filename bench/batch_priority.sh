#!/usr/bin/env bash
# The Batch API's priority and throughput (issue 18), on one cluster in one run:
#  1. `epserve bench` at concurrency 32 on N completion requests (the interactive path's throughput);
#  2. the same N requests as one batch, alone: output tokens/s from creation to completion;
#  3. interactive TTFT at concurrency 4 on the idle cluster;
#  4. the same interactive load while an N-line batch of 4x longer answers runs (so that it outlasts
#     the interactive run: checked still running at the end).
# Usage: bench/batch_priority.sh [N=500] [OUTPUT_TOKENS=32]
# Env: EPSERVE (binary; default target/debug/epserve, an optimized dev build), MODEL (checkpoint;
# default the tiny test fixture), WORKERS (expert workers, default 2).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
n="${1:-500}" out_len="${2:-32}"
EPSERVE="${EPSERVE:-$root/target/debug/epserve}"
MODEL="${MODEL:-$root/tests/fixtures/tiny-llama4}"
name=$(basename "$(realpath "$MODEL")")
export EPSERVE_LOG="${EPSERVE_LOG:-warn}"
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
"$EPSERVE" up --model "$MODEL" --workers "${WORKERS:-2}" --port "$port" --data-dir "$work/data" >"$work/up.log" 2>&1 &
up_pid=$!
trap 'kill -INT $up_pid 2>/dev/null; wait $up_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 600); do grep -q 'OpenAI API:' "$work/up.log" && break; sleep 0.2; done
url="http://127.0.0.1:$port"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "load before: $(uptime | sed 's/.*load average/load average/')"
python3 - "$n" "$out_len" "$name" "$work" <<'PY'
import json, sys
n, out_len, model, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
words = ["red", "blue", "green", "seven", "river", "stone", "cloud", "north", "apple", "tiger"]
prompts = [f"Request {i}: the {words[i % 10]} {words[(i * 7) % 10]} of the {words[(i * 3) % 10]}" for i in range(n)]
with open(f"{work}/prompts.jsonl", "w") as f:
    for p in prompts:
        f.write(json.dumps({"prompt": p}) + "\n")
for name, tokens in [("batch", out_len), ("long", 4 * out_len)]:
    with open(f"{work}/{name}.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            body = {"model": model, "prompt": p, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
            f.write(json.dumps(line) + "\n")
PY
bench() { "$EPSERVE" bench --url "$url/v1" --model "$name" --json 2>/dev/null "$@"; }
c32=$(bench --prompts "$work/prompts.jsonl" --concurrency 32 --requests "$n" --output-len "$out_len" --warmup 4)
# The batch alone: output tokens over the time from creation to completion, polled every 100 ms.
batch_alone=$(python3 - "$EPSERVE" "$url" "$work" <<'PY'
import json, subprocess, sys, time, urllib.request
epserve, url, work = sys.argv[1:]
start = time.time()
bid = subprocess.run([epserve, "batch", "submit", f"{work}/batch.jsonl", "--url", url], check=True,
                     capture_output=True, text=True).stdout.strip()
while True:
    b = json.load(urllib.request.urlopen(f"{url}/v1/batches/{bid}"))
    if b["status"] in ("completed", "failed", "cancelled", "expired"):
        break
    time.sleep(0.1)
elapsed = time.time() - start
assert b["status"] == "completed", b
text = urllib.request.urlopen(f"{url}/v1/files/{b['output_file_id']}/content").read().decode()
tokens = sum(json.loads(l)["response"]["body"]["usage"]["completion_tokens"] for l in text.splitlines() if l.strip())
print(json.dumps({"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}))
PY
)
interactive=(--input-len 64 --output-len 16 --concurrency 4 --requests 48 --warmup 4)
idle=$(bench "${interactive[@]}")
# Interactive load while a batch runs: submitted, given 2 s to fill the engines, then measured.
bid=$("$EPSERVE" batch submit "$work/long.jsonl" --url "$url")
sleep 2
loaded=$(bench "${interactive[@]}")
state=$(curl -s "$url/v1/batches/$bid")
curl -s -X POST "$url/v1/batches/$bid/cancel" >/dev/null
echo "load after: $(uptime | sed 's/.*load average/load average/')"
python3 - "$c32" "$batch_alone" "$idle" "$loaded" "$state" "$n" "$out_len" <<'PY'
import json, sys
c32, alone, idle, loaded, state = (json.loads(a) for a in sys.argv[1:6])
n, out_len = sys.argv[6], sys.argv[7]
counts = state["request_counts"]
print(f"| measurement | figure |")
print(f"| --- | ---: |")
print(f"| `epserve bench` c=32, {n} requests × {out_len} tokens: output tokens/s | {c32['output_tokens_per_s']:.1f} |")
print(f"| the same {n} requests as one batch, alone: output tokens/s | {alone['output_tokens_per_s']:.1f} |")
print(f"| batch / bench ratio (≥ 0.9 wanted) | {alone['output_tokens_per_s'] / c32['output_tokens_per_s']:.2f} |")
print(f"| interactive c=4 TTFT p50, idle cluster (ms) | {idle['ttft']['p50_ms']:.1f} |")
print(f"| interactive c=4 TTFT p50, batch running (ms) | {loaded['ttft']['p50_ms']:.1f} |")
print(f"| loaded / idle TTFT ratio (≤ 1.5 wanted) | {loaded['ttft']['p50_ms'] / idle['ttft']['p50_ms']:.2f} |")
print(f"| interactive c=4 output tokens/s, idle / batch running | {idle['output_tokens_per_s']:.1f} / {loaded['output_tokens_per_s']:.1f} |")
print(f"| the {n}-line batch ({4 * int(out_len)} tokens a line) when the interactive run ended | {state['status']}, {counts['completed']} of {counts['total']} lines done |")
PY
