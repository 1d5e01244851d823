# Sourced by the per-request measurement scripts (instr_per_request.sh,
# syscalls_per_request.sh): the gateway they measure, with keys auth (1,000
# keys) and the default policy, in front of one instant sim replica.
# Needs RUN (a scratch dir), BIN (holds the sim), UP, PX and AD (ports).

# bench_gateway_config [MAIN_LISTENER_EXTRA]: writes $RUN/keys.yaml and
# $RUN/gw.yaml; MAIN_LISTENER_EXTRA (e.g. ", workers: 1") goes into the main
# listener, EXTRA_YAML (env) at the end of the config.
bench_gateway_config() {
  local i
  for i in $(seq 1000); do
    printf -- '- {id: k%d, sha256: %s, team: t%d}\n' "$i" \
      "$(printf 'sk-bench-%d' "$i" | sha256sum | cut -d' ' -f1)" "$((i % 10))"
  done >"$RUN/keys.yaml"
  cat >"$RUN/gw.yaml" <<YAML
listeners:
  main: { address: "127.0.0.1:$PX"${1:-} }
  admin: { address: "127.0.0.1:$AD" }
logging: { level: warn }
auth: { mode: keys, key_file: $RUN/keys.yaml }
pools:
  - name: bench
    endpoints: ["http://127.0.0.1:$UP"]
routes:
  - model: bench-model
    pool: bench
${EXTRA_YAML:-}
YAML
}

# bench_sim: starts the instant replica in the background (its pid in SIM).
bench_sim() {
  "$BIN/infergate" sim --profile llama-8b-h100 --replicas 1 --base-port "$UP" --time-scale 1000000 \
    --served-model-name bench-model >/dev/null 2>&1 &
  SIM=$!
}
