#!/usr/bin/env bash
# What sets infergate's added tail latency at a fixed rate: one gateway build
# in several configurations that each remove one suspect (the 50 ms /metrics
# scrape loop, a serving thread, the per-worker runtimes), all in front of the
# same instant sim replica, with interleaved rounds of open-loop load (as
# dataplane_bench.sh's latency phase: RATE req/s over CONNS keep-alive
# connections, auth keys on). Prints each variant's median p50 / p99 and the
# p99 added over direct; a variant whose p99 drops well below `default` names
# a source of the tail.
#
#   SKIP_BUILD=1 bash loadtest/tail_sources.sh
#   env: RATE=2000 CONNS=64 DUR=4 ROUNDS=5 BENCH_BASE_PORT=18700 IG=target/release/infergate
#        VARIANTS="default w1 shared lr slow"   (a subset, any order)
# Variants (each is the default config but for one thing):
#   default  workers: one per CPU, policy inference_aware (scrape every 50 ms)
#   w1       one serving worker
#   shared   workers: 0 (the process's work-stealing runtime serves)
#   lr       policy least_request (no scrape loop, no scoring)
#   slow     the scrape every 1 s instead of 50 ms
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RATE=${RATE:-2000}; CONNS=${CONNS:-64}; DUR=${DUR:-4}; ROUNDS=${ROUNDS:-5}
BASE=${BENCH_BASE_PORT:-18700}
VARIANTS=${VARIANTS:-default w1 shared lr slow}
if [[ -z ${SKIP_BUILD:-} ]]; then cargo build --release --quiet --bin infergate --bin infergate-load; fi
IG=${IG:-target/release/infergate}
LOAD=${LOAD:-target/release/infergate-load}
RUN=$(mktemp -d /tmp/tail-sources.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
wait_http() { for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "timeout: $1" >&2; return 1; }

"$IG" sim --profile llama-8b-h100 --replicas 1 --base-port $((BASE + 1)) --time-scale 1000000 \
  --served-model-name bench-model >"$RUN/sim.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$((BASE + 1))/health"
for i in $(seq 1000); do
  printf -- '- {id: k%d, sha256: %s, team: t%d}\n' "$i" \
    "$(printf 'sk-bench-%d' "$i" | sha256sum | cut -d' ' -f1)" "$((i % 10))"
done >"$RUN/keys.yaml"

declare -A URL
URL[direct]="http://127.0.0.1:$((BASE + 1))"
n=0
for v in $VARIANTS; do
  n=$((n + 1)); port=$((BASE + 10 * n)); admin=$((port + 1))
  workers=""; routing="policy: inference_aware"
  case $v in
    default) ;;
    w1) workers=", workers: 1" ;;
    shared) workers=", workers: 0" ;;
    lr) routing="policy: least_request" ;;
    slow) routing="policy: inference_aware, scrape: { interval_ms: 1000, stale_after_ms: 5000 }" ;;
    *) echo "unknown variant $v" >&2; exit 1 ;;
  esac
  cat >"$RUN/$v.yaml" <<YAML
listeners:
  main: { address: "127.0.0.1:$port"$workers }
  admin: { address: "127.0.0.1:$admin" }
logging: { level: warn }
auth: { mode: keys, key_file: $RUN/keys.yaml }
pools:
  - name: bench
    endpoints: ["http://127.0.0.1:$((BASE + 1))"]
routes:
  - model: bench-model
    pool: bench
    routing: { $routing }
YAML
  "$IG" serve --config "$RUN/$v.yaml" >"$RUN/$v.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$admin/readyz"
  URL[$v]="http://127.0.0.1:$port"
done
NAMES=(direct $VARIANTS)
echo "# tail sources: open loop --rate $RATE over $CONNS connections, ${DUR}s each, $ROUNDS rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
for r in $(seq "$ROUNDS"); do
  line="  round $r:"
  for i in $(seq 0 $((${#NAMES[@]} - 1))); do  # the order rotates each round
    v=${NAMES[$(( (i + r - 1) % ${#NAMES[@]} ))]}
    "$LOAD" --url "${URL[$v]}" --model bench-model --workload small --max-tokens 1 --rate "$RATE" \
      -d "$DUR" --warmup 1 --max-in-flight "$CONNS" -H "authorization:Bearer sk-bench-1000" --json \
      >"$RUN/$v-$r.json" 2>/dev/null || echo '{}' >"$RUN/$v-$r.json"
    line="$line $v $(python3 -c "import json; print(json.load(open('$RUN/$v-$r.json')).get('e2e_ms', {}).get('p99', 0))")"
  done
  echo "$line"
done
python3 - "$RUN" "${NAMES[@]}" <<'PY'
import json, statistics, sys, glob
run, names = sys.argv[1], sys.argv[2:]
def med(v, q):
    vals = [json.load(open(f)).get("e2e_ms", {}).get(q) for f in glob.glob(f"{run}/{v}-*.json")]
    vals = [x for x in vals if x is not None]
    return statistics.median(vals) if vals else float("nan")
d99, d50 = med("direct", "p99"), med("direct", "p50")
print(f"{'variant':<10} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10}")
for v in names:
    p50, p99 = med(v, "p50"), med(v, "p99")
    print(f"{v:<10} {p50:8.3f} {p99:8.3f} {p50 - d50:10.3f} {p99 - d99:10.3f}")
PY
echo "# logs and raw JSON: $RUN"
