#!/usr/bin/env bash
# Peer routers on a fleet of `infergate sim` replicas.
#
# Starts `infergate sim` (3 replicas on ephemeral ports), then vllm-router and
# sglang-router in front of it (each with --policy cache_aware, then
# round_robin), and checks through every router: non-streaming chat and
# completions, streaming chat with usage and [DONE], and that concurrent
# requests spread over more than one replica (read from each replica's
# /admin/stats). Prints PASS/FAIL per check; exit status 1 if any failed.
#
# Needs the peers venv (bash ../shared/peers/setup.sh --no-torch -> /tmp/peers-venv)
# and a built binary (cargo build [--release]). Everything listens on 127.0.0.1;
# the script stops only the processes it started.
#
#   bash loadtest/peers_on_sim.sh    # env: INFERGATE_BIN, PEERS_VENV, POLICIES="cache_aware round_robin"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEERS_VENV:-/tmp/peers-venv}"
TOK="${PEERS_TOKENIZER:-/tmp/peers-tokenizer}"
BIN="${INFERGATE_BIN:-}"
if [[ -z $BIN ]]; then
  for b in "$ROOT/target/release/infergate" "$ROOT/target/debug/infergate"; do
    [[ -x $b ]] && { BIN=$b; break; }
  done
fi
[[ -x ${BIN:-} ]] || { echo "no infergate binary: run cargo build first (or set INFERGATE_BIN)" >&2; exit 2; }
for tool in vllm-router sglang-router; do
  [[ -x "$VENV/bin/$tool" ]] || { echo "missing $VENV/bin/$tool: bash ../shared/peers/setup.sh --no-torch" >&2; exit 2; }
done
command -v curl >/dev/null || { echo "curl is required" >&2; exit 2; }

export HF_ENDPOINT="http://127.0.0.1:9" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

RUN=$(mktemp -d /tmp/peers-on-sim.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
}
trap cleanup EXIT

stop_pid() {  # TERM, then KILL after 1 s (routers drain slowly)
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 10); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

MODEL=sim-model
REPLICAS=3
"$BIN" sim --profile llama-8b-h100 --replicas $REPLICAS --base-port 0 --time-scale 10 \
  --served-model-name $MODEL --model-path "$TOK" >"$RUN/sim.out" 2>"$RUN/sim.log" &
PIDS+=($!)
for _ in $(seq 100); do [[ $(wc -l <"$RUN/sim.out") -ge $REPLICAS ]] && break; sleep 0.1; done
mapfile -t URLS < <(awk '{print $3}' "$RUN/sim.out")
[[ ${#URLS[@]} -eq $REPLICAS ]] || { echo "sim did not start: $(cat "$RUN/sim.log")" >&2; exit 1; }
echo "sim replicas: ${URLS[*]}"

FAILS=0
check() {  # name, then a command that must succeed
  local name=$1; shift
  if "$@" >"$RUN/check.out" 2>&1; then echo "PASS $name (t=${SECONDS}s)"; else echo "FAIL $name: $(head -c 400 "$RUN/check.out")"; FAILS=$((FAILS + 1)); fi
}

total_generation_requests() {
  local sum=0 n
  for u in "${URLS[@]}"; do
    n=$(curl -s "$u/admin/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation_requests"])')
    sum=$((sum + n))
  done
  echo $sum
}
replicas_used_since() {  # baseline counts "a b c" -> number of replicas whose count grew
  local -a base=($1) used=0 i=0 n
  for u in "${URLS[@]}"; do
    n=$(curl -s "$u/admin/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation_requests"])')
    ((n > base[i])) && used=$((used + 1))
    i=$((i + 1))
  done
  echo $used
}
counts() {
  for u in "${URLS[@]}"; do
    curl -s "$u/admin/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation_requests"], end=" ")'
  done
}

chat_json() {  # router_url
  curl -sf -m 30 "$1/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hello through the router\"}],\"max_tokens\":8}" |
    python3 -c 'import json,sys; v=json.load(sys.stdin); assert v["usage"]["completion_tokens"]==8, v; assert v["choices"][0]["finish_reason"]=="length", v'
}
completion_json() {
  curl -sf -m 30 "$1/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"$MODEL\",\"prompt\":\"once upon a time\",\"max_tokens\":5}" |
    python3 -c 'import json,sys; v=json.load(sys.stdin); assert v["usage"]["completion_tokens"]==5, v; assert v["object"]=="text_completion", v'
}
chat_stream() {
  curl -sfN -m 30 "$1/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"stream please\"}],\"max_tokens\":6,\"stream\":true,\"stream_options\":{\"include_usage\":true}}" |
    python3 -c '
import json,sys
events=[l[6:] for l in sys.stdin.read().split("\n") if l.startswith("data: ")]
assert events[-1]=="[DONE]", events[-3:]
chunks=[json.loads(e) for e in events[:-1]]
text="".join(c["choices"][0]["delta"].get("content","") for c in chunks if c["choices"])
assert len(text)==6*4, repr(text)
assert chunks[-1]["usage"]["completion_tokens"]==6, chunks[-1]'
}
spread() {  # router_url: 12 concurrent requests with distinct prefixes reach >= 2 replicas
  local base t0=$SECONDS; base=$(counts)
  local -a jobs=()
  for i in $(seq 12); do
    curl -sf -m 30 -o /dev/null "$1/v1/chat/completions" -H 'content-type: application/json' \
      -d "{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"$RANDOM$i$RANDOM $(head -c 300 /dev/urandom | base64 -w0 | tr -d '/+=')\"}],\"max_tokens\":40}" &
    jobs+=($!)
  done
  wait "${jobs[@]}"
  local used; used=$(replicas_used_since "$base")
  echo "replicas used: $used (counts before: $base, after: $(counts)), $((SECONDS - t0)) s"
  ((used >= 2))
}

run_router() {  # name policy -> starts it, runs the checks, stops it
  local name=$1 policy=$2 port mport pid
  port=$(free_port); mport=$(free_port)
  if [[ $name == vllm-router ]]; then
    "$VENV/bin/vllm-router" --host 127.0.0.1 --port "$port" --worker-urls "${URLS[@]}" \
      --policy "$policy" --prometheus-host 127.0.0.1 --prometheus-port "$mport" \
      --worker-startup-check-interval 1 --worker-startup-timeout-secs 60 >"$RUN/$name-$policy.log" 2>&1 &
  else
    "$VENV/bin/sglang-router" launch --host 127.0.0.1 --port "$port" --worker-urls "${URLS[@]}" \
      --policy "$policy" --prometheus-host 127.0.0.1 --prometheus-port "$mport" \
      --worker-startup-check-interval 1 --worker-startup-timeout-secs 60 >"$RUN/$name-$policy.log" 2>&1 &
  fi
  pid=$!
  PIDS+=($pid)
  local url="http://127.0.0.1:$port" ready=0
  for _ in $(seq 300); do
    if curl -s "$url/readiness" 2>/dev/null | grep -q "\"healthy_workers\":$REPLICAS[,}]"; then ready=1; break; fi
    sleep 0.1
  done
  if ((ready == 0)); then
    # sglang-router registers workers asynchronously; fall back to a working request.
    for _ in $(seq 100); do chat_json "$url" >/dev/null 2>&1 && { ready=1; break; }; sleep 0.2; done
  fi
  check "$name $policy: ready with $REPLICAS workers" test $ready -eq 1
  check "$name $policy: chat JSON" chat_json "$url"
  check "$name $policy: completions JSON" completion_json "$url"
  check "$name $policy: chat SSE with usage and [DONE]" chat_stream "$url"
  check "$name $policy: concurrent requests spread over replicas" spread "$url"
  stop_pid "$pid"
}

for policy in ${POLICIES:-cache_aware round_robin}; do
  run_router vllm-router $policy
  run_router sglang-router $policy
done

echo "total generation requests seen by the sim replicas: $(total_generation_requests)"
if ((FAILS > 0)); then echo "$FAILS check(s) failed; logs in $RUN"; exit 1; fi
cleanup
rm -rf "$RUN"
echo "all checks passed"
