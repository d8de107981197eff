#!/usr/bin/env bash
# Quantized weights on `mini`, in one run: `epserve decode-bench` (experts in process) at batch
# 1 / 32 / 64 with the matrices as stored (bf16) and quantized at load to int8 and int4 — scope `all`
# (every matrix but the router) and the default `routed,shared`, and scope `all` with int8
# activations (`--activations int8`) — each row with its tokens/s (the median of QUANT_ROUNDS runs,
# the configurations alternating round by round so that a slow spell of a shared host hits them all), the
# bytes a step reads and the fraction of the memory-bandwidth bound and of the arithmetic bound (the
# step's multiply-adds over the measured peak) it reaches, and which bound is lower. Prints a markdown
# table for docs/benchmarks.md, then the raw JSON.
#
#   bench/quantized.sh            # QUANT_BATCHES=1,32,64 QUANT_STEPS=32 QUANT_PROMPT_LEN=32 QUANT_ROUNDS=3
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
model=$(ensure_model "${QUANT_MODEL:-mini}")
batches="${QUANT_BATCHES:-1,32,64}"
steps="${QUANT_STEPS:-32}"
prompt_len="${QUANT_PROMPT_LEN:-32}"
rounds="${QUANT_ROUNDS:-3}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() { # ROUND NAME ARGS...
  local round="$1" name="$2"
  shift 2
  echo "decode-bench $name (round $round): epserve decode-bench --model $model --batch $batches --steps $steps --prompt-len $prompt_len --probe-bandwidth $*" >&2
  "$EPSERVE" decode-bench --model "$model" --batch "$batches" --steps "$steps" --prompt-len "$prompt_len" \
    --probe-bandwidth "$@" >"$work/$name.$round.json"
}
for round in $(seq 1 "$rounds"); do
  run "$round" bf16
  run "$round" int8-all --quantize int8 --quantize-scope all
  run "$round" int4-all --quantize int4 --quantize-scope all
  run "$round" int8-default --quantize int8
  run "$round" int4-default --quantize int4
  run "$round" int8-all-a8 --quantize int8 --quantize-scope all --activations int8
  run "$round" int4-all-a8 --quantize int4 --quantize-scope all --activations int8
done

python3 - "$work" "$rounds" <<'PY'
import json, os, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
names = ["bf16", "int8-all", "int4-all", "int8-default", "int4-default", "int8-all-a8", "int4-all-a8"]
runs = {}
for n in names:
    per_round = [json.load(open(os.path.join(work, f"{n}.{i}.json"))) for i in range(1, rounds + 1)]
    runs[n] = {}
    for rows in per_round:
        for r in rows:
            if "batch" in r:
                runs[n].setdefault(r["batch"], []).append(r)
    # The median run of each batch size (by tokens/s), all its fields with it.
    runs[n] = {b: sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2] for b, rs in runs[n].items()}
    bw = [r["memory_read_gb_per_s"] for rows in per_round for r in rows if "memory_read_gb_per_s" in r]
    peak = [r["peak_multiply_adds_g_per_s"] for rows in per_round for r in rows if "peak_multiply_adds_g_per_s" in r]
    if bw:
        print(f"{n}: memory read bandwidth probe {statistics.median(bw):.1f} GB/s (median of {len(bw)})", end="")
        print(f"; peak f32 multiply-adds {statistics.median(peak):.1f} G/s" if peak else "")
print()
print("| weights | batch | tok/s | × bf16 | MB read / step | fraction of the bandwidth bound | fraction of the arithmetic bound | lower bound |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for n in names:
    for b, r in sorted(runs[n].items()):
        base = runs["bf16"].get(b, {}).get("tokens_per_s")
        ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "n/a"
        mb = r.get("weight_bytes_per_step", 0) / 1e6
        frac = r.get("fraction_of_bound")
        frac = f"{frac:.2f}" if frac is not None else "n/a"
        arith = r.get("fraction_of_arithmetic_bound")
        arith = f"{arith:.2f}" if arith is not None else "n/a"
        print(f"| {n} | {b} | {r['tokens_per_s']:.1f} | {ratio} | {mb:.1f} | {frac} | {arith} | {r.get('lower_bound', 'n/a')} |")
print()
for n in names:
    print(n, json.dumps(list(runs[n].values())))
PY
