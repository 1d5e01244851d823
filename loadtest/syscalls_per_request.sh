#!/usr/bin/env bash
# System calls (and, with perf, context switches and CPU) per small request
# of the gateway: `infergate serve` (auth: keys with 1,000 keys, the default
# policy, one serving worker per CPU) in front of one instant sim replica,
# under oha (64 connections, small chat completions) for SECS seconds.
#   strace: `strace -c -f` on the gateway's process, printed per request,
#           by system call (strace batches the workers' wake-ups, so the
#           epoll_wait count says little; the reads, writes and writevs do)
#   perf:   all system calls, context switches and task-clock per request
#
#   bash loadtest/syscalls_per_request.sh IG_BINARY [strace|perf]
# Env: SECS (3), BIN (target/release: the sim), BENCH_BASE_PORT (18600: the
# upstream takes +1, the gateway +10 and +11). Needs oha (cargo install oha),
# strace or perf. Compare builds interleaved: the counts hold under load,
# the CPU does not.
set -u
IG=$1; MODE=${2:-strace}; SECS=${SECS:-3}
BIN=${BIN:-target/release}
BASE=${BENCH_BASE_PORT:-18600}
UP=$((BASE + 1)); PX=$((BASE + 10)); AD=$((BASE + 11))
RUN=$(mktemp -d /tmp/syscalls.XXXX)
. "$(dirname "$0")/bench_one_replica.sh"
bench_gateway_config
bench_sim
"$IG" serve --config "$RUN/gw.yaml" >"$RUN/gw.log" 2>&1 &
GW=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$AD/readyz" && break; sleep 0.2; done
BODY='{"model":"bench-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
OHA=(oha -c 64 --no-tui --output-format json -m POST -H 'content-type: application/json'
  -H 'authorization: Bearer sk-bench-1000' -d "$BODY" "http://127.0.0.1:$PX/v1/chat/completions")
"${OHA[@]}" -z 1s >/dev/null 2>&1   # warm-up: connections open, not counted
answered() { python3 -c "import json; v=json.load(open('$RUN/oha.json')); print(sum(v['statusCodeDistribution'].values()))"; }
if [[ $MODE == strace ]]; then
  strace -c -f -p $GW -o "$RUN/strace.txt" &
  ST=$!
  sleep 0.5
  "${OHA[@]}" -z "${SECS}s" >"$RUN/oha.json" 2>/dev/null
  kill -INT $ST; wait $ST 2>/dev/null
  N=$(answered)
  echo "requests answered: $N"
  awk -v n="$N" 'NR > 2 && $NF != "total" && $4 + 0 > 0 { printf "%-16s %8.3f per request\n", $NF, $4 / n }' \
    "$RUN/strace.txt" | sort -k2 -rn | head -12
else
  perf stat -e raw_syscalls:sys_enter,context-switches,task-clock -p $GW -o "$RUN/perf.txt" -- sleep $((SECS + 1)) &
  PF=$!
  sleep 0.3
  "${OHA[@]}" -z "${SECS}s" >"$RUN/oha.json" 2>/dev/null
  wait $PF
  N=$(answered)
  echo "requests answered: $N"
  awk -v n="$N" '/sys_enter/ { gsub(",", "", $1); printf "system calls     %8.3f per request\n", $1 / n }
    /context-switches/ { gsub(",", "", $1); printf "context switches %8.3f per request\n", $1 / n }
    /task-clock/ { gsub(",", "", $1); printf "task-clock       %8.2f µs per request\n", $1 * 1000 / n }' "$RUN/perf.txt"
fi
kill $GW $SIM; wait $GW $SIM 2>/dev/null
rm -rf "$RUN"
