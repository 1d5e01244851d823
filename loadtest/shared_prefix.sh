#!/usr/bin/env bash
# Issue 4's routing benchmark: the shared-prefix workload (groups of users sharing a
# long system prompt, multi-turn sessions whose prompt grows, Poisson arrivals) on a
# fleet of simulated vLLM-like replicas, side by side in one run through:
#   infergate (default inference-aware policy), infergate round robin,
#   vllm-router cache_aware, sglang-router cache_aware.
# Each system gets a fresh fleet (cold caches, same seed, same arrivals). Prints p50/p90
# TTFT, p50/p90 inter-token latency, output tokens/s and the fleet's prefix-cache hit
# rate (from the replicas' own vllm:prefix_cache_* counters), then the ratios the issue
# targets.
#
#   bash loadtest/shared_prefix.sh [systems]        # default: all four
#   bash loadtest/shared_prefix.sh multi            # 3 gateways vs 1 (fleet hit rate)
#   bash loadtest/shared_prefix.sh kv               # issue 15: precise vs approximate vs peers
#   systems: any of infergate infergate-rr vllm-router sglang-router, or (kv mode)
#   precise-N approximate-N vllm-router-N sglang-router-N: N instances of that router, the
#   load tool spreading requests over them (a client that load-balances its gateways)
#
# kv mode (issue 15): 8 replicas publishing KV events, under cache pressure (prefix data
# several times the fleet's KV cache), Zipf-skewed group popularity that rotates every
# SHIFT_ROUNDS [1] rounds, and 3 instances of every router sharing the traffic:
# precise-3 (inference_aware with routing.kv_events), approximate-3 (inference_aware without),
# vllm-router-3, sglang-router-3 (cache_aware), then precise-1 (one gateway). Also reports
# the oracle hit rate (infergate-load --oracle-blocks: the fleet's KV blocks pooled into one
# LRU prefix cache fed the same requests; see crates/load/src/load/oracle.rs). Its defaults:
# PROFILE [llama-70b-4xh100] (prefill is dear: a miss costs), TIME_SCALE [0.75] (slower
# than modelled time, so 40 requests/s keep the fleet's prefill near saturation and misses
# queue), BLOCKS [3072] (8 x 3072 blocks of 16 tokens = 393k tokens, part of it pinned by
# running requests, against about 580k tokens of distinct prefixes per round, and the
# rotation brings new ones), PREFIX_GROUPS [128], USERS [3], TURNS [3], SYSTEM_TOKENS [3000],
# QUESTION_TOKENS [150], MAX_TOKENS [30], GROUP_SKEW [1.0], RATE [40], DURATION [60];
# every other variable as above. KV_TOKENIZE=vllm keys the precise gateways' requests from
# the replicas' own token ids (routing.kv_events.tokenize, fetched from the simulator's
# /tokenize, as a deployment of real engines must) instead of the gateway's token rule.
# The summary also prints, per precise gateway, how many replicas hold each cached block on
# average at the end (1.0 = no prefix held twice, as the oracle's single cache), and what
# placement alone reaches on the same requests (--oracle-replicas: one LRU per replica,
# sticky, no load, no blocks kept by the engines; crates/load/src/load/oracle_partition.rs).
#
# Env (defaults in brackets) - the fleet: REPLICAS [8], PROFILE [llama-8b-h100],
# TIME_SCALE [4] (modelled time runs this many times faster; latencies printed are
# wall-clock, multiply by TIME_SCALE for modelled), BLOCKS [4096] KV blocks of 16 tokens
# per replica. ENGINE [sim] or llama (real llama-server replicas from
# loadtest/llama_server.sh, which must be built; see "ENGINE=llama" below). The load: RATE
# [40] requests/s wall, DURATION [45] s, WARMUP [10] s, PREFIX_GROUPS [32], USERS [8],
# TURNS [3], SYSTEM_TOKENS [3000], QUESTION_TOKENS [200], MAX_TOKENS [150], SEED [1],
# GROUP_SKEW [0]: Zipf exponent of group popularity (0: every group alike; 1: the most
# popular of 32 groups has a quarter of the sessions, the hot-spotting case).
# INFERGATE_BIN / LOAD_BIN (target/release/...), PEERS_VENV. IG_ROUTING: more fields of the
# default-policy gateway's routing block, e.g. 'rendezvous: { group_slack: 0, group_slack_abs: 0 }'.
# ENGINE=llama changes the defaults to what 1-thread CPU replicas of SmolLM2-135M serve:
# REPLICAS [2], RATE [0.6], DURATION [60], WARMUP [10], PREFIX_GROUPS [7], USERS [4],
# TURNS [2], SYSTEM_TOKENS [300], QUESTION_TOKENS [20], MAX_TOKENS [8]; replicas run
# with LLAMA_SLOTS [4] slots and LLAMA_CACHE_RAM [0] MiB of host prompt cache: like a GPU
# engine, a replica then keeps only the prompts its KV cache (its slots) holds. (With
# llama-server's default 8 GiB host cache every replica would keep every prompt of this
# small workload and routing would not matter.)
# Needs: cargo build --release --bin infergate --bin infergate-load; for the peers,
# ../shared/peers/setup.sh --no-torch (-> /tmp/peers-venv). Loopback only; the script
# stops only the processes it started.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${INFERGATE_BIN:-$ROOT/target/release/infergate}"
LOAD="${LOAD_BIN:-$ROOT/target/release/infergate-load}"
VENV="${PEERS_VENV:-/tmp/peers-venv}"
TOK="${PEERS_TOKENIZER:-/tmp/peers-tokenizer}"
ENGINE=${ENGINE:-sim}
KV_MODE=0
[[ ${1:-} == kv ]] && KV_MODE=1
if ((KV_MODE)); then
  PROFILE=${PROFILE:-llama-70b-4xh100} BLOCKS=${BLOCKS:-3072} PREFIX_GROUPS=${PREFIX_GROUPS:-128}
  USERS=${USERS:-3} TURNS=${TURNS:-3} SYSTEM_TOKENS=${SYSTEM_TOKENS:-3000}
  QUESTION_TOKENS=${QUESTION_TOKENS:-150} MAX_TOKENS=${MAX_TOKENS:-30}
  GROUP_SKEW=${GROUP_SKEW:-1.0} RATE=${RATE:-40} DURATION=${DURATION:-60} TIME_SCALE=${TIME_SCALE:-0.75}
fi
SHIFT_ROUNDS=${SHIFT_ROUNDS:-$((KV_MODE ? 1 : 0))}
if [[ $ENGINE == llama ]]; then
  REPLICAS=${REPLICAS:-2} RATE=${RATE:-0.6} DURATION=${DURATION:-60} WARMUP=${WARMUP:-10}
  PREFIX_GROUPS=${PREFIX_GROUPS:-7} USERS=${USERS:-4} TURNS=${TURNS:-2}
  SYSTEM_TOKENS=${SYSTEM_TOKENS:-300} QUESTION_TOKENS=${QUESTION_TOKENS:-20} MAX_TOKENS=${MAX_TOKENS:-8}
  export LLAMA_SLOTS=${LLAMA_SLOTS:-4}
  export LLAMA_EXTRA_ARGS="--cache-ram ${LLAMA_CACHE_RAM:-0} ${LLAMA_EXTRA_ARGS:-}"
fi
REPLICAS=${REPLICAS:-8} PROFILE=${PROFILE:-llama-8b-h100} TIME_SCALE=${TIME_SCALE:-4}
BLOCKS=${BLOCKS:-4096} RATE=${RATE:-40} DURATION=${DURATION:-45} WARMUP=${WARMUP:-10}
GROUPS_=${PREFIX_GROUPS:-32} USERS=${USERS:-8} TURNS=${TURNS:-3} SYSTEM_TOKENS=${SYSTEM_TOKENS:-3000}
QUESTION_TOKENS=${QUESTION_TOKENS:-200} MAX_TOKENS=${MAX_TOKENS:-150} SEED=${SEED:-1}
GROUP_SKEW=${GROUP_SKEW:-0}
MODEL=m

[[ -x $BIN && -x $LOAD ]] || { echo "build first: cargo build --release --bin infergate --bin infergate-load" >&2; exit 2; }
command -v curl >/dev/null || { echo "curl is required" >&2; exit 2; }
export HF_ENDPOINT="http://127.0.0.1:9" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

RUN=$(mktemp -d /tmp/shared-prefix.XXXXXX)
PIDS=()
stop_pid() {  # TERM, then KILL after 2 s
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 20); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
# Gateways and peers are started inside $(...) subshells: their pids go to a file.
track() { echo "$1" >>"$RUN/pids"; }
stop_all() {
  if [[ -f "$RUN/pids" ]]; then
    while read -r pid; do PIDS+=("$pid"); done <"$RUN/pids"
    rm -f "$RUN/pids"
  fi
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  PIDS=()
  if [[ ${ENGINE:-sim} == llama && -d "$RUN/llama" ]]; then
    LLAMA_RUN="$RUN/llama" bash "$ROOT/loadtest/llama_server.sh" stop >&2 || true
  fi
}
trap stop_all EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
free_ports() {  # N: the first of N consecutive free ports
  python3 -c 'import socket,random,sys
n=int(sys.argv[1])
while True:
    b=random.randint(20000,40000); ok=True
    for p in range(b,b+n):
        s=socket.socket()
        try: s.bind(("127.0.0.1",p))
        except OSError: ok=False
        s.close()
    if ok: print(b); break' "$1"
}
kv_events_yaml() {  # routing.kv_events of the fleet: each replica's event endpoints (sim.out)
  local tok=""
  [[ -n ${KV_TOKENIZE:-} ]] && tok=", tokenize: { api: $KV_TOKENIZE }"
  awk -v tok="$tok" '{ split($3, u, "//"); sub("kv_events=", "", $5); sub("replay=", "", $6);
         printf "%s\"%s\": { endpoint: \"%s\", replay_endpoint: \"%s\" }", (NR > 1 ? ", " : ""), u[2], $5, $6 }
       BEGIN { printf "kv_events: { endpoints: { " } END { printf " }%s }", tok }' "$RUN/sim.out"
}
wait_http() {  # url: until it answers 2xx (30 s)
  for _ in $(seq 300); do curl -sf -m 1 -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "no answer from $1" >&2; return 1
}

URLS=()
POOL_ENGINE=vllm
[[ $ENGINE == llama ]] && POOL_ENGINE=llama.cpp
start_fleet() {
  if [[ $ENGINE == llama ]]; then
    # Real llama.cpp replicas (loadtest/llama_server.sh build, cached), on consecutive free ports.
    local base
    base=$(free_ports "$REPLICAS")
    LLAMA_RUN="$RUN/llama" bash "$ROOT/loadtest/llama_server.sh" start "$REPLICAS" "$base" >&2
    URLS=()
    for ((i = 0; i < REPLICAS; i++)); do URLS+=("http://127.0.0.1:$((base + i))"); done
    return
  fi
  local events=()
  if ((KV_MODE)); then
    # KV events on every replica (replica i publishes on the ports + i).
    local pub replay
    pub=$(free_ports "$REPLICAS") replay=$(free_ports "$REPLICAS")
    events=(--kv-events-config "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:$pub\",\"replay_endpoint\":\"tcp://*:$replay\"}")
  fi
  "$BIN" sim --profile "$PROFILE" --replicas "$REPLICAS" --base-port 0 --time-scale "$TIME_SCALE" \
    --num-gpu-blocks "$BLOCKS" --served-model-name $MODEL --model-path "$TOK" "${events[@]}" \
    >"$RUN/sim.out" 2>"$RUN/sim.log" &
  PIDS+=($!)
  for _ in $(seq 100); do [[ $(wc -l <"$RUN/sim.out") -ge $REPLICAS ]] && break; sleep 0.1; done
  mapfile -t URLS < <(awk '{print $3}' "$RUN/sim.out")
  [[ ${#URLS[@]} -eq $REPLICAS ]] || { echo "sim did not start: $(cat "$RUN/sim.log")" >&2; exit 1; }
  for u in "${URLS[@]}"; do wait_http "$u/health"; done
}

# gateway NAME POLICY URL... : starts infergate over the URLs, prints its URL.
gateway() {
  local name=$1 policy=$2 port admin; shift 2
  port=$(free_port); admin=$(free_port)
  local eps; eps=$(printf '"%s", ' "$@"); eps=${eps%, }
  cat >"$RUN/$name.yaml" <<EOF
listeners:
  main: { address: "127.0.0.1:$port" }
  admin: { address: "127.0.0.1:$admin" }
max_body_bytes: 16MiB
logging: { format: text }
pools:
  - name: fleet
    engine: $POOL_ENGINE
    endpoints: [$eps]
routes:
  - model: $MODEL
    pool: fleet
    timeouts: { first_byte: 10m, idle: 10m, total: off }
    retries: { attempts: 1 }
    routing: { policy: $policy }
${IG_ROUTE_EXTRA:+    $IG_ROUTE_EXTRA}
EOF
  RUST_LOG=warn "$BIN" serve --config "$RUN/$name.yaml" >"$RUN/$name.log" 2>&1 &
  track $!
  wait_http "http://127.0.0.1:$admin/readyz" >&2
  echo "http://127.0.0.1:$port"
}

peer() {  # KIND [LOG NAME]: starts vllm-router or sglang-router (cache_aware) over the fleet, prints its URL
  local kind=$1 log=${2:-$1} port mport
  port=$(free_port); mport=$(free_port)
  [[ -x "$VENV/bin/$kind" ]] || { echo "missing $VENV/bin/$kind (../shared/peers/setup.sh --no-torch)" >&2; return 1; }
  if [[ $kind == vllm-router ]]; then
    "$VENV/bin/vllm-router" --host 127.0.0.1 --port "$port" --worker-urls "${URLS[@]}" \
      --policy cache_aware --prometheus-host 127.0.0.1 --prometheus-port "$mport" \
      --worker-startup-check-interval 1 --worker-startup-timeout-secs 60 \
      --request-timeout-secs 1800 >"$RUN/$log.log" 2>&1 &
  else
    "$VENV/bin/sglang-router" launch --host 127.0.0.1 --port "$port" --worker-urls "${URLS[@]}" \
      --policy cache_aware --prometheus-host 127.0.0.1 --prometheus-port "$mport" \
      --worker-startup-check-interval 1 --worker-startup-timeout-secs 60 \
      --request-timeout-secs 1800 --max-concurrent-requests -1 >"$RUN/$log.log" 2>&1 &
  fi
  track $!
  local url="http://127.0.0.1:$port"
  wait_http "$url/readiness" >&2 || wait_http "$url/health" >&2
  # sglang registers workers asynchronously: wait until a request goes through.
  for _ in $(seq 100); do
    curl -sf -m 5 -o /dev/null "$url/v1/completions" -H 'content-type: application/json' \
      -d "{\"model\":\"$MODEL\",\"prompt\":\"warm up\",\"max_tokens\":1}" && break
    sleep 0.2
  done
  echo "$url"
}

metrics_urls() { local s; s=$(printf '%s/metrics,' "${URLS[@]}"); echo "${s%,}"; }

load() {  # URL[,URL...] OUT.json
  local oracle=()
  ((KV_MODE)) && oracle=(--oracle-blocks $((REPLICAS * BLOCKS)) --oracle-block-size 16 --oracle-replicas "$REPLICAS")
  "$LOAD" --url "$1" --model $MODEL --workload prefix --groups "$GROUPS_" --users "$USERS" \
    --turns "$TURNS" --group-skew "$GROUP_SKEW" --skew-shift-rounds "$SHIFT_ROUNDS" \
    --system-tokens "$SYSTEM_TOKENS" --question-tokens "$QUESTION_TOKENS" \
    --max-tokens "$MAX_TOKENS" --rate "$RATE" -d "$DURATION" --warmup "$WARMUP" --seed "$SEED" \
    --timeout 600 --scrape "$(metrics_urls)" "${oracle[@]}" --json >"$2" 2>"$2.err" || true
}

# run_system NAME: fresh fleet, the system in front, the load, then everything stopped.
run_system() {
  local name=$1 url
  start_fleet
  case $name in
    infergate) url=$(gateway infergate-0 "inference_aware${IG_ROUTING:+, $IG_ROUTING}" "${URLS[@]}") ;;
    infergate-rr) url=$(gateway ig-rr round_robin "${URLS[@]}") ;;
    vllm-router | sglang-router) url=$(peer "$name") ;;
    precise-* | approximate-* | vllm-router-* | sglang-router-*)
      # N instances of one router; the load tool spreads requests over them.
      local kind=${name%-*} n=${name##*-} urls=() i
      for ((i = 0; i < n; i++)); do
        case $kind in
          precise) urls+=("$(gateway "$name-$i" "inference_aware, $(kv_events_yaml)${IG_ROUTING:+, $IG_ROUTING}" "${URLS[@]}")") ;;
          approximate) urls+=("$(gateway "$name-$i" "inference_aware${IG_ROUTING:+, $IG_ROUTING}" "${URLS[@]}")") ;;
          *) urls+=("$(peer "$kind" "$name-$i")") ;;
        esac
      done
      url=$(IFS=,; echo "${urls[*]}")
      ;;
    multi-1 | multi-3)
      # A round-robin front (a Kubernetes Service, in effect) over 1 or 3 gateways.
      local n=${name#multi-} gws=() i
      for ((i = 0; i < n; i++)); do gws+=("$(gateway "gw$i" "inference_aware${IG_ROUTING:+, $IG_ROUTING}" "${URLS[@]}")"); done
      url=$(gateway "front-$n" round_robin "${gws[@]}")
      ;;
    *) echo "unknown system $name" >&2; exit 2 ;;
  esac
  echo "== $name via $url (fleet ${URLS[*]})" >&2
  load "$url" "$RUN/$name.json"
  # Each gateway's routing view at the end (which index answered per replica).
  local y a
  for y in "$RUN/$name"-*.yaml; do
    [[ -e $y ]] || continue
    a=$(sed -n 's/.*admin: { address: "\([^"]*\)" }.*/\1/p' "$y")
    curl -s -m 5 "http://$a/routing" >"${y%.yaml}.routing.json" || true
    # Admission's view too (learned caps, pacing), for reading after the run.
    curl -s -m 5 "http://$a/routes" >"${y%.yaml}.routes.json" || true
  done
  stop_all
}

summary() {  # names...
  python3 - "$RUN" "$TIME_SCALE" "$ENGINE" "$@" <<'EOF'
import json, sys
run, ts, engine, names = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
if engine == "llama": ts = 1.0
rows = {}
print(f"{'system':<16}{'ok':>6}{'err':>5}{'TTFT p50':>10}{'TTFT p90':>10}{'TTFT mean':>10}{'ITL p50':>9}{'ITL p90':>9}{'out tok/s':>11}{'hit rate':>10}{'oracle':>8}   (ms wall; x{ts:g} = modelled)")
for n in names:
    try:
        v = json.load(open(f"{run}/{n}.json"))
    except Exception as e:
        print(f"{n:<16} no result ({e}); see {run}/{n}.json.err"); continue
    t, i = v.get("ttft_ms", {}), v.get("itl_ms", {})
    # The engines' own counters; llama.cpp has none: the answers' cached-token counts then.
    hit = (v.get("replicas") or {}).get("prefix_cache_hit_rate")
    if hit is None:
        hit = v.get("usage_cache_hit_rate")
    oracle = (v.get("oracle") or {}).get("hit_rate")
    rows[n] = dict(p50=t.get("p50"), p90=t.get("p90"), mean=t.get("mean"), tps=v.get("output_tok_per_s"), hit=hit, oracle=oracle)
    f = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"
    print(f"{n:<16}{v.get('ok',0):>6}{sum(v.get('errors',{}).values()):>5}{f(t.get('p50')):>10}{f(t.get('p90')):>10}{f(t.get('mean')):>10}"
          f"{f(i.get('p50'),2):>9}{f(i.get('p90'),2):>9}{f(v.get('output_tok_per_s')):>11}{f(hit,3):>10}{f(oracle,3):>8}")
def ratio(a, b, k):
    try: return rows[a][k] / rows[b][k]
    except Exception: return None
checks = [
    ("p90 TTFT infergate / vllm-router cache_aware", ratio("infergate", "vllm-router", "p90"), "<=", 0.5),
    ("p90 TTFT infergate / infergate round robin", ratio("infergate", "infergate-rr", "p90"), "<=", 0.1),
    ("output tok/s infergate / infergate round robin", ratio("infergate", "infergate-rr", "tps"), ">=", 1.3),
    ("p90 TTFT infergate / sglang-router cache_aware", ratio("infergate", "sglang-router", "p90"), "<=", None),
    ("mean TTFT infergate / infergate round robin", ratio("infergate", "infergate-rr", "mean"), "<=", 0.5 if engine == "llama" else None),
    ("mean TTFT infergate / vllm-router cache_aware", ratio("infergate", "vllm-router", "mean"), "<=", 1.0 if engine == "llama" else None),
    ("fleet hit rate 3 gateways / 1 gateway", ratio("multi-3", "multi-1", "hit"), ">=", 0.9),
]
# kv mode (issue 15): the precise index over 3 gateways against the others.
def best_peer(k):
    vals = [rows[p][k] for p in ("vllm-router-3", "sglang-router-3") if rows.get(p, {}).get(k) is not None]
    return min(vals) if vals else None
if "precise-3" in rows:
    pr = rows["precise-3"]
    bp = best_peer("p90")
    checks += [
        ("p90 TTFT precise / better peer (3 instances each)", pr["p90"] / bp if pr["p90"] is not None and bp else None, "<=", 0.5),
        ("p90 TTFT precise / approximate (3 gateways each)", ratio("precise-3", "approximate-3", "p90"), "<=", 0.7),
        ("fleet hit rate precise / oracle", pr["hit"] / pr["oracle"] if pr["hit"] is not None and pr["oracle"] else None, ">=", 0.95),
        ("fleet hit rate precise 3 gateways / 1 gateway", ratio("precise-3", "precise-1", "hit"), ">=", 0.95),
        ("p90 TTFT precise 3 gateways / 1 gateway", ratio("precise-3", "precise-1", "p90"), "<=", 1.5),
        ("output tok/s precise / approximate (3 gateways each)", ratio("precise-3", "approximate-3", "tps"), ">=", None),
    ]
for label, r, op, target in checks:
    if r is None: continue
    met = "" if target is None else ("  MET" if (r <= target if op == "<=" else r >= target) else "  NOT MET")
    print(f"{label}: {r:.3f}" + ("" if target is None else f" (target {op} {target}){met}"))
# What placement alone reaches on the same requests (no load, no engine-held blocks).
for n in names:
    try: o = json.load(open(f"{run}/{n}.json")).get("oracle") or {}
    except Exception: continue
    pt = o.get("partitioned") or {}
    if pt.get("plain") and o.get("hit_rate"):
        print(f"{n}: oracle {o['hit_rate']:.3f}; one LRU per replica, sticky, no load: plain hash {pt['plain']:.3f}, "
              f"by turnover {pt['by_turnover']:.3f} ({pt['by_turnover'] / o['hit_rate']:.3f} of the oracle)")
        break
# Precise gateways: replicas whose events were live at the end, per gateway.
import glob
for n in names:
    if not n.startswith("precise"): continue
    live, dup, tok = [], [], []
    for f in sorted(glob.glob(f"{run}/{n}-*.routing.json")):
        try:
            v = json.load(open(f))
            p = v["routes"][0]["view"]["precise_index"]
            live.append(p["live_replicas"])
            dup.append(round(p["entries"] / p["blocks"], 3) if p["blocks"] else None)
            t = v["routes"][0]["view"].get("engine_tokens")
            if t: tok.append(f"{t['hits']}/{t['hits'] + t['misses']}")
        except Exception:
            live.append(None)
    print(f"{n}: precise index live replicas at the end, per gateway: {live}")
    print(f"{n}: replicas holding each cached block (mean, at the end), per gateway: {dup}")
    if tok: print(f"{n}: requests keyed from engine token ids, per gateway: {tok}")
# Where requests went against where their prefix was cached, all gateways of a
# system summed (routing's `placement` counters, since the gateway started).
for n in names:
    tot = {}
    for f in sorted(glob.glob(f"{run}/{n}-*.routing.json")):
        try:
            p = json.load(open(f))["routes"][0]["view"]["placement"]
        except Exception:
            continue
        for k, v in [("decisions", p["decisions"]), ("cold", p["cold"]["requests"]),
                     ("cold_tok", p["cold"]["prefill_tokens"]), ("holder", p["to_holder"]["requests"]),
                     ("holder_tok", p["to_holder"]["cached_tokens"])] + \
                    [(f"{w}", c["requests"]) for w, c in p["spilled"].items()] + \
                    [(f"{w}_tok", c["reprefill_tokens"]) for w, c in p["spilled"].items()]:
            tot[k] = tot.get(k, 0) + v
        for b, c in p["spilled"]["admission"].get("by_bound", {}).items():
            for when in ("arrival", "queued"):
                k = f"{b} on {when}"
                tot[k] = tot.get(k, 0) + c[when]["requests"]
                tot[k + "_tok"] = tot.get(k + "_tok", 0) + c[when]["reprefill_tokens"]
    if not tot.get("decisions"): continue
    d = tot["decisions"]
    spills = " ".join(f"{w} {tot[w]} ({tot[w + '_tok']} tok)" for w in
                      ("admission", "saturation", "prefix_affinity", "other_filter", "score") if tot.get(w))
    print(f"{n}: placements {d}: to the holder {tot['holder']} ({tot['holder_tok']} cached tok), "
          f"cold {tot['cold']} ({tot['cold_tok']} tok prefilled), spilled off a holder: {spills or 'none'}")
    by = ", ".join(f"{k} {tot[k]} ({tot[k + '_tok']} tok)" for k in tot
                   if " on " in k and not k.endswith("_tok") and tot[k])
    if by: print(f"{n}: admission spills by the bound that refused the holder: {by}")
print(f"raw JSON: {run}/*.json")
EOF
}

SYSTEMS=("$@")
[[ ${#SYSTEMS[@]} -eq 0 ]] && SYSTEMS=(infergate infergate-rr vllm-router sglang-router)
[[ ${SYSTEMS[0]} == multi ]] && SYSTEMS=(multi-1 multi-3)
if [[ ${SYSTEMS[0]} == kv ]]; then
  SYSTEMS=("${SYSTEMS[@]:1}")
  [[ ${#SYSTEMS[@]} -eq 0 ]] && SYSTEMS=(precise-3 approximate-3 vllm-router-3 sglang-router-3 precise-1)
fi
FLEET="${REPLICAS} x ${PROFILE} (${BLOCKS} KV blocks) at time scale ${TIME_SCALE}"
[[ $ENGINE == llama ]] && FLEET="${REPLICAS} x llama-server SmolLM2-135M (${LLAMA_SLOTS} slots, ${LLAMA_EXTRA_ARGS})"
echo "workload: ${GROUPS_} groups (Zipf skew ${GROUP_SKEW}, rotating every ${SHIFT_ROUNDS} rounds) x ${USERS} users x ${TURNS} turns, system ${SYSTEM_TOKENS} + question ${QUESTION_TOKENS} tokens, output ${MAX_TOKENS}; Poisson ${RATE}/s for ${DURATION}s (warm-up ${WARMUP}s), seed ${SEED}; ${FLEET}" >&2
for s in "${SYSTEMS[@]}"; do run_system "$s"; done
summary "${SYSTEMS[@]}"
