#!/usr/bin/env bash
# epserve next to llama.cpp and Hugging Face transformers, on the same checkpoint (`mini`), in one run:
#
#   1. epserve in process        `epserve engine-bench` (the serving engine, no HTTP)
#   2. epserve up                `epserve up --workers 4`: gateway + coordinator + 4 expert workers over
#                                gRPC, measured with `epserve bench` through the gateway's /v1/completions
#   3. llama.cpp                 llama-cpp-python's OpenAI server (PyPI `llama-cpp-python[server]`,
#                                compiled here, CPU only) on the checkpoint converted to GGUF (f32; see COMPARE_GGUF_TYPE) with
#                                the converter in the same sdist, `--n_threads $(nproc)`, measured with the
#                                same `epserve bench` commands
#   4. transformers              `Llama4ForCausalLM.generate()` in process, f32, eager attention,
#                                torch.set_num_threads($(nproc)), batch 1 and batch 32 (left padding)
#   +  llama-server              llama.cpp's own `llama-server`, compiled from the same vendored llama.cpp
#                                (same GGUF, same threads, `-np 32` slots, continuous batching): the
#                                llama-cpp-python server handles one request at a time, so without this
#                                row the c=32 comparison would be against a server that cannot batch
#
# Quantities: output tokens/s at concurrency 1 and at concurrency 32 (closed loop, every output forced
# to COMPARE_OUTPUT_LEN tokens), and the time to first token of a COMPARE_TTFT_PROMPT_LEN-token prompt at
# concurrency 1. The systems run one after the other, never at the same time. Prints a markdown report:
# the machine, the absolute numbers, the ratios, and every command. A peer that cannot be installed or
# run gets a row that says why, and n/a in the ratios that need it.
#
# The peers are installed once into $EPSERVE_BENCH_CACHE (default target/bench-peers): two Python
# virtual environments (llama-cpp-python, compiled from its sdist: minutes; torch + transformers from
# PyPI: a ~3 GB download of CUDA wheels, unused here) and the GGUF file. Progress goes to stderr.
#
# Usage: bench/compare.sh
# Environment (defaults in brackets):
#   COMPARE_OUTPUT_LEN [64]       output tokens of every throughput request
#   COMPARE_PROMPT_LEN [64]       prompt tokens of every throughput request (BOS included)
#   COMPARE_C1_REQUESTS [8]       measured requests at concurrency 1
#   COMPARE_CONCURRENCY [32]      the high concurrency point (transformers: the batch size)
#   COMPARE_C32_REQUESTS [64]     measured requests at that concurrency (a multiple of it)
#   COMPARE_TTFT_PROMPT_LEN [512] prompt tokens of the TTFT requests (BOS included)
#   COMPARE_TTFT_REQUESTS [4]     measured TTFT requests
#   COMPARE_TTFT_OUTPUT_LEN [8]   output tokens of each TTFT request
#   COMPARE_WARMUP [2]            unmeasured requests before each HTTP measurement
#   COMPARE_SYSTEMS [epserve up llama.cpp llama-server transformers]  which to run (names as listed)
#   COMPARE_MODEL [mini]          the bench/common.sh preset
#   COMPARE_GGUF_TYPE [f32]       the GGUF llama.cpp runs: f32, or bf16 (the checkpoint's own
#                                 dtype, as many bytes per weight as epserve's default storage), or
#                                 q8_0 (convert_hf_to_gguf.py --outtype q8_0: 8-bit, an f16 scale per
#                                 32 weights, like epserve's int8), or q4_0 / q4_k_m (the bf16 GGUF,
#                                 then llama.cpp's llama-quantize, built from the same source as
#                                 llama-server; q4_0 = 4-bit, an f16 scale per 32, like epserve's int4)
#   COMPARE_EPSERVE_QUANTIZE []   int8 or int4: every epserve command gets `--quantize X
#                                 --quantize-scope SCOPE` (weights quantized at load); empty: as stored
#   COMPARE_EPSERVE_QUANTIZE_SCOPE [all]  that SCOPE (all: every matrix but the router)
#   COMPARE_EPSERVE_ACTIVATIONS []  bf16 or int8: every epserve command gets `--activations X` too
#                                 (bf16: the bf16 mode, `vdpbf16ps` on AVX512-BF16); empty: f32
#   LLAMA_CPP_PYTHON_VERSION [0.3.36], TORCH_VERSION [2.15.0], TRANSFORMERS_VERSION [5.23.0]
source "$(dirname "$0")/common.sh"

OUT_LEN="${COMPARE_OUTPUT_LEN:-64}"
PROMPT_LEN="${COMPARE_PROMPT_LEN:-64}"
C1_REQ="${COMPARE_C1_REQUESTS:-8}"
CONC="${COMPARE_CONCURRENCY:-32}"
CONC_REQ="${COMPARE_C32_REQUESTS:-64}"
TTFT_LEN="${COMPARE_TTFT_PROMPT_LEN:-512}"
TTFT_REQ="${COMPARE_TTFT_REQUESTS:-4}"
TTFT_OUT="${COMPARE_TTFT_OUTPUT_LEN:-8}"
WARMUP="${COMPARE_WARMUP:-2}"
SYSTEMS="${COMPARE_SYSTEMS:-epserve up llama.cpp llama-server transformers}"
PRESET="${COMPARE_MODEL:-mini}"
GGUF_TYPE="${COMPARE_GGUF_TYPE:-f32}"
EQ="${COMPARE_EPSERVE_QUANTIZE:-}"
EQ_SCOPE="${COMPARE_EPSERVE_QUANTIZE_SCOPE:-all}"
LCP_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
TORCH_VERSION="${TORCH_VERSION:-2.15.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
CACHE="${EPSERVE_BENCH_CACHE:-$root/target/bench-peers}"
THREADS="$(nproc)"
PY="${PYTHON:-python3}"
if (( CONC_REQ % CONC != 0 )); then
  echo "COMPARE_C32_REQUESTS ($CONC_REQ) must be a multiple of COMPARE_CONCURRENCY ($CONC)" >&2
  exit 1
fi
# GGUF_BASE: the type convert_hf_to_gguf.py writes before llama-quantize makes GGUF_TYPE (empty: the
# converter writes GGUF_TYPE itself). bf16 is the checkpoint's own dtype, so the base loses nothing.
case "$GGUF_TYPE" in
  f32|f16|bf16|q8_0) GGUF_BASE="" ;;
  q4_0|q4_k_m) GGUF_BASE=bf16 ;;
  *) echo "COMPARE_GGUF_TYPE must be f32, f16, bf16, q8_0, q4_0 or q4_k_m (got $GGUF_TYPE)" >&2; exit 1 ;;
esac
# The flags every epserve command gets; the environment's own EPSERVE_QUANTIZE* would otherwise apply
# to them unannounced.
# COMPARE_EPSERVE_ACTIVATIONS (bf16 or int8): every epserve command gets `--activations X` too.
EA="${COMPARE_EPSERVE_ACTIVATIONS:-}"
case "$EQ" in
  "") EQ_ARGS=() ;;
  int8|int4) EQ_ARGS=(--quantize "$EQ" --quantize-scope "$EQ_SCOPE") ;;
  *) echo "COMPARE_EPSERVE_QUANTIZE must be empty, int8 or int4 (got $EQ)" >&2; exit 1 ;;
esac
case "$EA" in
  "") ;;
  bf16|int8) EQ_ARGS+=(--activations "$EA") ;;
  *) echo "COMPARE_EPSERVE_ACTIVATIONS must be empty, bf16 or int8 (got $EA)" >&2; exit 1 ;;
esac
unset EPSERVE_QUANTIZE EPSERVE_QUANTIZE_SCOPE EPSERVE_ACTIVATIONS
# " --quantize X --quantize-scope S" for the commands lists, or nothing.
EQ_FLAGS="${EQ_ARGS[*]:+ ${EQ_ARGS[*]}}"
# The report names each system's weights when either side is quantized (otherwise as before).
QUANT_REPORT=""
if [ -n "$EQ" ] || [ -n "$EA" ] || [[ "$GGUF_TYPE" != f32 && "$GGUF_TYPE" != bf16 && "$GGUF_TYPE" != f16 ]]; then QUANT_REPORT=1; fi

mkdir -p "$CACHE/logs" "$CACHE/gguf" "$CACHE/results"
RUN="$CACHE/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RUN"
LOGS="$CACHE/logs"
HF_VENV="$CACHE/venv-hf"
LCP_VENV="$CACHE/venv-llama"
LCP_SRC="$CACHE/src/llama_cpp_python-$LCP_VERSION"
export PIP_DISABLE_PIP_VERSION_CHECK=1

progress() { echo "[compare $(date -u +%H:%M:%S)] $*" >&2; }
has() { [[ " $SYSTEMS " == *" $1 "* ]]; }
# fail SYSTEM MESSAGE: records why a system has no numbers.
fail() {
  progress "$1: $2"
  printf '%s' "$2" >"$RUN/$1.error"
}
# last_lines LOG: the end of a log, on one line, for an error message.
last_lines() { tail -n "${2:-6}" "$1" | tr '\n' ' ' | sed 's/  */ /g' | cut -c1-900; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# with_heartbeat LOG CMD...: runs CMD with output to LOG, printing the log's last progress line every 30 s.
with_heartbeat() {
  local log="$1" pid rc step
  shift
  "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    if kill -0 "$pid" 2>/dev/null; then
      step=$(grep -o '\[[0-9]*/[0-9]*\]' "$log" | tail -n 1 || true)
      progress "  ... ${step:-$(tail -c 2000 "$log" | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-120)}"
    fi
  done
  wait "$pid" && rc=0 || rc=$?
  return "$rc"
}

model=$(ensure_model "$PRESET")
machine_line=$(machine)
progress "$machine_line; checkpoint $model; results in $RUN"

# ---------------------------------------------------------------------------------------------------
# Prompts: JSONL files of text prompts that are exactly N tokens (BOS included) for this checkpoint's
# tokenizer: a first word that is one token, then words that are one token each with their leading
# space (checked by running the tokenizer's BPE merges), so the HTTP servers, which tokenize text, and
# transformers all see the same token counts. Distinct random prompts, so no prefix is shared.
"$PY" - "$model/tokenizer.json" "$RUN" "$PROMPT_LEN" "$TTFT_LEN" $((WARMUP + (C1_REQ > CONC_REQ ? C1_REQ : CONC_REQ) + 1)) $((WARMUP + TTFT_REQ)) <<'PY'
import json, random, sys
tok_path, out, plen, tlen, n, tn = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
n = max(n, 10)  # the same-model check below looks at up to 10
tok = json.load(open(tok_path))
vocab = tok["model"]["vocab"]
ranks = {}
for i, m in enumerate(tok["model"]["merges"]):
    a, b = m.split(" ", 1) if isinstance(m, str) else m
    ranks[(a, b)] = i
def bpe(word):
    parts = list(word)
    while len(parts) > 1:
        best = min(((ranks.get((parts[i], parts[i + 1]), 1 << 30), i) for i in range(len(parts) - 1)))
        if best[0] == 1 << 30:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts
firsts = sorted(w for w in vocab if w.isascii() and w.isalpha() and len(w) > 1 and bpe(w) == [w])
words = sorted(w for w in vocab if w.startswith("\u0120") and w[1:].isascii() and w[1:].isalpha() and bpe(w) == [w])
if not firsts or len(words) < 20:
    sys.exit(f"cannot build exact-length prompts: {len(firsts)} first words, {len(words)} words")
rng = random.Random(0)
for name, length, count in (("prompts", plen, n), ("ttft_prompts", tlen, tn)):
    with open(f"{out}/{name}.jsonl", "w") as f:
        for _ in range(count):
            text = rng.choice(firsts) + "".join(" " + rng.choice(words)[1:] for _ in range(length - 2))
            f.write(json.dumps({"prompt": text}) + "\n")
print(f"prompts: {len(firsts)} first words, {len(words)} single-token words", file=sys.stderr)
PY

# ---------------------------------------------------------------------------------------------------
# Installs (before any measurement, so that no compile runs while a system is measured).

# torch + transformers: also what llama.cpp's converter needs.
ensure_hf() {
  local log="$LOGS/install-hf.log" check
  check="import sys, torch, transformers; sys.exit(0 if (torch.__version__.split('+')[0], transformers.__version__) == ('$TORCH_VERSION', '$TRANSFORMERS_VERSION') else 1)"
  if [ -x "$HF_VENV/bin/python" ] && "$HF_VENV/bin/python" -c "$check" 2>/dev/null; then return 0; fi
  progress "installing torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION from PyPI into $HF_VENV (PyPI's torch brings CUDA wheels: ~3 GB; log $log)"
  local started=$SECONDS
  { [ -x "$HF_VENV/bin/python" ] || "$PY" -m venv "$HF_VENV"; } >"$log" 2>&1 || { HF_ERROR="creating the venv failed: $(last_lines "$log")"; return 1; }
  if ! with_heartbeat "$log.pip" "$HF_VENV/bin/python" -m pip install "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION"; then
    HF_ERROR="pip install torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION failed: $(last_lines "$log.pip")"
    return 1
  fi
  if ! "$HF_VENV/bin/python" -c "$check" >>"$log" 2>&1; then
    HF_ERROR="torch/transformers installed but not importable at the pinned versions: $(last_lines "$log")"
    return 1
  fi
  progress "torch + transformers installed in $((SECONDS - started)) s ($(du -sh "$HF_VENV" | cut -f1))"
}

LS_SRC="$CACHE/llama-server-src"
LS_BUILD="$CACHE/llama-server-build"
LS_BIN="$LS_BUILD/bin/llama-server"
LQ_BIN="$LS_BUILD/bin/llama-quantize"

# llama-cpp-python[server], compiled from its sdist (CPU only, -march=native), and the sdist unpacked
# for its convert_hf_to_gguf.py.
ensure_llama_cpp() {
  local log="$LOGS/install-llama-cpp.log" sdist check
  check="import llama_cpp, llama_cpp.server.app, sys; sys.exit(0 if llama_cpp.__version__ == '$LCP_VERSION' else 1)"
  sdist="$CACHE/sdist/llama_cpp_python-$LCP_VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    progress "downloading the llama-cpp-python $LCP_VERSION sdist (log $log)"
    { [ -x "$LCP_VENV/bin/python" ] || "$PY" -m venv "$LCP_VENV"; } >"$log" 2>&1 || { LCP_ERROR="creating the venv failed: $(last_lines "$log")"; return 1; }
    # The build backend and tools as wheels; then the sdist itself (metadata prepared with them).
    "$LCP_VENV/bin/python" -m pip install cmake ninja "scikit-build-core[pyproject]>=0.9.2" >>"$log" 2>&1 \
      && "$LCP_VENV/bin/python" -m pip download --no-deps --no-build-isolation --no-binary llama-cpp-python \
        "llama-cpp-python==$LCP_VERSION" -d "$CACHE/sdist" >>"$log" 2>&1 \
      || { LCP_ERROR="downloading llama-cpp-python==$LCP_VERSION failed: $(last_lines "$log")"; return 1; }
  fi
  if [ ! -f "$LCP_SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    mkdir -p "$CACHE/src" && tar xzf "$sdist" -C "$CACHE/src" \
      || { LCP_ERROR="unpacking $sdist failed"; return 1; }
  fi
  if [ "${1:-}" = source-only ]; then return 0; fi
  if [ -x "$LCP_VENV/bin/python" ] && "$LCP_VENV/bin/python" -c "$check" 2>/dev/null; then return 0; fi
  progress "compiling llama-cpp-python $LCP_VERSION (llama.cpp, CPU only, $THREADS jobs; 5-20 min on 2 cores; log $log.pip)"
  local started=$SECONDS
  { [ -x "$LCP_VENV/bin/python" ] || "$PY" -m venv "$LCP_VENV"; } >>"$log" 2>&1
  "$LCP_VENV/bin/python" -m pip install cmake ninja "scikit-build-core[pyproject]>=0.9.2" >>"$log" 2>&1 \
    || { LCP_ERROR="installing cmake/ninja/scikit-build-core failed: $(last_lines "$log")"; return 1; }
  if ! CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$THREADS" \
    with_heartbeat "$log.pip" "$LCP_VENV/bin/python" -m pip install -v --no-build-isolation "$sdist[server]"; then
    LCP_ERROR="building llama-cpp-python==$LCP_VERSION failed: $(grep -m3 -i 'error' "$log.pip" | tr '\n' ' ' | cut -c1-600) ... $(last_lines "$log.pip" 3)"
    return 1
  fi
  "$LCP_VENV/bin/python" -c "$check" >>"$log" 2>&1 || { LCP_ERROR="llama-cpp-python built but does not import: $(last_lines "$log")"; return 1; }
  progress "llama-cpp-python compiled and installed in $((SECONDS - started)) s ($(du -sh "$LCP_VENV" | cut -f1))"
}

# configure_llama_cpp LOG CMAKE NINJA: a copy of the vendored source in $LS_SRC, configured in $LS_BUILD,
# with one fix in the server's HTTP layer: after the last chunk of a streamed response the chunk
# provider returns false ("no more data"), which cpp-httplib takes as an abort and closes the
# connection, although the response advertised keep-alive; a client that reuses pooled connections
# (`epserve bench`, like most HTTP clients) then sees its next request fail. The provider has already
# called done() there, so returning true ends the body the same way and keeps the connection. Nothing
# in the model or the scheduler is touched (nor anything llama-quantize uses). patch_amx_tile_config
# follows.
configure_llama_cpp() {
  local log="$1" cmake_bin="$2" ninja_bin="$3"
  rm -rf "$LS_SRC" "$LS_BUILD"
  mkdir -p "$LS_SRC"
  tar -C "$LCP_SRC/vendor/llama.cpp" --exclude=./models --exclude=./docs -cf - . | tar -C "$LS_SRC" -xf - \
    || { BUILD_ERROR="copying the llama.cpp source failed"; return 1; }
  "$PY" - "$LS_SRC/tools/server/server-http.cpp" <<'FIX' >"$log" 2>&1 || { BUILD_ERROR="patching server-http.cpp failed: $(last_lines "$log")"; return 1; }
import re, sys
path = sys.argv[1]
src = open(path).read()
pattern = r"(if \(!has_next\) \{\s*sink\.done\(\);[^}]*\}\s*)return has_next;"
fixed, n = re.subn(pattern, r"\1return true;  // bench/compare.sh: done() ended the body; false would close the connection", src)
if n != 1:
    sys.exit(f"expected one chunk provider ending with done(); found {n}: the keep-alive fix does not apply to this llama.cpp")
open(path, "w").write(fixed)
print("patched", path)
FIX
  progress "configuring llama.cpp from the llama-cpp-python $LCP_VERSION sdist (log $log)"
  if ! "$cmake_bin" -S "$LS_SRC" -B "$LS_BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja_bin" \
      -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
      -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >>"$log" 2>&1; then
    BUILD_ERROR="cmake configure of llama.cpp failed: $(last_lines "$log")"
    return 1
  fi
  echo "$LCP_VERSION" >"$LS_SRC/.bench-configured"
  patch_amx_tile_config "$log" || return 1
}

# patch_amx_tile_config LOG: the second fix, in ggml's AMX matrix multiplication (used for q4_0, q8_0
# and k-quant weights on CPUs with AMX-INT8): ggml_tile_config_init() fills a 64-byte tile
# configuration on the stack and hands it to _tile_loadconfig (ldtilecfg), and GCC 12 drops the stores
# to its rows/colsb (it zeroes 32 bytes and sets the palette only), so ldtilecfg faults on a reserved
# field: llama-server dies with SIGSEGV on its first quantized matmul. An empty asm statement that takes
# the address, with a memory clobber, makes the compiler write the configuration first; the AMX code
# itself is unchanged (upstream: ggml-org/llama.cpp#20824, #26954). Idempotent, on a configured tree
# too; where the code is not there any more it does nothing. Writes $LS_SRC/.bench-amx (what it did).
patch_amx_tile_config() {
  local log="$1" file="$LS_SRC/ggml/src/ggml-cpu/amx/mmq.cpp" state
  state=$("$PY" - "$file" <<'FIX' 2>>"$log"
import os, re, sys
path = sys.argv[1]
if not os.path.exists(path):
    print("absent"); sys.exit()
src = open(path).read()
if "bench/compare.sh: GCC" in src:
    print("patched"); sys.exit()
fixed, n = re.subn(r"\n([ \t]*)_tile_loadconfig\(&tc\);",
                   r'\n\1asm volatile("" : : "r"(&tc) : "memory");  // bench/compare.sh: GCC 12 dropped the stores to tc'
                   r"\n\1_tile_loadconfig(&tc);", src)
if n != 1:
    print("absent"); sys.exit()
open(path, "w").write(fixed)
print("patched")
FIX
) || { BUILD_ERROR="patching ggml-cpu/amx/mmq.cpp failed: $(last_lines "$log")"; return 1; }
  echo "$state" >"$LS_SRC/.bench-amx"
}

# build_llama_cpp TARGET: one program of llama.cpp (llama-server, llama-quantize) from the same vendored
# source, in one build folder (cmake + ninja from the llama venv's PyPI wheels); BUILD_ERROR says why not.
# The source is copied and configured once per llama-cpp-python version (a tree from before the marker
# counts when llama-server was built in it); a second program is built in the same folder.
build_llama_cpp() {
  local target="$1" log="$LOGS/build-$1.log" cmake_bin ninja_bin started=$SECONDS bin="$LS_BUILD/bin/$1"
  BUILD_ERROR=""
  # Built, and after the AMX fix was applied to its source (a program built before is rebuilt: ninja
  # recompiles mmq.cpp and links).
  if [ -x "$bin" ] && [ -f "$LS_SRC/.bench-amx" ] && ! [ "$LS_SRC/.bench-amx" -nt "$bin" ]; then return 0; fi
  if ! "$LCP_VENV/bin/python" -c 'import cmake, ninja' 2>/dev/null; then
    { [ -x "$LCP_VENV/bin/python" ] || "$PY" -m venv "$LCP_VENV"; } >"$log" 2>&1
    "$LCP_VENV/bin/python" -m pip install cmake ninja >>"$log" 2>&1 || { BUILD_ERROR="pip install cmake ninja failed: $(last_lines "$log")"; return 1; }
  fi
  cmake_bin=$("$LCP_VENV/bin/python" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null) \
    && ninja_bin=$("$LCP_VENV/bin/python" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))' 2>/dev/null) \
    || { BUILD_ERROR="cmake/ninja (PyPI wheels in $LCP_VENV) are missing"; return 1; }
  if ! { [ -f "$LS_BUILD/build.ninja" ] \
      && { [ "$(cat "$LS_SRC/.bench-configured" 2>/dev/null)" = "$LCP_VERSION" ] || [ -x "$LS_BIN" ]; }; }; then
    configure_llama_cpp "$log" "$cmake_bin" "$ninja_bin" || return 1
  elif [ ! -f "$LS_SRC/.bench-amx" ]; then
    patch_amx_tile_config "$log" || return 1
  fi
  progress "compiling llama.cpp's $target from the llama-cpp-python $LCP_VERSION sdist (CPU only, $THREADS jobs; log $log.build)"
  if ! with_heartbeat "$log.build" "$cmake_bin" --build "$LS_BUILD" --target "$target" -j "$THREADS"; then
    BUILD_ERROR="building $target failed: $(grep -m3 -i 'error' "$log.build" | tr '\n' ' ' | cut -c1-600)"
    return 1
  fi
  progress "$target built in $((SECONDS - started)) s"
}

ensure_llama_server() { build_llama_cpp llama-server || { LS_ERROR="$BUILD_ERROR"; return 1; }; }

# The checkpoint as GGUF ($GGUF_TYPE), with the sdist's own converter (see bench/convert_gguf.py for the one
# workaround: the synthetic tokenizer's pre-tokenizer hash); q4_0 / q4_k_m: the converter's bf16 GGUF
# (cached too), then llama-quantize from the same source as llama-server.
gguf_path() { echo "$CACHE/gguf/$(basename "$model")-$1.gguf"; }
GGUF=$(gguf_path "$GGUF_TYPE")
# convert_gguf TYPE: writes $(gguf_path TYPE) with convert_hf_to_gguf.py --outtype TYPE unless it is newer
# than the checkpoint.
convert_gguf() {
  local type="$1" out log="$LOGS/convert-gguf.log"
  out=$(gguf_path "$1")
  echo "python bench/convert_gguf.py src/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp -- $model --outtype $type --outfile gguf/$(basename "$out")" >>"$RUN/gguf.commands"
  if [ -s "$out" ] && [ "$out" -nt "$model/model.safetensors" ]; then return 0; fi
  if [ -n "${HF_ERROR:-}" ]; then
    GGUF_ERROR="the GGUF conversion (convert_hf_to_gguf.py) needs torch + transformers, which are missing: $HF_ERROR"
    return 1
  fi
  progress "converting $model to GGUF $type with llama.cpp's convert_hf_to_gguf.py (log $log)"
  if ! "$HF_VENV/bin/python" "$root/bench/convert_gguf.py" "$LCP_SRC/vendor/llama.cpp" -- "$model" \
      --outtype "$type" --outfile "$out.tmp" >"$log" 2>&1; then
    rm -f "$out.tmp"
    GGUF_ERROR="convert_hf_to_gguf.py --outtype $type failed: $(grep -v '^INFO' "$log" | tail -n 4 | tr '\n' ' ' | cut -c1-900)"
    return 1
  fi
  mv "$out.tmp" "$out"
  progress "GGUF written: $out ($(du -h "$out" | cut -f1))"
}
ensure_gguf() {
  local base log="$LOGS/quantize-gguf.log" qtype
  if [ -z "$GGUF_BASE" ]; then convert_gguf "$GGUF_TYPE"; return; fi
  base=$(gguf_path "$GGUF_BASE")
  convert_gguf "$GGUF_BASE" || return 1
  qtype=$(echo "$GGUF_TYPE" | tr '[:lower:]' '[:upper:]')
  echo "llama-quantize gguf/$(basename "$base") gguf/$(basename "$GGUF") $qtype $THREADS" >>"$RUN/gguf.commands"
  if [ -s "$GGUF" ] && [ "$GGUF" -nt "$base" ]; then return 0; fi
  build_llama_cpp llama-quantize || { GGUF_ERROR="llama-quantize (for GGUF $GGUF_TYPE): $BUILD_ERROR"; return 1; }
  progress "quantizing $base to GGUF $GGUF_TYPE with llama.cpp's llama-quantize (log $log)"
  if ! "$LQ_BIN" "$base" "$GGUF.tmp" "$qtype" "$THREADS" >"$log" 2>&1; then
    rm -f "$GGUF.tmp"
    GGUF_ERROR="llama-quantize $qtype failed: $(last_lines "$log" 4)"
    return 1
  fi
  mv "$GGUF.tmp" "$GGUF"
  progress "GGUF written: $GGUF ($(du -h "$GGUF" | cut -f1))"
}
# gguf_types: the GGUF's tensors by type (count, MB, which tensors when not the main type), its size
# and the checkpoint's, on one line for the report.
gguf_types() {
  PYTHONPATH="$LCP_SRC/vendor/llama.cpp/gguf-py" "$HF_VENV/bin/python" - "$GGUF" "$model" <<'PY'
import collections, os, re, sys
from gguf import GGUFReader
path, model = sys.argv[1], sys.argv[2]
r = GGUFReader(path)
by = collections.defaultdict(lambda: [0, 0, set()])
for t in r.tensors:
    e = by[t.tensor_type.name.lower()]
    e[0] += 1
    e[1] += int(t.n_bytes)
    e[2].add(re.sub(r"^blk\.\d+\.", "blk.N.", t.name))
main = max(by, key=lambda k: by[k][1])
parts = []
for k, (n, b, names) in sorted(by.items(), key=lambda kv: -kv[1][1]):
    which = "" if k == main else ": " + ", ".join(sorted(names))
    parts.append(f"{k} {n} tensors {b / 1e6:.1f} MB{which}")
ckpt = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if f.endswith(".safetensors"))
print(f"file {os.path.getsize(path) / 1e6:.1f} MB (checkpoint safetensors {ckpt / 1e6:.1f} MB, vision tower included); " + "; ".join(parts))
PY
}

HF_ERROR=""
LCP_ERROR=""
LS_ERROR=""
GGUF_ERROR=""
if has transformers || has llama.cpp || has llama-server; then ensure_hf || progress "transformers: $HF_ERROR"; fi
if has llama.cpp; then
  ensure_llama_cpp || progress "llama.cpp: $LCP_ERROR"
elif has llama-server; then
  ensure_llama_cpp source-only || progress "llama-server: $LCP_ERROR"
fi
if has llama-server; then
  if [ -n "$LCP_ERROR" ] && [ ! -f "$LCP_SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    LS_ERROR="no llama.cpp source: $LCP_ERROR"
  else
    ensure_llama_server || progress "llama-server: $LS_ERROR"
  fi
fi
if has llama.cpp || has llama-server; then
  if [ -f "$LCP_SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    if ensure_gguf; then
      gguf_types >"$RUN/gguf.types" 2>"$LOGS/gguf-types.log" || progress "GGUF tensor types unreadable (log $LOGS/gguf-types.log)"
    else
      progress "GGUF: $GGUF_ERROR"
    fi
  else
    GGUF_ERROR="no converter (the llama-cpp-python sdist did not download): $LCP_ERROR"
  fi
  if [ -n "$GGUF_ERROR" ]; then
    LCP_ERROR="${LCP_ERROR:-$GGUF_ERROR}"
    LS_ERROR="${LS_ERROR:-$GGUF_ERROR}"
  fi
fi

# ---------------------------------------------------------------------------------------------------
# Measurements, one system at a time.

# bench_http NAME URL MODEL: the three `epserve bench` runs against an OpenAI-compatible server.
bench_http() {
  local name="$1" url="$2" served="$3"
  local common=(--url "$url" --model "$served" --warmup "$WARMUP" --json)
  local points=(
    "c1|--concurrency 1 --requests $C1_REQ --input-len $PROMPT_LEN --output-len $OUT_LEN --prompts $RUN/prompts.jsonl"
    "cN|--concurrency $CONC --requests $CONC_REQ --input-len $PROMPT_LEN --output-len $OUT_LEN --prompts $RUN/prompts.jsonl"
    "ttft|--concurrency 1 --requests $TTFT_REQ --input-len $TTFT_LEN --output-len $TTFT_OUT --prompts $RUN/ttft_prompts.jsonl"
  )
  local p key args
  for p in "${points[@]}"; do
    key="${p%%|*}"
    args="${p#*|}"
    progress "$name: epserve bench $args"
    # shellcheck disable=SC2086
    echo "epserve bench ${common[*]} $args" | sed "s|$RUN/||g" >>"$RUN/$name.commands"
    # shellcheck disable=SC2086
    if ! "$EPSERVE" bench "${common[@]}" $args >"$RUN/$name.$key.json" 2>"$LOGS/$name.$key.log"; then
      fail "$name" "epserve bench $args failed: $(last_lines "$LOGS/$name.$key.log" 4)"
      return 1
    fi
  done
}

# wait_http URL PID LOG: waits (up to 300 s) for URL to answer while PID lives.
wait_http() {
  local i
  for i in $(seq 1 3000); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

if has epserve; then
  progress "epserve in process: engine-bench (c=1, c=$CONC, TTFT)${EQ:+, weights $EQ (scope $EQ_SCOPE)}"
  # A first, unmeasured concurrency-1 pass is the warm-up (engine-bench has no --warmup).
  for spec in "c1|--concurrency 1,1 --requests-per-client $C1_REQ --prompt-len $PROMPT_LEN --max-tokens $OUT_LEN" \
              "cN|--concurrency $CONC --requests-per-client $((CONC_REQ / CONC)) --prompt-len $PROMPT_LEN --max-tokens $OUT_LEN" \
              "ttft|--concurrency 1,1 --requests-per-client $TTFT_REQ --prompt-len $TTFT_LEN --max-tokens $TTFT_OUT"; do
    key="${spec%%|*}"
    args="${spec#*|}"
    echo "epserve engine-bench --model $model $args$EQ_FLAGS" >>"$RUN/epserve.commands"
    # shellcheck disable=SC2086
    if ! "$EPSERVE" engine-bench --model "$model" $args "${EQ_ARGS[@]}" >"$RUN/epserve.$key.json" 2>"$LOGS/epserve.$key.log"; then
      fail epserve "epserve engine-bench $args failed: $(last_lines "$LOGS/epserve.$key.log" 4)"
      break
    fi
  done
fi

# Same-model check: greedy tokens for one of the throughput prompts, from each implementation (outside
# the measurements). epserve here; llama.cpp and transformers in their sections.
GREEDY_N=16
# `epserve generate` stops at an end-of-sequence token, so the check uses the first prompt whose
# continuation is GREEDY_N tokens without one.
for i in $(seq 1 10); do
  first_prompt=$("$PY" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readlines()[int(sys.argv[2])])["prompt"])' "$RUN/prompts.jsonl" "$((i - 1))")
  "$EPSERVE" generate --model "$model" --prompt "$first_prompt" --max-tokens "$GREEDY_N" "${EQ_ARGS[@]}" --json 2>/dev/null \
    | "$PY" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["tokens"]))' >"$RUN/epserve.greedy.json" || true
  [ "$("$PY" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$RUN/epserve.greedy.json" 2>/dev/null)" = "$GREEDY_N" ] && break
done
greedy_index=$((i - 1))

if has up; then
  port=$(free_port)
  progress "epserve up: 4 expert workers + coordinator + gateway on 127.0.0.1:$port${EQ:+, weights $EQ (scope $EQ_SCOPE)}"
  echo "epserve up --model $model --workers 4 --port $port$EQ_FLAGS" >"$RUN/up.commands"
  "$EPSERVE" up --model "$model" --workers 4 --port "$port" "${EQ_ARGS[@]}" >"$LOGS/up.log" 2>&1 &
  up_pid=$!
  WORKER_PIDS+=("$up_pid")
  if wait_http "http://127.0.0.1:$port/ready" "$up_pid"; then
    served=$(curl -sf "http://127.0.0.1:$port/v1/models" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
    bench_http up "http://127.0.0.1:$port/v1" "$served" || true
  else
    fail up "epserve up did not become ready: $(last_lines "$LOGS/up.log" 4)"
  fi
  stop_pid "$up_pid"
fi

if has llama.cpp; then
  if [ -n "$LCP_ERROR" ]; then
    fail llama.cpp "$LCP_ERROR"
  else
    port=$(free_port)
    lcp_args=(--model "$GGUF" --model_alias "$PRESET" --n_threads "$THREADS" --n_threads_batch "$THREADS"
      --n_ctx "$(( (TTFT_LEN + TTFT_OUT > PROMPT_LEN + OUT_LEN ? TTFT_LEN + TTFT_OUT : PROMPT_LEN + OUT_LEN) + 2048 ))"
      --interrupt_requests False --verbose False --host 127.0.0.1 --port "$port")
    progress "llama.cpp: llama-cpp-python server on 127.0.0.1:$port ($THREADS threads)"
    echo "python bench/llama_cpp_server.py ${lcp_args[*]}" | sed "s|$CACHE/||g" >"$RUN/llama.cpp.commands"
    "$LCP_VENV/bin/python" "$root/bench/llama_cpp_server.py" "${lcp_args[@]}" >"$LOGS/llama.cpp-server.log" 2>&1 &
    lcp_pid=$!
    WORKER_PIDS+=("$lcp_pid")
    if wait_http "http://127.0.0.1:$port/v1/models" "$lcp_pid"; then
      "$LCP_VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())' \
        >"$RUN/llama.cpp.sysinfo" 2>/dev/null || true
      bench_http llama.cpp "http://127.0.0.1:$port/v1" "$PRESET" || true
    else
      fail llama.cpp "llama-cpp-python's server did not start on the GGUF: $(grep -iE 'error|exception|fail' "$LOGS/llama.cpp-server.log" | tail -n 4 | tr '\n' ' ' | cut -c1-900)"
    fi
    stop_pid "$lcp_pid"
    "$LCP_VENV/bin/python" - "$GGUF" "$first_prompt" "$GREEDY_N" "$THREADS" >"$RUN/llama.cpp.greedy.json" 2>/dev/null <<'PY' || true
import json, sys
import llama_cpp
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
out = []
for t in llm.generate(llm.tokenize(prompt.encode(), add_bos=True, special=True), temp=0.0, repeat_penalty=1.0):
    out.append(t)
    if len(out) == n:
        break
print(json.dumps(out))
PY
  fi
fi

if has llama-server; then
  if [ -n "$LS_ERROR" ]; then
    fail llama-server "$LS_ERROR"
  else
    port=$(free_port)
    # One slot per client, each with room for the longest request; continuous batching is the default.
    slot=$(( (TTFT_LEN + TTFT_OUT > PROMPT_LEN + OUT_LEN ? TTFT_LEN + TTFT_OUT : PROMPT_LEN + OUT_LEN) + 256 ))
    ls_args=(-m "$GGUF" -a "$PRESET" -t "$THREADS" -tb "$THREADS" -np "$CONC" -c "$((slot * CONC))" --no-webui
      --host 127.0.0.1 --port "$port")
    progress "llama-server: llama.cpp's server on 127.0.0.1:$port ($THREADS threads, $CONC slots)"
    echo "llama-server ${ls_args[*]}" | sed "s|$CACHE/||g" >"$RUN/llama-server.commands"
    echo "built with a one-line keep-alive fix in tools/server/server-http.cpp (see bench/compare.sh)" >"$RUN/llama-server.note"
    if [ "$(cat "$LS_SRC/.bench-amx" 2>/dev/null)" = patched ] && [[ "$GGUF_TYPE" == q* ]]; then
      echo "built with a one-line keep-alive fix in tools/server/server-http.cpp and a compiler barrier in ggml-cpu/amx/mmq.cpp (GCC 12 dropped the AMX tile configuration's stores; see bench/compare.sh)" >"$RUN/llama-server.note"
    fi
    "$LS_BIN" "${ls_args[@]}" >"$LOGS/llama-server.log" 2>&1 &
    ls_pid=$!
    WORKER_PIDS+=("$ls_pid")
    if wait_http "http://127.0.0.1:$port/health" "$ls_pid"; then
      bench_http llama-server "http://127.0.0.1:$port/v1" "$PRESET" || true
    else
      fail llama-server "llama-server did not start on the GGUF: $(grep -iE 'error|exception|fail' "$LOGS/llama-server.log" | tail -n 4 | tr '\n' ' ' | cut -c1-900)"
    fi
    stop_pid "$ls_pid"
  fi
fi

if has transformers; then
  if [ -n "$HF_ERROR" ]; then
    fail transformers "$HF_ERROR"
  else
    progress "transformers: generate() in process (batch 1, batch $CONC, TTFT)"
    hf_args=(--model "$model" --threads "$THREADS" --prompts "$RUN/prompts.jsonl" --ttft-prompts "$RUN/ttft_prompts.jsonl"
      --output-len "$OUT_LEN" --c1-requests "$C1_REQ" --batch "$CONC" --batch-requests "$CONC_REQ" --ttft-requests "$TTFT_REQ"
      --greedy-tokens "$GREEDY_N" --greedy-index "$greedy_index")
    echo "python bench/compare_transformers.py ${hf_args[*]}" | sed "s|$RUN/||g" >"$RUN/transformers.commands"
    if "$HF_VENV/bin/python" "$root/bench/compare_transformers.py" "${hf_args[@]}" >"$RUN/transformers.json" 2>"$LOGS/transformers.log"; then
      "$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["greedy"]))' "$RUN/transformers.json" >"$RUN/transformers.greedy.json" || true
    else
      fail transformers "compare_transformers.py failed: $(grep -v '^\[transformers\]' "$LOGS/transformers.log" | tail -n 3 | tr '\n' ' ' | cut -c1-900)"
    fi
  fi
fi

# ---------------------------------------------------------------------------------------------------
# The report.
versions="epserve $(git -C "$root" rev-parse --short HEAD 2>/dev/null)$(git -C "$root" diff --quiet 2>/dev/null || echo '+dirty')"
[ -x "$LCP_VENV/bin/python" ] && versions+=", llama-cpp-python $("$LCP_VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || echo '?')"
[ -x "$HF_VENV/bin/python" ] && versions+=", $("$HF_VENV/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null || echo 'torch ?')"
GGUF_TYPE="$GGUF_TYPE" QUANT_REPORT="$QUANT_REPORT" EQ="$EQ" EQ_SCOPE="$EQ_SCOPE" EA="$EA" "$PY" - "$RUN" "$SYSTEMS" "$machine_line" "$versions" "$model" "$OUT_LEN" "$PROMPT_LEN" "$C1_REQ" "$CONC" "$CONC_REQ" \
  "$TTFT_LEN" "$TTFT_REQ" "$TTFT_OUT" "$WARMUP" "$THREADS" <<'PY' | tee "$RUN/report.md"
import json, os, sys
(run, systems, machine, versions, model, out_len, prompt_len, c1_req, conc, conc_req, ttft_len, ttft_req, ttft_out,
 warmup, threads) = sys.argv[1:]
systems = systems.split()

def read(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None

def text(path):
    try:
        return open(path).read().strip()
    except OSError:
        return ""

rows = {}
for name in ["epserve", "up", "llama.cpp", "llama-server", "transformers"]:
    r = {"error": text(f"{run}/{name}.error") or None, "commands": text(f"{run}/{name}.commands"), "extra": text(f"{run}/{name}.note")}
    if name not in systems:
        r["error"] = "not run (COMPARE_SYSTEMS)"
    elif not r["error"]:
        try:
            if name == "epserve":
                c1, cn, tt = (read(f"{run}/epserve.{k}.json") for k in ("c1", "cN", "ttft"))
                r.update(c1=c1[-1]["output_tokens_per_s"], cn=cn[-1]["output_tokens_per_s"], ttft=tt[-1]["ttft_p50_ms"],
                         ttft_prompt=int(ttft_len), prompt=int(prompt_len), out=c1[-1]["output_tokens"] / c1[-1]["requests"],
                         note="token-id prompts (engine-bench's own), no HTTP, first c=1 pass discarded as warm-up")
            elif name == "transformers":
                t = read(f"{run}/transformers.json")
                r.update(c1=t["c1"]["output_tokens_per_s"], cn=t["c32"]["output_tokens_per_s"], ttft=t["ttft"]["p50_ms"],
                         ttft_prompt=t["ttft"]["prompt_tokens"], prompt=t["prompt_tokens"], out=t["output_len"],
                         note=f"batch {t['c32']['batch']} = {t['c32']['requests'] // t['c32']['batch']} generate() call(s); "
                              "TTFT = generate(max_new_tokens=1); MoE computed densely over all experts (transformers' Llama4TextExperts)")
            else:
                c1, cn, tt = (read(f"{run}/{name}.{k}.json") for k in ("c1", "cN", "ttft"))
                bad = [f"{k}: {d['requests'] - d['requests_ok']} failed {d['errors']}" for k, d in (("c1", c1), (f"c{conc}", cn), ("ttft", tt))
                       if d["requests_ok"] != d["requests"]]
                short = [k for k, d in (("c1", c1), (f"c{conc}", cn)) if d["output_tokens"] < d["requests_ok"] * int(out_len)]
                r.update(c1=c1["output_tokens_per_s"], cn=cn["output_tokens_per_s"], ttft=tt["ttft"]["p50_ms"],
                         ttft_prompt=tt["prompt_tokens"] / max(tt["requests_ok"], 1), prompt=c1["prompt_tokens"] / max(c1["requests_ok"], 1),
                         out=c1["output_tokens"] / max(c1["requests_ok"], 1),
                         note="; ".join([r["extra"]] * bool(r["extra"]) + bad + [f"outputs shorter than {out_len} tokens at {', '.join(short)}"] * bool(short)))
        except Exception as e:  # a result file that is missing or malformed
            r["error"] = f"result unreadable: {type(e).__name__}: {e}"
    rows[name] = r

label = {
    "epserve": "epserve in process (`engine-bench`)",
    "up": "`epserve up` (gateway + coordinator + 4 gRPC expert workers)",
    "llama.cpp": f"llama.cpp (llama-cpp-python server, GGUF {os.environ['GGUF_TYPE']})",
    "llama-server": "llama.cpp's own `llama-server` (same source and GGUF)",
    "transformers": "transformers (`generate()`, f32, eager)",
}
# With quantized weights on either side (COMPARE_EPSERVE_QUANTIZE, or a quantized COMPARE_GGUF_TYPE) every
# row and the title name each system's weights; otherwise the report reads as it always has.
quant_report = bool(os.environ.get("QUANT_REPORT"))
gguf_type, eq, eq_scope = os.environ["GGUF_TYPE"], os.environ.get("EQ", ""), os.environ.get("EQ_SCOPE", "")
ep_weights = f"{eq} {eq_scope}" if eq else "bf16 as stored"
ea = os.environ.get("EA", "")
if ea:
    ep_weights += f", {ea} activations"
if quant_report:
    label["epserve"] = f"epserve in process (`engine-bench`, {ep_weights})"
    label["up"] = f"`epserve up` (gateway + coordinator + 4 gRPC expert workers, {ep_weights})"
    label["llama-server"] = f"llama.cpp's own `llama-server` (GGUF {gguf_type})"
fmt = lambda v, d=1: "n/a" if v is None else f"{v:,.{d}f}"
if quant_report:
    print(f"## epserve ({ep_weights}) vs llama.cpp (GGUF {gguf_type}) vs transformers (f32) on `{os.path.basename(model)}`\n")
else:
    print(f"## epserve vs llama.cpp vs transformers on `{os.path.basename(model)}`\n")
print(f"{machine}; {threads} threads for every system; {versions}\n")
quant_vars = f" COMPARE_GGUF_TYPE={gguf_type} COMPARE_EPSERVE_QUANTIZE={eq} COMPARE_EPSERVE_QUANTIZE_SCOPE={eq_scope}" if quant_report else ""
quant_vars += f" COMPARE_EPSERVE_ACTIVATIONS={ea}" if ea else ""
print(f"Command: `bench/compare.sh` (COMPARE_OUTPUT_LEN={out_len} COMPARE_PROMPT_LEN={prompt_len} COMPARE_C1_REQUESTS={c1_req} "
      f"COMPARE_CONCURRENCY={conc} COMPARE_C32_REQUESTS={conc_req} COMPARE_TTFT_PROMPT_LEN={ttft_len} COMPARE_TTFT_REQUESTS={ttft_req} "
      f"COMPARE_TTFT_OUTPUT_LEN={ttft_out} COMPARE_WARMUP={warmup}{quant_vars})\n")
# What the bf16 mode does on this CPU: `vdpbf16ps` needs AVX512-BF16; without it the mode's products
# are the exact f32 ones over the bf16 weights (docs/model.md).
cpu_flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
bf16_mode = ("rows rounded to bf16, `vdpbf16ps`" if "avx512_bf16" in cpu_flags
             else "no AVX512-BF16 on this CPU: products as in f32 compute, "
                  + ("AVX-512" if "avx512f" in cpu_flags else "AVX2" if "avx2" in cpu_flags else "portable") + " kernels")
if quant_report:
    ep_desc = (f"`--quantize {eq} --quantize-scope {eq_scope}`, quantized at load ({'8' if eq == 'int8' else '4'}-bit symmetric, "
               "an f16 scale per 32 weights; router, norms and embeddings as stored)") if eq else \
              "the checkpoint's bf16 matrices as stored (" + (bf16_mode if ea == "bf16" else "f32 compute") + ")"
    types = text(f"{run}/gguf.types")
    print(f"Weights: epserve {ep_desc}; llama.cpp GGUF {gguf_type}" + (f" ({types})" if types else "")
          + "; transformers the checkpoint in f32.\n")
print(f"Closed loop; greedy; every output forced to {out_len} tokens; prompts of {prompt_len} tokens (BOS included) for the "
      f"throughput points and {ttft_len} tokens for TTFT (p50 of {ttft_req}, concurrency 1). HTTP systems: `epserve bench`, "
      f"{warmup} warm-up requests per point, TTFT = first streamed text.\n")
print(f"| system | output tok/s, c=1 | output tok/s, c={conc} | TTFT p50 ms, {ttft_len}-token prompt | prompt / output tokens per request | notes |")
print("| --- | ---: | ---: | ---: | ---: | --- |")
for name, r in rows.items():
    if r["error"]:
        print(f"| {label[name]} | n/a | n/a | n/a | | **did not run**: {r['error'].replace('|', '/')} |")
    else:
        print(f"| {label[name]} | {fmt(r['c1'])} | {fmt(r['cn'])} | {fmt(r['ttft'], 0)} | {fmt(r['prompt'], 0)} / {fmt(r['out'], 0)} "
              f"(TTFT prompt {fmt(r['ttft_prompt'], 0)}) | {r['note']} |")

def ratio(a, key_a, b, key_b, lower_is_better=False):
    ra, rb = rows[a], rows[b]
    if ra["error"] or rb["error"]:
        return "n/a"
    x, y = ra[key_a], rb[key_b]
    if not x or not y:
        return "n/a"
    return f"{(y / x if lower_is_better else x / y):.2f}×"

print("\n| ratio | value |")
print("| --- | ---: |")
print(f"| epserve in process ÷ llama.cpp, tok/s at c=1 | {ratio('epserve', 'c1', 'llama.cpp', 'c1')} |")
print(f"| epserve in process ÷ llama.cpp, tok/s at c={conc} | {ratio('epserve', 'cn', 'llama.cpp', 'cn')} |")
print(f"| `epserve up` ÷ epserve in process, tok/s at c={conc} | {ratio('up', 'cn', 'epserve', 'cn')} |")
print(f"| `epserve up` ÷ llama.cpp, tok/s at c=1 / c={conc} (both over HTTP) | {ratio('up', 'c1', 'llama.cpp', 'c1')} / {ratio('up', 'cn', 'llama.cpp', 'cn')} |")
print(f"| epserve in process ÷ llama-server, tok/s at c=1 / c={conc} | {ratio('epserve', 'c1', 'llama-server', 'c1')} / {ratio('epserve', 'cn', 'llama-server', 'cn')} |")
print(f"| `epserve up` ÷ llama-server, tok/s at c=1 / c={conc} (both over HTTP) | {ratio('up', 'c1', 'llama-server', 'c1')} / {ratio('up', 'cn', 'llama-server', 'cn')} |")
print(f"| epserve in process ÷ transformers, tok/s at c=1 | {ratio('epserve', 'c1', 'transformers', 'c1')} |")
print(f"| epserve in process ÷ transformers, tok/s at c={conc} | {ratio('epserve', 'cn', 'transformers', 'cn')} |")
print(f"| llama.cpp TTFT ÷ epserve in process TTFT (above 1: epserve answers first sooner) | {ratio('epserve', 'ttft', 'llama.cpp', 'ttft', True)} |")
print(f"| llama-server TTFT ÷ epserve in process TTFT (above 1: epserve answers first sooner) | {ratio('epserve', 'ttft', 'llama-server', 'ttft', True)} |")
print(f"| transformers TTFT ÷ epserve in process TTFT (above 1: epserve answers first sooner) | {ratio('epserve', 'ttft', 'transformers', 'ttft', True)} |")

print("\nCommands (run by bench/compare.sh, in this order; paths relative to the run's folder or the peer cache):\n")
gguf_commands = text(f"{run}/gguf.commands")
if quant_report and gguf_commands and ("llama.cpp" in systems or "llama-server" in systems):
    print(f"- GGUF {gguf_type} (made once, then read from the peer cache):")
    for line in gguf_commands.splitlines():
        print(f"  - `{line}`")
for name, r in rows.items():
    if r["commands"]:
        print(f"- {label[name]}:")
        for line in r["commands"].splitlines():
            print(f"  - `{line}`")
notes = []
ref = read(f"{run}/epserve.greedy.json")
if ref:
    same = []
    for name in ("llama.cpp", "transformers"):
        other = read(f"{run}/{name}.greedy.json")
        if other:
            k = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), min(len(ref), len(other)))
            same.append(f"{name} {k}/{len(ref)}")
    if same:
        notes.append(f"Same model check: of the {len(ref)} greedy tokens `epserve generate` continues one of the prompts with, the "
                     f"number each peer reproduces before its first difference: {', '.join(same)}."
                     + (f" Each side ran with its own weights here (epserve {ep_weights}, llama.cpp GGUF {gguf_type}, "
                        "transformers f32), so quantization alone can end the agreement early." if quant_report else ""))
if "llama.cpp" in systems and not rows["llama.cpp"]["error"]:
    notes.append("llama-cpp-python's server runs one request at a time (one `Llama` object behind a lock; "
                 "no continuous batching), so at c>1 the requests queue: its c=%s number is that server's, not llama.cpp's "
                 "batched `llama-server`'s (its own row)." % conc)
    si = text(f"{run}/llama.cpp.sysinfo")
    if si:
        notes.append(f"llama.cpp CPU backend: `{si}`")
if notes:
    print("\nNotes:\n")
    for n in notes:
        print(f"- {n}")
print(f"\nRaw results: {run}")
PY
