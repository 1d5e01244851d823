#!/usr/bin/env bash
# CPU a proxy spends per unit of work, user and system apart, in front of one
# instant sim replica: per small request at a fixed open-loop rate, or per
# relayed SSE chunk (closed loop). Less noisy than req/s on a shared machine,
# since it divides the proxy's own CPU time (/proc/<pid>/stat utime, stime)
# by the work it did. Targets run in turn, ROUNDS rounds, so a slow spell hits
# each alike.
#
#   bash loadtest/cpu_cost.sh req  infergate=target/release nginx
#   bash loadtest/cpu_cost.sh sse  old=/tmp/old new=target/release
#
# A target is `nginx` (started by loadtest/peers.sh: one worker, no buffering)
# or NAME=DIR, DIR holding an `infergate` binary. Env: ROUNDS (3), RATE (5000),
# DUR (5 s), POLICY (least_request), WORKERS (2), AUTH (none; `keys`: infergate
# checks a generated file of 1,000 API keys and every request sends one; nginx
# gets the header and ignores it), PERF (a file: `perf record -g` the proxy's
# process during the load of the last round, for infergate targets),
# BENCH_BASE_PORT (18400: the upstream takes +1, the proxy +10 and +11). Needs
# release binaries.
# The load tool is infergate-load, or oha when LOADER=oha and oha is on PATH.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=${1:?usage: cpu_cost.sh req|sse TARGET...}; shift
ROUNDS=${ROUNDS:-3}; RATE=${RATE:-5000}; DUR=${DUR:-5}
POLICY=${POLICY:-least_request}; WORKERS=${WORKERS:-2}
BIN=${BIN:-target/release}  # the sim and the load tool
LOAD=$BIN/infergate-load
BASE=${BENCH_BASE_PORT:-18400}
UP_PORT=$((BASE + 1)); PX_PORT=$((BASE + 10)); ADMIN_PORT=$((BASE + 11))
RUN=$(mktemp -d /tmp/cpu-cost.XXXXXX)
cat >"$RUN/gw.yaml" <<YAML
listeners:
  main: { address: "127.0.0.1:$PX_PORT", workers: $WORKERS }
  admin: { address: "127.0.0.1:$ADMIN_PORT" }
logging: { level: warn }
pools:
  - name: bench
    endpoints: ["http://127.0.0.1:$UP_PORT"]
routes:
  - model: bench-model
    pool: bench
    routing: { policy: $POLICY }
YAML
HDR=()
if [[ ${AUTH:-none} == keys ]]; then
  for i in $(seq 1000); do
    printf -- '- {id: k%d, sha256: %s, team: t%d}\n' "$i" \
      "$(printf 'sk-bench-%d' "$i" | sha256sum | cut -d' ' -f1)" "$((i % 10))"
  done >"$RUN/keys.yaml"
  printf 'auth: { mode: keys, key_file: %s }\n' "$RUN/keys.yaml" >>"$RUN/gw.yaml"
  HDR=(-H "authorization:Bearer sk-bench-1000")
fi
LOADER=${LOADER:-infergate-load}
if [[ $LOADER == oha ]] && ! command -v oha >/dev/null; then
  echo "# oha not on PATH: using infergate-load"; LOADER=infergate-load
fi
export INFERGATE_PEERS_RUN="$RUN"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  bash loadtest/peers.sh stop >/dev/null 2>&1 || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_http() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; return 1; }
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }  # utime stime, in clock ticks

one() {  # target -> "user+system" microseconds per unit
  local t=$1 px worker
  "$BIN/infergate" sim --profile llama-8b-h100 --replicas 1 --base-port "$UP_PORT" \
    --time-scale 1000000 --served-model-name bench-model >/dev/null 2>&1 &
  local sim=$!; PIDS+=("$sim")
  wait_http "http://127.0.0.1:$UP_PORT/health"
  if [[ $t == nginx ]]; then
    bash loadtest/peers.sh start nginx --port "$PX_PORT" --upstreams "http://127.0.0.1:$UP_PORT" \
      --name cpu-nginx >/dev/null
    px=$(cat "$RUN/cpu-nginx.pid")
    worker=$(pgrep -P "$px" | head -1)
  else
    "${t#*=}/infergate" serve --config "$RUN/gw.yaml" >/dev/null 2>&1 &
    px=$!; PIDS+=("$px"); wait_http "http://127.0.0.1:$ADMIN_PORT/readyz"
    worker=$px
  fi
  local perf_pid=
  if [[ -n ${PERF:-} && $t != nginx && $r == "$ROUNDS" ]]; then
    perf record -q -F 1999 -g -p "$px" -o "$PERF.${t%%=*}" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  read -r u0 s0 < <(ticks "$worker")
  if [[ $MODE == req && $LOADER == oha ]]; then
    # oha's open loop: -q is the total rate; its JSON has no request count,
    # so count the answers it saw.
    oha --no-tui --output-format json -q "$RATE" -z "${DUR}s" -c 64 -m POST "${HDR[@]}" \
      -H 'content-type: application/json' \
      -d '{"model":"bench-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
      "http://127.0.0.1:$PX_PORT/v1/chat/completions" >"$RUN/oha.json" 2>/dev/null
    python3 -c "import json; v=json.load(open('$RUN/oha.json')); print(json.dumps({'ok': sum(v.get('statusCodeDistribution', {}).values())}))" >"$RUN/out.json"
    field=ok
  elif [[ $MODE == req ]]; then
    "$LOAD" --url "http://127.0.0.1:$PX_PORT" --model bench-model --json --workload small "${HDR[@]}" \
      --max-tokens 1 --rate "$RATE" -d "$DUR" --max-in-flight 64 >"$RUN/out.json" 2>/dev/null
    field=ok
  else
    "$LOAD" --url "http://127.0.0.1:$PX_PORT" --model bench-model --json --workload stream "${HDR[@]}" \
      --max-tokens 256 -c 32 -d "$DUR" --no-usage >"$RUN/out.json" 2>/dev/null
    field=output_tokens
  fi
  read -r u1 s1 < <(ticks "$worker")
  if [[ -n $perf_pid ]]; then kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true; fi
  if [[ $t == nginx ]]; then bash loadtest/peers.sh stop cpu-nginx >/dev/null; else kill "$px"; fi
  kill "$sim" 2>/dev/null || true; wait "$px" "$sim" 2>/dev/null || true
  python3 - "$RUN/out.json" "$field" "$u0" "$s0" "$u1" "$s1" "$(getconf CLK_TCK)" <<'PY'
import json, sys
out, field, u0, s0, u1, s1, hz = sys.argv[1:]
n = json.load(open(out)).get(field) or 0
us = lambda a, b: (int(b) - int(a)) * 1e6 / int(hz) / max(n, 1)
print(f"{us(u0, u1):.2f}+{us(s0, s1):.2f}", end="")
PY
}

declare -A RES
for r in $(seq "$ROUNDS"); do
  for t in "$@"; do RES[$t]="${RES[$t]:-} $(r=$r one "$t")"; done
done
unit=$([[ $MODE == req ]] && echo "small request at $RATE req/s" || echo "relayed SSE chunk")
echo "# CPU per $unit, user+system µs, $ROUNDS rounds (policy $POLICY, auth ${AUTH:-none}, load $LOADER)"
for t in "$@"; do echo "  ${t%%=*}:${RES[$t]}"; done
