#!/bin/bash
# The data-plane benchmark's latency phase alone, for diagnosis: infergate with W serving
# threads (listeners.main.workers) in front of one fast sim replica, open loop at RATE req/s
# for 8 s; prints ok/s, end-to-end ms and the load tool's own schedule lag (the client
# falling behind its schedule means the machine, not the gateway, is the bottleneck).
# Usage (after cargo build --release): bash loadtest/latency_phase.sh [W=2] [RATE=10700]
# Env: LOAD_ARGS adds load-tool flags (the benchmark uses --max-in-flight 64);
# TARGET_PORT=18301 sends to the replica directly, for the baseline.
B=${BIN_DIR:-target/release}
W=${1:-2}; RATE=${2:-10700}
$B/infergate sim --profile llama-8b-h100 --replicas 1 --base-port 18301 --time-scale 1000000 --served-model-name bench-model >/dev/null 2>&1 &
SIM=$!
cat > ${TMPDIR:-/tmp}/latency_phase.yaml <<Y
listeners:
  main: { address: "127.0.0.1:18310", workers: $W }
  admin: { address: "127.0.0.1:18311" }
logging: { level: warn }
pools:
  - name: bench
    endpoints: ["http://127.0.0.1:18301"]
routes:
  - model: bench-model
    pool: bench
    routing: { policy: least_request }
Y
$B/infergate serve --config ${TMPDIR:-/tmp}/latency_phase.yaml >/dev/null 2>${TMPDIR:-/tmp}/latency_phase.err &
GW=$!
sleep 1.5
$B/infergate-load --url http://127.0.0.1:${TARGET_PORT:-18310} --model bench-model --json --workload small --max-tokens 1 --rate $RATE -d 8 --warmup 1 ${LOAD_ARGS:-} > ${TMPDIR:-/tmp}/latency_phase.json 2>/dev/null
python3 -c "
import json; d=json.load(open('${TMPDIR:-/tmp}/latency_phase.json'))
print('workers $W rate $RATE', 'ok/s', round(d['ok_per_s']), 'e2e', {k:round(v,2) for k,v in d.get('e2e_ms',{}).items() if k in ('p50','p99','max')}, 'lag', {k:round(v,2) for k,v in d['schedule_lag_ms'].items() if k in ('p50','p90','p99')})"
kill $GW $SIM; wait 2>/dev/null
