#!/usr/bin/env bash
# Side-by-side data-plane benchmark: direct, infergate, nginx, vllm-router and
# sglang-router in front of the SAME fast upstream (one `infergate sim` replica
# whose modelled durations are divided by 1e6, so it answers at once), all on
# loopback, in one run: each phase runs ROUNDS rounds of every target in turn
# and reports the median. Prints for each:
#   - req/s for small non-streaming completions at saturation (closed loop)
#   - added p50 / p99 latency vs direct at half of infergate's saturation rate (LAT_RATE: a fixed rate) (open loop
#     over a fixed set of LAT_CONNS keep-alive connections, as wrk2 does; an arrival
#     finding them all busy waits in the client and shows as schedule lag, printed too)
#   - SSE chunks relayed per second (streaming, many tokens per request), and the
#     proxy's own CPU (user + system over its process tree) per relayed chunk: on
#     a shared 2-core machine the load tool and the upstream take most of the CPU,
#     so chunks/s moves less than the proxy's cost does
#   - peak RSS of the proxy (VmHWM, summed over its process tree)
# then infergate's ratios to each, and the RSS of infergate holding 10,000
# idle open streams.
#
# Not run in CI (it takes minutes and wants the machine to itself). Peers come
# from ../shared/peers/setup.sh (/tmp/peers-venv, nginx); missing ones are skipped.
#
#   loadtest/dataplane_bench.sh            # defaults below; env overrides:
#   SKIP_BUILD=1 DUR=6 ROUNDS=3 CONC=64 LAT_CONNS=64 SSE_CONC=32 SSE_TOKENS=256 IDLE_STREAMS=10000 IG_POLICY=least_request loadtest/dataplane_bench.sh
#   IG_BASELINE=/path/to/old/infergate loadtest/dataplane_bench.sh   # adds that build as target
#       "baseline", in the same interleaved rounds: a before/after comparison of a change
#       (with IG_AUTH=keys the baseline runs with the keys too)
#   IG_AUTH=keys loadtest/dataplane_bench.sh   # adds target "infergate-keys": the same gateway with
#       `auth: keys` (a generated key file of IG_KEYS keys, default 1000), every request sending
#       `Authorization: Bearer` one of them, in the same interleaved rounds: the cost of authentication
#   IG_AUDIT=1 loadtest/dataplane_bench.sh     # adds target "infergate-audit": the same gateway with a
#       price for the model and `audit: { output: FILE }` (one JSON line per request to a file), in the
#       same interleaved rounds: the cost of the audit log (the usage ledger is always on)
#   IG_QUOTA=1 REDIS_URL=redis://127.0.0.1:PORT loadtest/dataplane_bench.sh   # adds targets
#       "quota-local" (the same gateway with a quota on every caller, counted in-process) and,
#       with REDIS_URL, "quota-redis" (the same quota shared through that Redis), in the same
#       interleaved rounds: the cost of quotas (loadtest/quota_bench.sh starts the Redis)
#   PEERS=0 ...                                # skip nginx, vllm-router and sglang-router
#   IDLE_ONLY=1 SKIP_BUILD=1 IG_AUTH=keys IG_POLICY=inference_aware loadtest/dataplane_bench.sh
#       # the idle-stream phase alone (memory per open stream); IG=path measures another build
#   When `oha` is on PATH (cargo install oha), the saturation phase runs once more with oha
#   as the load tool (same connections, duration and rounds; OHA=0 skips it), an
#   independent client for the req/s ratios.
#   PHASES=sat,lat                             # which phases run (default sat,lat,sse; oha rides
#       on sat); a skipped phase reports 0. Without sat, set LAT_RATE.
#   LAT_ROUNDS=8 LAT_DUR=4                     # the latency phase's own rounds and seconds
#       (default ROUNDS, DUR); each round starts at the next target, so no target always
#       runs first after the saturation phase or last before the next round
#   LAT_SKIP="direct"                          # targets left out of the latency rounds (their
#       latency then reads 0): more rounds in the same time when they are not compared
#   PIN=1 [LOAD_CPUS=0 SERVER_CPUS=1]          # taskset: the load tools on LOAD_CPUS, every
#       server (upstream, proxies) on SERVER_CPUS, so the client's scheduling lag stops
#       landing in the servers' latency (on 2 cores: one core each)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DUR=${DUR:-6}
ROUNDS=${ROUNDS:-3}
CONC=${CONC:-64}
# Open-loop connections. Without a bound the client opens a new connection for
# every arrival that finds the others busy: on 2 shared cores one stall then
# becomes a burst of connects (client, proxy and upstream side) that feeds the
# next stall (infergate p99 43 to 237 ms unbounded vs 6 to 9 ms with 64).
LAT_CONNS=${LAT_CONNS:-64}
SSE_CONC=${SSE_CONC:-32}
SSE_TOKENS=${SSE_TOKENS:-256}
IDLE_STREAMS=${IDLE_STREAMS:-10000}
# The peers run round_robin; infergate runs the data plane's own simple policy
# (IG_POLICY=inference_aware measures the default, with its /metrics scrape loop).
IG_POLICY=${IG_POLICY:-least_request}
PEERS_VENV=${PEERS_VENV:-/tmp/peers-venv}
PEERS_DIR=${PEERS_DIR:-}
if [[ -z $PEERS_DIR ]]; then  # ../shared/peers from the main checkout, ../../shared/peers from a worktree
  for d in "$ROOT/../shared/peers" "$ROOT/../../shared/peers"; do [[ -d $d ]] && PEERS_DIR=$d && break; done
fi
TOKENIZER=${PEERS_TOKENIZER:-/tmp/peers-tokenizer}
BASE=${BENCH_BASE_PORT:-18100}
UP_PORT=$((BASE + 1)); IG_PORT=$((BASE + 10)); IG_ADMIN=$((BASE + 11))
NG_PORT=$((BASE + 20)); VR_PORT=$((BASE + 30)); SR_PORT=$((BASE + 40))
# The idle replicas take IDLE_UP_PORT and one port more per 1,000 streams.
IDLE_UP_PORT=$((BASE + 100)); IDLE_IG_PORT=$((BASE + 51)); IDLE_IG_ADMIN=$((BASE + 52))
BL_PORT=$((BASE + 60)); BL_ADMIN=$((BASE + 61))
AK_PORT=$((BASE + 70)); AK_ADMIN=$((BASE + 71))
AU_PORT=$((BASE + 90)); AU_ADMIN=$((BASE + 91))
QL_PORT=$((BASE + 80)); QL_ADMIN=$((BASE + 81)); QR_PORT=$((BASE + 82)); QR_ADMIN=$((BASE + 83))
PEERS=${PEERS:-1}
PHASES=${PHASES:-sat,lat,sse}
has_phase() { [[ ,$PHASES, == *,$1,* ]]; }
LAT_ROUNDS=${LAT_ROUNDS:-$ROUNDS}
LAT_DUR=${LAT_DUR:-$DUR}
# PIN=1: servers on SERVER_CPUS, load tools on LOAD_CPUS (taskset execs, so pids stay the servers').
SRV=(); CLI=()
if [[ ${PIN:-0} != 0 ]]; then
  command -v taskset >/dev/null || { echo "PIN=1 needs taskset (util-linux)" >&2; exit 1; }
  SRV=(taskset -c "${SERVER_CPUS:-1}"); CLI=(taskset -c "${LOAD_CPUS:-0}")
  echo "# pinned: load tools on CPU ${LOAD_CPUS:-0}, servers on CPU ${SERVER_CPUS:-1}"
fi
IG_KEYS=${IG_KEYS:-1000}
MODEL=bench-model
RUN=$(mktemp -d /tmp/dataplane-bench.XXXXXX)
export HF_ENDPOINT="http://127.0.0.1:9" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"
ulimit -n 200000 2>/dev/null || ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# The gateway holds two sockets per stream (client + replica): cap the idle test to the fd limit.
FD_LIMIT=$(ulimit -n)
if [[ $FD_LIMIT != unlimited ]] && (( IDLE_STREAMS * 2 + 200 > FD_LIMIT )); then
  echo "# fd limit $FD_LIMIT: idle-stream test capped at $(( (FD_LIMIT - 200) / 2 )) streams (raise with ulimit -Hn as root)"
  IDLE_STREAMS=$(( (FD_LIMIT - 200) / 2 ))
fi

if [[ -z ${SKIP_BUILD:-} ]]; then  # SKIP_BUILD=1 reuses target/release as it is
  echo "# building release binaries"
  cargo build --release --quiet --bin infergate --bin infergate-load
fi
IG=${IG:-target/release/infergate}  # IG=/path/to/infergate: measure that build (the idle phase, IDLE_ONLY=1)
LOAD=target/release/infergate-load

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

start_bg() {  # name cmd...: starts in the background, remembers the pid
  local name=$1; shift
  "${SRV[@]}" "$@" >"$RUN/$name.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$RUN/$name.pid"
}
wait_http() {  # url
  for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "timeout waiting for $1 (see $RUN)" >&2; return 1
}
tree_pids() {  # pid and its descendants
  local p=$1; echo "$p"
  for c in $(pgrep -P "$p" 2>/dev/null); do tree_pids "$c"; done
}
peak_rss_mib() {  # VmHWM summed over the process tree, MiB
  local total=0 kb
  for p in $(tree_pids "$1"); do
    kb=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo "scale=1; $total / 1024" | bc
}
cpu_ticks() {  # user + system CPU of a process tree, in clock ticks
  local total=0 t
  for p in $(tree_pids "$1"); do
    t=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
    total=$((total + ${t:-0}))
  done
  echo "$total"
}
rss_mib() {  # current VmRSS of one process, MiB
  awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"
}
jget() {  # file python-expression-on-v
  python3 -c "import json,sys; v=json.load(open('$1')); print($2)"
}

write_keys() {  # a key file of IG_KEYS keys; the load sends the last one
  for i in $(seq "$IG_KEYS"); do
    printf -- '- {id: k%d, sha256: %s, team: t%d}\n' "$i" \
      "$(printf 'sk-bench-%d' "$i" | sha256sum | cut -d' ' -f1)" "$((i % 10))"
  done >"$RUN/keys.yaml"
}

# The idle streams: IDLE_STREAMS open streaming requests whose upstream is so
# slow no token ever comes during the test; prints the RSS per open stream.
idle_phase() {
  echo
  echo "# idle streams: $IDLE_STREAMS open streaming requests through infergate"
  # One replica per 1,000 streams: a replica takes at most 1,024 connections
  # (budget.max_connections_per_replica), so every stream holds its upstream side.
  IDLE_REPLICAS=$(( (IDLE_STREAMS + 999) / 1000 ))
  start_bg idle-upstream "$IG" sim --profile tiny --replicas "$IDLE_REPLICAS" --base-port "$IDLE_UP_PORT" \
    --time-scale 0.00001 --served-model-name "$MODEL"
  wait_http "http://127.0.0.1:$IDLE_UP_PORT/health"
  IDLE_ENDPOINTS=$(python3 -c "print(', '.join(f'\"http://127.0.0.1:{$IDLE_UP_PORT + i}\"' for i in range($IDLE_REPLICAS)))")
  # No token budget and no self-tuning: every stream must reach a replica (the
  # sim's KV-derived token budget, and the learned per-replica request and
  # prefill caps, would queue most of them in the gateway, holding no upstream side).
  cat >"$RUN/idle.yaml" <<YAML
listeners:
  main: { address: "127.0.0.1:$IDLE_IG_PORT" }
  admin: { address: "127.0.0.1:$IDLE_IG_ADMIN" }
logging: { level: warn }
pools:
  - name: bench
    endpoints: [$IDLE_ENDPOINTS]
routes:
  - model: $MODEL
    pool: bench
    routing: { policy: $IG_POLICY }
    admission:
      budget: { tokens_per_replica: 1000000000, self_tuning: false }
YAML
  IDLE_HEADER=
  if [[ ${IG_AUTH:-} == keys ]]; then  # the streams authenticate too
    [[ -f $RUN/keys.yaml ]] || write_keys
    printf 'auth: { mode: keys, key_file: %s }\n' "$RUN/keys.yaml" >>"$RUN/idle.yaml"
    IDLE_HEADER="authorization: Bearer sk-bench-$IG_KEYS"
  fi
  start_bg idle-infergate "$IG" serve --config "$RUN/idle.yaml"
  wait_http "http://127.0.0.1:$IDLE_IG_ADMIN/readyz"
  IDLE_PID=$(cat "$RUN/idle-infergate.pid")
  IDLE_BEFORE=$(rss_mib "$IDLE_PID")
  echo "  infergate RSS before: $IDLE_BEFORE MiB"
  IDLE_HEADER="$IDLE_HEADER" python3 "$ROOT/loadtest/idle_streams.py" "127.0.0.1" "$IDLE_IG_PORT" "$MODEL" "$IDLE_STREAMS" \
    "http://127.0.0.1:$IDLE_IG_ADMIN/routes" 300 >"$RUN/idle.out" 2>&1 &
  IDLE_CLIENT=$!
  PIDS+=("$IDLE_CLIENT")
  for _ in $(seq 900); do grep -qE '^(open|incomplete) ' "$RUN/idle.out" 2>/dev/null && break; sleep 0.5; done
  cat "$RUN/idle.out"
  grep -q '^open ' "$RUN/idle.out" || echo "  (not every stream reached the gateway's replica: the figure below is not per open stream)"
  IDLE_RSS=$(rss_mib "$IDLE_PID")
  echo "  infergate RSS with the streams open: $IDLE_RSS MiB (peak $(peak_rss_mib "$IDLE_PID") MiB)"
  python3 -c "print(f'  => {($IDLE_RSS - $IDLE_BEFORE) * 1024 / $IDLE_STREAMS:.1f} KiB per open stream; {$IDLE_BEFORE + ($IDLE_RSS - $IDLE_BEFORE) * 10000 / $IDLE_STREAMS:.0f} MiB for 10,000')"
  kill "$IDLE_CLIENT" 2>/dev/null || true
  kill "$IDLE_PID" "$(cat "$RUN/idle-upstream.pid")" 2>/dev/null || true
}

if [[ -n ${IDLE_ONLY:-} ]]; then  # IDLE_ONLY=1: the idle-stream phase alone
  idle_phase
  echo "# logs: $RUN"
  exit 0
fi

# --- the shared fast upstream
start_bg upstream "$IG" sim --profile llama-8b-h100 --replicas 1 --base-port "$UP_PORT" \
  --time-scale 1000000 --served-model-name "$MODEL" --model-path "$TOKENIZER"
wait_http "http://127.0.0.1:$UP_PORT/health"
UP="http://127.0.0.1:$UP_PORT"

# --- the proxies
cat >"$RUN/infergate.yaml" <<YAML
listeners:
  main: { address: "127.0.0.1:$IG_PORT" }
  admin: { address: "127.0.0.1:$IG_ADMIN" }
logging: { level: warn }
pools:
  - name: bench
    endpoints: ["$UP"]
routes:
  - model: $MODEL
    pool: bench
    routing: { policy: $IG_POLICY }
YAML
start_bg infergate "$IG" serve --config "$RUN/infergate.yaml"
wait_http "http://127.0.0.1:$IG_ADMIN/readyz"
TARGETS=("direct=$UP" "infergate=http://127.0.0.1:$IG_PORT")
declare -A PID_OF=([infergate]=$(cat "$RUN/infergate.pid"))
declare -A HDRS=()  # an extra request header per target
# add_variant NAME BIN PORT ADMIN EXTRA [SRC]: target NAME, served by BIN with
# the config SRC (default: infergate's) moved to PORT/ADMIN and EXTRA (YAML
# lines) appended; the variants differ from infergate only in what they add.
add_variant() {
  local name=$1 bin=$2 port=$3 admin=$4 extra=$5 src=${6:-$RUN/infergate.yaml}
  sed -e "s/$IG_PORT/$port/" -e "s/$IG_ADMIN/$admin/" -e "s/$AK_PORT/$port/" -e "s/$AK_ADMIN/$admin/" \
    "$src" >"$RUN/$name.yaml"
  [[ -n $extra ]] && printf '%s\n' "$extra" >>"$RUN/$name.yaml"
  start_bg "$name" "$bin" serve --config "$RUN/$name.yaml"
  wait_http "http://127.0.0.1:$admin/readyz"
  TARGETS+=("$name=http://127.0.0.1:$port"); PID_OF[$name]=$(cat "$RUN/$name.pid")
}
if [[ ${IG_AUTH:-} == keys ]]; then
  # A key file of IG_KEYS keys (the lookup is a hash map: its size should not
  # matter); the load sends the last one.
  write_keys
  add_variant infergate-keys "$IG" "$AK_PORT" "$AK_ADMIN" "auth: { mode: keys, key_file: $RUN/keys.yaml }"
  HDRS[infergate-keys]="authorization:Bearer sk-bench-$IG_KEYS"
fi
if [[ -n ${IG_AUDIT:-} ]]; then
  add_variant infergate-audit "$IG" "$AU_PORT" "$AU_ADMIN" \
    "pricing: { models: { $MODEL: { input: 0.15, cached_input: 0.03, output: 0.6 } } }
audit: { output: $RUN/audit.jsonl }"
fi
if [[ -n ${IG_QUOTA:-} ]]; then
  # A limit far above what the load reaches (every request is admitted and
  # settled): what is measured is the reservation and settlement themselves.
  QUOTA='quotas: { default_team: { requests_per_minute: 1000000000, tokens_per_minute: 1000000000000 } }'
  add_variant quota-local "$IG" "$QL_PORT" "$QL_ADMIN" "$QUOTA"
  if [[ -n ${REDIS_URL:-} ]]; then
    add_variant quota-redis "$IG" "$QR_PORT" "$QR_ADMIN" \
      "$QUOTA
governance: { redis: { url: \"$REDIS_URL\", when_down: fail_closed, required_for_ready: true } }"
  fi
fi
if [[ -n ${IG_BASELINE:-} ]]; then
  # With IG_AUTH=keys the baseline authenticates too (compare it with infergate-keys).
  BL_SRC=$RUN/infergate.yaml; [[ ${IG_AUTH:-} == keys ]] && BL_SRC=$RUN/infergate-keys.yaml
  [[ ${IG_AUTH:-} == keys ]] && HDRS[baseline]="authorization:Bearer sk-bench-$IG_KEYS"
  add_variant baseline "$IG_BASELINE" "$BL_PORT" "$BL_ADMIN" "" "$BL_SRC"
fi

if (( PEERS )) && command -v nginx >/dev/null && [[ -f "$PEERS_DIR/nginx.conf.in" ]]; then
  mkdir -p "$RUN/nginx-tmp"
  sed -e "s|@PORT@|$NG_PORT|" -e "s|@RUN@|$RUN|g" "$PEERS_DIR/nginx.conf.in" |
    awk -v ups="        server 127.0.0.1:$UP_PORT max_fails=0;" '{ if ($0 ~ /^@UPSTREAMS@$/) print ups; else print }' \
    >"$RUN/nginx.conf"
  start_bg nginx nginx -c "$RUN/nginx.conf" -p "$RUN" -g 'daemon off;'
  wait_http "http://127.0.0.1:$NG_PORT/health"
  TARGETS+=("nginx=http://127.0.0.1:$NG_PORT"); PID_OF[nginx]=$(cat "$RUN/nginx.pid")
else
  echo "# nginx not installed: skipped (run ../shared/peers/setup.sh)"
fi
if (( PEERS )) && [[ -x "$PEERS_VENV/bin/vllm-router" ]]; then
  start_bg vllm-router "$PEERS_VENV/bin/vllm-router" --host 127.0.0.1 --port "$VR_PORT" \
    --worker-urls "$UP" --policy round_robin --prometheus-host 127.0.0.1 \
    --prometheus-port $((VR_PORT + 1)) --worker-startup-check-interval 1
  wait_http "http://127.0.0.1:$VR_PORT/readiness"
  TARGETS+=("vllm-router=http://127.0.0.1:$VR_PORT"); PID_OF[vllm-router]=$(cat "$RUN/vllm-router.pid")
else
  echo "# vllm-router not installed: skipped"
fi
if (( PEERS )) && [[ -x "$PEERS_VENV/bin/sglang-router" ]]; then
  start_bg sglang-router "$PEERS_VENV/bin/sglang-router" launch --host 127.0.0.1 --port "$SR_PORT" \
    --worker-urls "$UP" --policy round_robin --prometheus-host 127.0.0.1 \
    --prometheus-port $((SR_PORT + 1)) --worker-startup-check-interval 1
  wait_http "http://127.0.0.1:$SR_PORT/readiness"
  TARGETS+=("sglang-router=http://127.0.0.1:$SR_PORT"); PID_OF[sglang-router]=$(cat "$RUN/sglang-router.pid")
else
  echo "# sglang-router not installed: skipped"
fi
sleep 1

load() {  # out.json url args...   (the HDRS header of the target named in out.json is added)
  local out=$1 url=$2; shift 2
  local name; name=$(basename "$out" .json); name=${name#*-}; name=${name%-*}
  local hdr=${HDRS[$name]:-}
  "${CLI[@]}" "$LOAD" --url "$url" --model "$MODEL" --json ${hdr:+-H "$hdr"} "$@" >"$out" 2>"$out.err" || {
    echo "load failed for $url: $(tail -3 "$out.err")" >&2; echo '{}' >"$out"; }
}

# Each phase runs ROUNDS rounds, every target once per round, and reports the
# median: on a shared 2-core machine a slow spell then hits every target
# alike instead of whichever one happened to be running.
median() {  # python-expression-on-v file...: the median over the files
  local expr=$1; shift
  python3 - "$expr" "$@" <<'PY'
import json, statistics, sys
vals = []
for f in sys.argv[2:]:
    try:
        v = json.load(open(f))
        vals.append(float(eval(sys.argv[1])))
    except Exception:
        pass
print(round(statistics.median(vals), 3) if vals else 0)
PY
}
declare -A RPS P50 P99 LAG SSE RSS SSE_CPU

# Quota targets' decision-time histograms, read at phase ends (quota_bench.sh diffs them).
snap_quota_metrics() {  # tag
  local name
  for name in quota-local quota-redis; do
    [[ -n ${PID_OF[$name]:-} ]] || continue
    local admin=$QL_ADMIN; [[ $name == quota-redis ]] && admin=$QR_ADMIN
    curl -s "http://127.0.0.1:$admin/metrics" | grep -E '^infergate_quota_(decision|redis_waits|redis_joined)' >"$RUN/metrics-$name-$1.txt" || true
  done
}
snap_quota_metrics start
for t in "${TARGETS[@]}"; do RPS[${t%%=*}]=0; SSE[${t%%=*}]=0; done

if has_phase sat; then
echo "# 1/3 saturation: small non-streaming completions, closed loop -c $CONC, ${DUR}s each, $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
  line="  round $r:"
  for t in "${TARGETS[@]}"; do
    name=${t%%=*}; url=${t#*=}
    load "$RUN/sat-$name-$r.json" "$url" --workload small --max-tokens 1 -c "$CONC" -d "$DUR" --warmup 1
    line="$line $name $(jget "$RUN/sat-$name-$r.json" "round(v.get('ok_per_s', 0))")"
  done
  echo "$line"
done
for t in "${TARGETS[@]}"; do
  name=${t%%=*}
  RPS[$name]=$(median "v.get('ok_per_s', 0)" "$RUN"/sat-"$name"-[0-9]*.json)
  RPS[$name]=${RPS[$name]%.*}
  echo "  $name: median ${RPS[$name]} req/s ($(jget "$RUN/sat-$name-1.json" "sum(v.get('errors', {}).values()) if isinstance(v.get('errors'), dict) else v.get('errors')") errors in round 1)"
done
fi

declare -A OHA_RPS=()
if has_phase sat && [[ ${OHA:-1} != 0 ]] && command -v oha >/dev/null; then
  echo "# 1b/3 saturation with oha: -c $CONC, ${DUR}s each, $ROUNDS rounds"
  BODY="{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1}"
  for r in $(seq "$ROUNDS"); do
    line="  round $r:"
    for t in "${TARGETS[@]}"; do
      name=${t%%=*}; url=${t#*=}
      hdr=${HDRS[$name]:-}
      "${CLI[@]}" oha --no-tui --output-format json -z "${DUR}s" -c "$CONC" -m POST -H 'content-type: application/json' \
        ${hdr:+-H "${hdr%%:*}: ${hdr#*:}"} -d "$BODY" "$url/v1/chat/completions" \
        >"$RUN/oha-$name-$r.json" 2>/dev/null || echo '{}' >"$RUN/oha-$name-$r.json"
      line="$line $name $(jget "$RUN/oha-$name-$r.json" "round(v.get('summary', {}).get('requestsPerSec', 0))")"
    done
    echo "$line"
  done
  for t in "${TARGETS[@]}"; do
    name=${t%%=*}
    OHA_RPS[$name]=$(median "v['summary']['requestsPerSec'] * v['summary']['successRate']" "$RUN"/oha-"$name"-[0-9]*.json)
    echo "  $name: median ${OHA_RPS[$name]} req/s (oha)"
  done
fi

snap_quota_metrics sat
HALF=${LAT_RATE:-$(( ${RPS[infergate]} / 2 ))}  # LAT_RATE=2000: a fixed rate instead
if has_phase lat; then
echo "# 2/3 latency at ${LAT_RATE:+a fixed }${LAT_RATE:-half of the saturation of infergate}: open loop --rate $HALF over $LAT_CONNS connections, ${LAT_DUR}s each, $LAT_ROUNDS rounds"
NT=${#TARGETS[@]}
for r in $(seq "$LAT_ROUNDS"); do
  for i in $(seq 0 $((NT - 1))); do  # round r starts at target r-1: the order rotates
    t=${TARGETS[$(( (i + r - 1) % NT ))]}
    name=${t%%=*}; url=${t#*=}
    [[ " ${LAT_SKIP:-} " == *" $name "* ]] && continue
    load "$RUN/lat-$name-$r.json" "$url" --workload small --max-tokens 1 --rate "$HALF" -d "$LAT_DUR" --warmup 1 \
      --max-in-flight "$LAT_CONNS"
  done
done
fi
snap_quota_metrics lat
for t in "${TARGETS[@]}"; do
  name=${t%%=*}
  P50[$name]=$(median "v['e2e_ms']['p50']" "$RUN"/lat-"$name"-[0-9]*.json)
  P99[$name]=$(median "v['e2e_ms']['p99']" "$RUN"/lat-"$name"-[0-9]*.json)
  LAG[$name]=$(median "v['schedule_lag_ms']['p99']" "$RUN"/lat-"$name"-[0-9]*.json)
  echo "  $name: median p50 ${P50[$name]} ms, p99 ${P99[$name]} ms; client schedule lag p99 ${LAG[$name]} ms"
done

if has_phase sse; then
echo "# 3/3 SSE relay: streaming chat, $SSE_TOKENS tokens each, closed loop -c $SSE_CONC, ${DUR}s each, $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
  line="  round $r:"
  for t in "${TARGETS[@]}"; do
    name=${t%%=*}; url=${t#*=}
    pid=${PID_OF[$name]:-}
    [[ -n $pid ]] && c0=$(cpu_ticks "$pid")
    load "$RUN/sse-$name-$r.json" "$url" --workload stream --max-tokens "$SSE_TOKENS" -c "$SSE_CONC" -d "$DUR" --no-usage
    # The proxy's own CPU per relayed chunk (user + system, its process tree).
    [[ -n $pid ]] && echo "$(( $(cpu_ticks "$pid") - c0 ))" >"$RUN/sse-$name-$r.ticks"
    line="$line $name $(jget "$RUN/sse-$name-$r.json" "round(v.get('output_tok_per_s', 0))")"
  done
  echo "$line"
done
for t in "${TARGETS[@]}"; do
  name=${t%%=*}
  SSE[$name]=$(median "v.get('output_tok_per_s', 0)" "$RUN"/sse-"$name"-[0-9]*.json)
  SSE[$name]=${SSE[$name]%.*}
  SSE_CPU[$name]=$(python3 - "$RUN" "$name" "$(getconf CLK_TCK)" <<'PY'
import glob, json, statistics, sys
run, name, tck = sys.argv[1], sys.argv[2], int(sys.argv[3])
per = []
for f in sorted(glob.glob(f"{run}/sse-{name}-*.ticks")):
    tokens = json.load(open(f[:-6] + ".json")).get("output_tokens") or 0
    if tokens:
        per.append(int(open(f).read()) / tck * 1e6 / tokens)
print(f"{statistics.median(per):.3f}" if per else "-")
PY
)
  echo "  $name: median ${SSE[$name]} chunks/s, proxy CPU ${SSE_CPU[$name]} µs per chunk"
done
fi
for t in "${TARGETS[@]}"; do
  name=${t%%=*}
  if [[ -n ${PID_OF[$name]:-} ]]; then RSS[$name]=$(peak_rss_mib "${PID_OF[$name]}"); else RSS[$name]=-; fi
done

echo
echo "## results (upstream: infergate sim, time scale 1e6; load: infergate-load; $(nproc) cores shared)"
printf '%-14s %10s %14s %14s %12s %10s\n' target "req/s" "added p50 ms" "added p99 ms" "SSE chunk/s" "peak MiB"
for t in "${TARGETS[@]}"; do
  name=${t%%=*}
  a50=$(python3 -c "print(f'{${P50[$name]} - ${P50[direct]}:.3f}')")
  a99=$(python3 -c "print(f'{${P99[$name]} - ${P99[direct]}:.3f}')")
  printf '%-14s %10s %14s %14s %12s %10s\n' "$name" "${RPS[$name]}" "$a50" "$a99" "${SSE[$name]}" "${RSS[$name]}"
done
echo
echo "## infergate's ratios (req/s, SSE chunks/s: higher is better; peak RSS: lower is better)"
for t in "${TARGETS[@]}"; do
  name=${t%%=*}
  [[ $name == infergate || $name == direct ]] && continue
  python3 -c "
rps, sse = ${RPS[infergate]} / max(${RPS[$name]}, 1), ${SSE[infergate]} / max(${SSE[$name]}, 1)
print(f'  vs $name: req/s x{rps:.2f}  SSE x{sse:.2f}  RSS ${RSS[infergate]} vs ${RSS[$name]} MiB')"
  if [[ -n ${OHA_RPS[$name]:-} ]]; then
    python3 -c "print(f'  vs $name with oha: req/s x{${OHA_RPS[infergate]} / max(${OHA_RPS[$name]}, 1):.2f}')"
  fi
done

if [[ -n ${RPS[infergate-keys]:-} && -n ${RPS[nginx]:-} ]]; then
  python3 -c "
rps, sse = ${RPS[infergate-keys]} / max(${RPS[nginx]}, 1), ${SSE[infergate-keys]} / max(${SSE[nginx]}, 1)
print(f'  infergate-keys (auth on) vs nginx: req/s x{rps:.2f}  SSE x{sse:.2f}  added p99 {${P99[infergate-keys]} - ${P99[direct]}:.3f} vs {${P99[nginx]} - ${P99[direct]}:.3f} ms')
print('    targets (issue 18): req/s >= x1.00, SSE >= x1.20, added p99 <= 0.200 ms')
cpu = {k: v for k, v in (('keys', '${SSE_CPU[infergate-keys]:--}'), ('nginx', '${SSE_CPU[nginx]:--}'))}
if '-' not in cpu.values():
    k, n = float(cpu['keys']), float(cpu['nginx'])
    print(f'    proxy CPU per relayed SSE chunk: {k:.3f} vs nginx {n:.3f} us (x{n / max(k, 1e-9):.2f} in infergate\'s favour)')"
fi

if [[ -n ${PID_OF[quota-redis]:-} ]]; then  # quota_bench.sh divides Redis calls by these
  echo "quota-redis decisions: $(curl -s "http://127.0.0.1:$QR_ADMIN/metrics" \
    | awk '/^infergate_quota_decisions_total/ {n += $2} END {print n + 0}')"
fi
# --- idle streams
if (( IDLE_STREAMS > 0 )); then idle_phase; fi
echo "# logs and raw JSON: $RUN"
