#!/usr/bin/env bash
# Instructions per request of the gateway, which machine load does not change:
# `infergate serve` (auth: keys with 1,000 keys, the default routing policy,
# one serving worker) under valgrind's callgrind in front of one instant sim
# replica, instrumented only while N small chat completions are sent
# (400 req/s), then dumped. Divide the total (callgrind_annotate OUT.1) by N;
# `callgrind_annotate --inclusive=yes OUT.1` shows where they go. Also prints
# the heap allocations per request (calls into mimalloc).
#
#   bash loadtest/instr_per_request.sh DIR OUT [N=2000]   # DIR holds the infergate to measure
# Env: BIN (target/release): the sim and the load tool. EXTRA_YAML: appended to
# the gateway's config (loadtest/quota_instr.sh adds quotas). BENCH_BASE_PORT
# (18500): the ports used. STREAM=TOKENS: streaming requests of TOKENS tokens
# each instead (SSE, --no-usage, 8 at once), N of them at 100 req/s; prints the
# instructions per relayed chunk too. Needs valgrind.
#   STREAM=256 bash loadtest/instr_per_request.sh DIR OUT 400   # per SSE chunk
set -eu
DIR=$1; OUT=$2; N=${3:-2000}
BIN=${BIN:-target/release}
RUN=$(mktemp -d /tmp/instr.XXXX)
BASE=${BENCH_BASE_PORT:-18500}
UP=$((BASE + 1)); PX=$((BASE + 10)); AD=$((BASE + 11))
STREAM=${STREAM:-}
. "$(dirname "$0")/bench_one_replica.sh"
bench_gateway_config ", workers: 1"
bench_sim
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" "$DIR/infergate" serve \
  --config "$RUN/gw.yaml" >"$RUN/gw.log" 2>&1 &
VG=$!
for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$AD/readyz" && break; sleep 0.2; done
if [[ -n $STREAM ]]; then
  WL=(--workload stream --max-tokens "$STREAM" --no-usage --max-in-flight 8); RATE=100
else
  WL=(--workload small --max-tokens 1 --max-in-flight 16); RATE=400
fi
load() { "$BIN/infergate-load" --url "http://127.0.0.1:$PX" --model bench-model "${WL[@]}" \
  -H "authorization:Bearer sk-bench-1000" "$@"; }
load --rate 50 -d 2 >/dev/null 2>&1   # warm-up, not counted
callgrind_control -i on $VG >/dev/null
load --rate $RATE -d $((N / RATE)) --json >"$OUT.load.json" 2>/dev/null
callgrind_control -i off $VG >/dev/null
callgrind_control -d $VG >/dev/null
sleep 1
kill $VG $SIM; wait $VG $SIM 2>/dev/null || true
python3 -c "import json; v=json.load(open('$OUT.load.json')); print('requests answered', v.get('ok'), 'errors', v.get('errors'))"
callgrind_annotate "$OUT.1" 2>/dev/null | grep 'PROGRAM TOTALS'
# Per request: instructions, and heap allocations (calls into mimalloc's
# allocate, zeroed-allocate and reallocate entry points, plain or aligned
# (src/allocator.rs uses the plain ones for word alignment), from any caller
# outside mimalloc).
python3 - "$OUT.1" "$OUT.load.json" "$STREAM" <<'PY'
import json, re, sys
names, allocs, total = {}, 0, 0
entry = {"mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned",
         "mi_malloc", "mi_zalloc", "mi_realloc"}
cfn = fn = None
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("cfn="):
        m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line.strip())
        if m:
            if m.group(2):
                names[m.group(1)] = m.group(2)
            cfn = names.get(m.group(1))
    elif line.startswith("fn="):
        m = re.match(r"fn=\((\d+)\)(?: (.*))?", line.strip())
        if m:
            if m.group(2):
                names[m.group(1)] = m.group(2)
            fn = names.get(m.group(1))
    elif line.startswith("calls=") and cfn in entry and not (fn or "").startswith(("mi_", "_mi_")):
        allocs += int(line.split("=")[1].split()[0])
    elif line.startswith("summary:") or line.startswith("totals:"):
        total = int(line.split()[1])
v = json.load(open(sys.argv[2]))
ok = v.get("ok") or 1
print(f"per request: {total / ok:,.0f} instructions, {allocs / ok:.1f} allocations")
if sys.argv[3]:
    chunks = v.get("output_tokens") or ok * int(sys.argv[3])
    print(f"per relayed chunk ({chunks} chunks): {total / chunks:,.0f} instructions, {allocs / chunks:.2f} allocations")
PY
rm -rf "$RUN"
