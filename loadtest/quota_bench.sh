#!/usr/bin/env bash
# The cost of quotas: loadtest/dataplane_bench.sh with its quota targets, in
# the same interleaved rounds as plain infergate (quotas off) and direct:
#   quota-local  a quota on every caller, counted in-process (no Redis)
#   quota-redis  the same quota shared through a redis-server on loopback,
#                failing closed (so a request that did not reach Redis fails
#                rather than passing as a fast local decision)
# Prints req/s at saturation and added p50/p99 at half of infergate's
# saturation (medians of ROUNDS rounds), then the ratios against quotas off
# and Redis round trips per request. Needs redis-server (apt-get install
# redis-server). Env: as dataplane_bench.sh (DUR, ROUNDS, CONC, ...).
#
#   loadtest/quota_bench.sh
#   SKIP_BUILD=1 DUR=6 ROUNDS=5 loadtest/quota_bench.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v redis-server >/dev/null || { echo "needs redis-server: apt-get install redis-server" >&2; exit 1; }
# Redis cannot take port 0: find a free port by binding 127.0.0.1:0.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
REDIS_PID=$!
trap 'kill $REDIS_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
OUT=$(mktemp /tmp/quota-bench.XXXXXX)
IG_QUOTA=1 REDIS_URL="redis://127.0.0.1:$PORT" PEERS=0 IDLE_STREAMS=0 \
  "$ROOT/loadtest/dataplane_bench.sh" | tee "$OUT"
CALLS=$(redis-cli -p "$PORT" info commandstats | awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/ {n += $3} END {print n + 0}')
echo
echo "## quotas' cost (medians above)"
python3 - "$OUT" "$CALLS" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r'^(\S+)\s+(\d+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(\d+)\s', line)
    if m:
        rows[m.group(1)] = tuple(float(x) for x in m.groups()[1:])
base = rows.get("infergate")
for name in ("quota-local", "quota-redis"):
    if base and name in rows:
        r = rows[name]
        print(f"  {name}: req/s x{r[0] / base[0]:.3f} of quotas off; added p99 {r[2] - base[2]:+.3f} ms, "
              f"added p50 {r[1] - base[1]:+.3f} ms over quotas off")
calls = int(sys.argv[2])
decisions = 0
for line in open(sys.argv[1]):
    m = re.match(r'^quota-redis decisions: (\d+)', line)
    if m:
        decisions = int(m.group(1))
print(f"  Redis script calls (EVALSHA/EVAL) during the run: {calls}; quota decisions of the Redis target: {decisions}")
if decisions:
    print(f"  => {calls / decisions:.4f} Redis round trips per request (target: at most 1)")
print("  targets: req/s within 10% of quotas off (x0.900 or more); added p99 under 0.2 ms")
PY
