#!/usr/bin/env bash
# Image input on `mini`: time to first token of a one-image chat against a text-only prompt of the
# same length (so the difference is the vision tower), in process (`epserve generate`), and the
# vision encoder's throughput on a Scout-shaped layer stack against the machine's matrix-multiply
# peak (`epserve vision-bench`). Prints the lines docs/benchmarks.md quotes.
#
#   bench/vision.sh        # VISION_RUNS=5 runs of each prompt, medians
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
runs="${VISION_RUNS:-5}"
model=$(ensure_model mini)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A 640×480 RGB picture (smooth gradients and a few edges), written with the standard library.
python3 - "$work/photo.png" <<'EOF'
import math, struct, sys, zlib
w, h = 640, 480
rows = bytearray()
for y in range(h):
    rows.append(0)
    for x in range(w):
        r = int(127 + 120 * math.sin(x / 37.0))
        g = int(255 * y / (h - 1))
        b = 255 if (x // 80 + y // 60) % 2 else 30
        rows += bytes((r, g, b))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(bytes(rows), 6)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
EOF

# TTFT of one prompt, from `generate`'s own log line ("first token after X ms"), median of $runs.
ttft() {
  local ms=()
  for ((i = 0; i < runs; i++)); do
    ms+=("$(EPSERVE_LOG=info "$EPSERVE" generate --model "$model" --max-tokens 1 "$@" 2>&1 >/dev/null |
      sed -n 's/.*first token after \([0-9.]*\) ms.*/\1/p')")
  done
  printf '%s\n' "${ms[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

image_prompt=$("$EPSERVE" generate --model "$model" --prompt "Describe this picture." --chat --image "$work/photo.png" \
  --max-tokens 1 --json 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["prompt_tokens"]))')
# Ordinary text ids of mini's vocabulary (4096, specials at the top), as many as the image prompt.
text_ids=$(python3 -c "print(','.join(str(100 + i % 3000) for i in range($image_prompt)))")
with_image=$(ttft --prompt "Describe this picture." --chat --image "$work/photo.png")
text_only=$(ttft --tokens "$text_ids")
echo "mini, one 640×480 image (prompt $image_prompt tokens with its expansion), in process, median of $runs:"
echo "  TTFT with the image: $with_image ms; text-only prompt of the same length: $text_only ms"
echo
"$EPSERVE" vision-bench --layers "${VISION_LAYERS:-2}" --tiles "${VISION_TILES:-4}"
