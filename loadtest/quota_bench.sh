#!/usr/bin/env bash
# The cost of quotas: loadtest/dataplane_bench.sh with its quota targets, in
# the same interleaved rounds as plain infergate (quotas off) and direct:
#   quota-local  a quota on every caller, counted in-process (no Redis)
#   quota-redis  the same quota shared through a redis-server on loopback,
#                failing closed (so a request that did not reach Redis fails
#                rather than passing as a fast local decision)
# Prints:
#   - req/s at saturation (median of ROUNDS rounds) against quotas off
#     (target x0.900 or more);
#   - added p99 and p50 at a fixed open-loop rate (LAT_RATE, default 2,000/s):
#     per latency round the difference to quotas off *in the same round*
#     (the order rotates each round), then the median of those paired
#     differences, their min/max and a 90% bootstrap interval of the median;
#     verdict against 0.2 ms (met when the interval's top is under it);
#   - the time quotas take inside each gateway (infergate_quota_decision_seconds,
#     read from /metrics at phase ends): count, mean and the p50/p99/max
#     bucket bounds per mode, stage (reserve, settle) and path (local counters,
#     Redis lease, Redis round trip, fallback), in the latency phase and at
#     saturation;
#   - Redis round trips per request (target: at most 1).
# By default the load tool runs on CPU 0 and every server (upstream,
# gateways, Redis) on CPU 1 (PIN=0: no pinning), so the client's own
# scheduling lag stops dominating the p99. Needs redis-server (apt-get
# install redis-server) and a release build (SKIP_BUILD=1 reuses it).
#
#   loadtest/quota_bench.sh                      # about 4 minutes
#   SKIP_BUILD=1 LAT_ROUNDS=12 LAT_RATE=1000 PIN=0 loadtest/quota_bench.sh
# Env (defaults): DUR=4 ROUNDS=3 (saturation), LAT_DUR=4 LAT_ROUNDS=8
# LAT_RATE=2000 LAT_SKIP=direct (latency: direct is not compared here, so
# it is left out of the rounds), PIN=1 LOAD_CPUS=0 SERVER_CPUS=1, OHA=0 (1: the
# saturation phase again with oha), REDIS_CPUS (unset: with the servers;
# 0: on the load tool's CPU), PHASES=sat,lat (add sse for the SSE
# relay), BENCH_BASE_PORT; the rest as dataplane_bench.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v redis-server >/dev/null || { echo "needs redis-server: apt-get install redis-server" >&2; exit 1; }
export DUR=${DUR:-4} ROUNDS=${ROUNDS:-3} LAT_DUR=${LAT_DUR:-4} LAT_ROUNDS=${LAT_ROUNDS:-8}
export LAT_RATE=${LAT_RATE:-2000} OHA=${OHA:-0} PHASES=${PHASES:-sat,lat} LAT_SKIP=${LAT_SKIP-direct}
export PIN=${PIN:-1} LOAD_CPUS=${LOAD_CPUS:-0} SERVER_CPUS=${SERVER_CPUS:-1}
(( $(nproc) >= 2 )) || PIN=0
SRV=(); [[ $PIN != 0 ]] && SRV=(taskset -c "$SERVER_CPUS")
# REDIS_CPUS=0: redis-server off the gateway's CPU (as a Redis on its own host would be)
RSRV=("${SRV[@]}"); [[ $PIN != 0 && -n ${REDIS_CPUS:-} ]] && RSRV=(taskset -c "$REDIS_CPUS")
echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
# Redis cannot take port 0: find a free port by binding 127.0.0.1:0.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${RSRV[@]}" redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
REDIS_PID=$!
OUT=$(mktemp /tmp/quota-bench.XXXXXX)
trap 'kill $REDIS_PID 2>/dev/null || true; rm -f "$OUT"' EXIT
for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
IG_QUOTA=1 REDIS_URL="redis://127.0.0.1:$PORT" PEERS=0 IDLE_STREAMS=0 \
  "$ROOT/loadtest/dataplane_bench.sh" | tee "$OUT"
CALLS=$(redis-cli -p "$PORT" info commandstats | awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/ {n += $3} END {print n + 0}')
RUN=$(awk '/^# logs and raw JSON: / {print $NF}' "$OUT")
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "## quotas' cost"
python3 - "$OUT" "$CALLS" "$RUN" "$LAT_RATE" <<'PY'
import glob, json, os, random, re, statistics, sys
out, calls, run, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = {}
for line in open(out):
    m = re.match(r'^(\S+)\s+(\d+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(\d+)\s', line)
    if m:
        rows[m.group(1)] = tuple(float(x) for x in m.groups()[1:])
base = rows.get("infergate")
print("req/s at saturation (medians):")
for name in ("quota-local", "quota-redis"):
    if base and name in rows and base[0] > 0:
        print(f"  {name}: x{rows[name][0] / base[0]:.3f} of quotas off (target x0.900 or more)")

def lat(name, r, q):
    try:
        return json.load(open(f"{run}/lat-{name}-{r}.json"))["e2e_ms"][q]
    except Exception:
        return None

rounds = sorted({int(m.group(1)) for f in glob.glob(f"{run}/lat-infergate-*.json")
                 if (m := re.search(r'-(\d+)\.json$', f))})
random.seed(1)
def boot(d, n=2000):  # 90% bootstrap interval of the median
    meds = sorted(statistics.median(random.choices(d, k=len(d))) for _ in range(n))
    return meds[int(0.05 * n)], meds[int(0.95 * n) - 1]
if rounds:
    print(f"added latency at {rate} req/s, paired per round against quotas off ({len(rounds)} rounds):")
    for name in ("quota-local", "quota-redis"):
        for q in ("p50", "p99"):
            d = [a - b for r in rounds
                 if (a := lat(name, r, q)) is not None and (b := lat("infergate", r, q)) is not None]
            if not d:
                continue
            lo, hi = boot(d)
            line = (f"  {name} added {q}: median {statistics.median(d):+.3f} ms "
                    f"(min {min(d):+.3f}, max {max(d):+.3f}; 90% interval {lo:+.3f}..{hi:+.3f})")
            if q == "p99":
                verdict = ("met" if hi < 0.2 else "missed" if lo >= 0.2
                           else "not decided (the interval spans 0.2 ms: more rounds or a quieter machine)")
                line += f" -> under 0.2 ms: {verdict}"
            print(line)
    base99 = [v for r in rounds if (v := lat("infergate", r, "p99")) is not None]
    lag = [json.load(open(f))["schedule_lag_ms"]["p99"] for f in glob.glob(f"{run}/lat-infergate-[0-9]*.json")]
    print(f"  quotas off p99 itself: {min(base99):.3f}..{max(base99):.3f} ms over rounds; "
          f"load tool schedule lag p99 median {statistics.median(lag):.3f} ms")

# The decision-time histograms: the difference between two snapshots.
def hist(path):
    h = {}
    if not os.path.exists(path):
        return h
    for line in open(path):
        m = re.match(r'^infergate_quota_decision_seconds_(bucket|count|sum)\{(.*)\} (\S+)$', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        le = labels.pop("le", None)
        key = (labels.get("mode"), labels.get("stage"), labels.get("path"))
        e = h.setdefault(key, {"b": {}, "count": 0.0, "sum": 0.0})
        if m.group(1) == "bucket":
            e["b"][float(le)] = float(m.group(3))
        else:
            e[m.group(1)] = float(m.group(3))
    return h

def bound(b, n, q):  # the bucket bound holding quantile q of n samples
    for le in sorted(b):
        if b[le] >= q * n:
            return le
    return float("inf")

def us(v):
    return ">50000 us" if v == float("inf") else f"<={v * 1e6:g} us"

for name in ("quota-local", "quota-redis"):
    for (a, b, what) in (("sat", "lat", f"latency phase, {rate} req/s"), ("start", "sat", "saturation phase")):
        h0, h1 = hist(f"{run}/metrics-{name}-{a}.txt"), hist(f"{run}/metrics-{name}-{b}.txt")
        printed = False
        for key in sorted(h1):
            e1, e0 = h1[key], h0.get(key, {"b": {}, "count": 0.0, "sum": 0.0})
            n = e1["count"] - e0["count"]
            if n <= 0:
                continue
            if not printed:
                print(f"time in quotas inside {name} ({what}; infergate_quota_decision_seconds):")
                printed = True
            bk = {le: v - e0["b"].get(le, 0.0) for le, v in e1["b"].items()}
            mean = (e1["sum"] - e0["sum"]) / n
            mode, stage, path = key
            print(f"  {stage:7} {path:8} n={int(n):7d}  mean {mean * 1e6:8.2f} us  p50 {us(bound(bk, n, 0.5)):>10}  "
                  f"p99 {us(bound(bk, n, 0.99)):>10}  max {us(bound(bk, n, 1.0)):>10}")

# What quotas add to a request inside the gateway, every path together: the
# reserve histograms of all paths merged (in-memory paths are timed one in
# SAMPLE_EVERY = 16, so their buckets count 16 times; Redis calls and
# fallbacks are all timed), plus settling. Each stage's 99.5th percentile
# bucket bound: their sum bounds the p99 of the two together (each is passed
# by at most 0.5% of requests). Supporting evidence for the
# end-to-end figure above, not a replacement: it leaves out what quotas cost
# the gateway outside the request (background calls, redis-server's CPU).
SAMPLE_EVERY = 16
def stage_q(h0, h1, stage, q=0.995):
    merged, n = {}, 0.0
    for key, e1 in h1.items():
        if key[1] != stage:
            continue
        e0 = h0.get(key, {"b": {}, "count": 0.0})
        w = SAMPLE_EVERY if key[2] in ("local", "lease") or stage == "settle" else 1
        n += w * (e1["count"] - e0["count"])
        for le, v in e1["b"].items():
            merged[le] = merged.get(le, 0.0) + w * (v - e0["b"].get(le, 0.0))
    return (bound(merged, n, q), n) if n > 0 else (None, 0)
for name in ("quota-local", "quota-redis"):
    h0, h1 = hist(f"{run}/metrics-{name}-sat.txt"), hist(f"{run}/metrics-{name}-lat.txt")
    (r, n), (st, _) = stage_q(h0, h1, "reserve"), stage_q(h0, h1, "settle")
    if r is not None and st is not None:
        total = r + st
        print(f"gateway-side: {name} quota time per request, all paths (latency phase, ~{int(n)} requests): "
              f"reserve p99.5 {us(r)} + settle p99.5 {us(st)} -> p99 at most {total * 1e3:.3f} ms "
              f"({'under' if total < 0.0002 else 'not shown under'} 0.2 ms; supporting figure, not the target)")

# Why requests of the Redis target asked Redis (infergate_quota_redis_waits_total),
# and how many of them waited on a call in flight instead (joined).
def waits(path):
    w = {}
    if os.path.exists(path):
        for line in open(path):
            m = re.match(r'^infergate_quota_redis_waits_total\{reason="(\w+)"\} (\S+)$', line)
            if m:
                w[m.group(1)] = float(m.group(2))
            m = re.match(r'^infergate_quota_redis_joined_total (\S+)$', line)
            if m:
                w["(joined)"] = float(m.group(1))
    return w
for (a, b, what) in (("sat", "lat", f"latency phase, {rate} req/s"), ("start", "sat", "saturation phase")):
    w0, w1 = waits(f"{run}/metrics-quota-redis-{a}.txt"), waits(f"{run}/metrics-quota-redis-{b}.txt")
    d = {k: int(v - w0.get(k, 0.0)) for k, v in sorted(w1.items()) if v - w0.get(k, 0.0) > 0}
    print(f"requests not admitted from a lease in quota-redis ({what}; by reason): "
          + (", ".join(f"{k} {v}" for k, v in d.items()) or "none"))

decisions = 0
for line in open(out):
    m = re.match(r'^quota-redis decisions: (\d+)', line)
    if m:
        decisions = int(m.group(1))
print(f"Redis script calls (EVALSHA/EVAL) during the run: {calls}; quota decisions of the Redis target: {decisions}")
if decisions:
    print(f"  => {calls / decisions:.4f} Redis round trips per request (target: at most 1)")
print("targets: req/s within 10% of quotas off (x0.900 or more); added p99 under 0.2 ms")
PY
