#!/usr/bin/env bash
# Instructions per request of quotas, which machine load does not change:
# loadtest/instr_per_request.sh (callgrind, one serving worker, N requests at
# 400 req/s) three times on the same build: quotas off, quotas counted locally,
# and quotas shared through a redis-server on loopback (the benchmark's quota:
# default_team with requests and tokens per minute, failing closed). Prints
# instructions per request of each, the added instructions, and the Redis
# script calls per request of the Redis run. Needs valgrind and redis-server.
# Redis calls may take 2 s here (valgrind runs the gateway ~50 times slower):
# with the default 50 ms, calls timed out, Redis was marked down and a
# share of requests took the fail-closed path (503) instead (before
# 2026-12-07, session 12). Requests not answered 200 are printed.
# OUT=DIR keeps the callgrind files (DIR/VARIANT.1) for callgrind_annotate.
#
#   bash loadtest/quota_instr.sh [DIR=target/release] [N=2000]
set -eu
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIR=${1:-target/release}; N=${2:-2000}
command -v redis-server >/dev/null || { echo "needs redis-server: apt-get install redis-server" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "needs valgrind: apt-get install valgrind" >&2; exit 1; }
KEEP=${OUT:-}
OUT=${OUT:-$(mktemp -d /tmp/quota-instr.XXXX)}
mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
REDIS_PID=$!
trap 'kill $REDIS_PID 2>/dev/null || true; [[ -n $KEEP ]] || rm -rf "$OUT"' EXIT
for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
QUOTA='quotas: { default_team: { requests_per_minute: 1000000000, tokens_per_minute: 1000000000000 } }'
calls() { redis-cli -p "$PORT" info commandstats | awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/ {n += $3} END {print n + 0}'; }
declare -A IPR
for variant in off local redis; do
  case $variant in
    off) extra='' ;;
    local) extra=$QUOTA ;;
    redis) extra="$QUOTA
governance: { redis: { url: \"redis://127.0.0.1:$PORT\", when_down: fail_closed, timeout: 2s } }" ;;
  esac
  before=$(calls)
  EXTRA_YAML="$extra" bash loadtest/instr_per_request.sh "$DIR" "$OUT/$variant" "$N" >"$OUT/$variant.txt"
  total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}' "$OUT/$variant.txt")
  grep -h "requests answered" "$OUT/$variant.txt" || true
  IPR[$variant]=$((total / N))
  echo "$variant: ${IPR[$variant]} instructions/request ($total over $N)"
  if [[ $variant == redis ]]; then
    echo "redis: $(( $(calls) - before )) script calls for $N requests (+ warm-up)"
  fi
done
echo "added by quotas, local: $(( IPR[local] - IPR[off] )) instructions/request; Redis: $(( IPR[redis] - IPR[off] ))"
