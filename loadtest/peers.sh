#!/usr/bin/env bash
# Starts and stops the peer proxies we benchmark against (vllm-router, sglang-router, nginx)
# in front of an explicit list of loopback upstreams, each on the ports you give, in the
# background with a pid file, and waits until each is healthy. Loopback only.
#
#   peers.sh start KIND --port P --upstreams URL[,URL...] [--metrics-port M] [--policy POLICY]
#                       [--name NAME] [-- EXTRA ARGS...]
#       KIND: vllm-router | sglang-router | nginx
#       --policy: router policy (default cache_aware; nginx: round_robin or least_conn)
#       --metrics-port: the routers' Prometheus port (default P+1000)
#       --name: pid/log name (default KIND-P); EXTRA ARGS go to the router unchanged
#       prints: NAME URL [metrics URL]
#   peers.sh stop [NAME]        stops NAME, or every peer this script started in the run dir
#   peers.sh status             lists the pid files and whether each process is alive
#   peers.sh logs NAME          prints NAME's log
#
# Env: PEERS_VENV (/tmp/peers-venv: where ../shared/peers/setup.sh installs the routers),
#      INFERGATE_PEERS_RUN (/tmp/infergate-peers-run: pid files, logs, nginx config),
#      PEERS_WAIT_SECS (60: how long to wait for health).
set -euo pipefail
VENV="${PEERS_VENV:-/tmp/peers-venv}"
RUN="${INFERGATE_PEERS_RUN:-/tmp/infergate-peers-run}"
WAIT="${PEERS_WAIT_SECS:-60}"

# The routers must never reach the Hugging Face Hub: point Hub clients at a closed local port.
export HF_ENDPOINT="http://127.0.0.1:9" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

die() { echo "peers.sh: $*" >&2; exit 2; }

# Prints host:port of a loopback http URL, or dies.
loopback_hostport() {
  local url=$1 rest host
  [[ $url == http://* ]] || die "upstream $url: only http:// URLs"
  rest=${url#http://}; rest=${rest%%/*}
  host=${rest%:*}
  [[ $rest == *:* && ${rest##*:} =~ ^[0-9]+$ ]] || die "upstream $url: needs an explicit port"
  case $host in
    127.*|localhost|\[::1\]) ;;
    *) die "upstream $url: not a loopback address; refusing" ;;
  esac
  echo "$rest"
}

alive() { [[ -f "$RUN/$1.pid" ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start_bg() {  # name cmd...
  local name=$1; shift
  alive "$name" && die "$name is already running (pid $(cat "$RUN/$name.pid")); stop it first"
  "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
}

# Waits (bounded) until `curl URL` answers 2xx and its body matches PATTERN (if given).
wait_for() {  # name url [pattern]
  local name=$1 url=$2 pattern=${3:-} body i
  for ((i = 0; i < WAIT * 10; i++)); do
    alive "$name" || { echo "$name exited; log:" >&2; tail -20 "$RUN/$name.log" >&2; return 1; }
    if body=$(curl -sf --max-time 2 "$url" 2>/dev/null); then
      [[ -z $pattern ]] && return 0
      grep -qE "$pattern" <<<"$body" && return 0
    fi
    sleep 0.1
  done
  echo "$name: not healthy after ${WAIT}s at $url (last: ${body:-none}); log $RUN/$name.log" >&2
  tail -5 "$RUN/$name.log" >&2
  return 1
}

start() {
  local kind=${1:-} port="" metrics="" policy="" name="" upstreams="" extra=() urls=() hostports=()
  shift || true
  while [[ $# -gt 0 ]]; do
    case $1 in
      --port) port=$2; shift 2 ;;
      --metrics-port) metrics=$2; shift 2 ;;
      --policy) policy=$2; shift 2 ;;
      --name) name=$2; shift 2 ;;
      --upstreams|--upstream) upstreams+="${upstreams:+,}$2"; shift 2 ;;
      --) shift; extra=("$@"); break ;;
      *) die "unknown option $1 (see: peers.sh help)" ;;
    esac
  done
  [[ $port =~ ^[0-9]+$ ]] || die "--port P is required"
  [[ -n $upstreams ]] || die "--upstreams URL[,URL...] is required"
  IFS=, read -r -a urls <<<"$upstreams"
  for u in "${urls[@]}"; do hostports+=("$(loopback_hostport "$u")"); done
  metrics=${metrics:-$((port + 1000))}
  name=${name:-$kind-$port}
  mkdir -p "$RUN"
  local base="http://127.0.0.1:$port" n=${#urls[@]}
  # Both routers report `"healthy_workers":N` on /readiness once every worker passed its check.
  local ready="\"healthy_workers\": ?$n[,}]"
  case $kind in
    vllm-router)
      [[ -x $VENV/bin/vllm-router ]] || die "$VENV/bin/vllm-router missing: run ../shared/peers/setup.sh"
      start_bg "$name" "$VENV/bin/vllm-router" --host 127.0.0.1 --port "$port" \
        --worker-urls "${urls[@]}" --policy "${policy:-cache_aware}" \
        --prometheus-host 127.0.0.1 --prometheus-port "$metrics" \
        --worker-startup-check-interval 1 --worker-startup-timeout-secs "$WAIT" "${extra[@]}"
      wait_for "$name" "$base/readiness" "$ready"
      echo "$name $base metrics http://127.0.0.1:$metrics/metrics"
      ;;
    sglang-router)
      [[ -x $VENV/bin/sglang-router ]] || die "$VENV/bin/sglang-router missing: run ../shared/peers/setup.sh"
      start_bg "$name" "$VENV/bin/sglang-router" launch --host 127.0.0.1 --port "$port" \
        --worker-urls "${urls[@]}" --policy "${policy:-cache_aware}" \
        --prometheus-host 127.0.0.1 --prometheus-port "$metrics" \
        --worker-startup-check-interval 1 --worker-startup-timeout-secs "$WAIT" "${extra[@]}"
      wait_for "$name" "$base/readiness" "$ready"
      echo "$name $base metrics http://127.0.0.1:$metrics/metrics"
      ;;
    nginx)
      command -v nginx >/dev/null || die "nginx missing: apt-get install nginx-light"
      local balance=""
      case ${policy:-round_robin} in
        round_robin) ;;
        least_conn) balance="least_conn;" ;;
        *) die "nginx --policy: round_robin or least_conn" ;;
      esac
      local dir="$RUN/$name.nginx" servers=""
      mkdir -p "$dir/tmp"
      for hp in "${hostports[@]}"; do servers+="        server $hp max_fails=0;"$'\n'; done
      # Plain L7 baseline: upstream keep-alive, no buffering (SSE passes through as it comes).
      cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16384; multi_accept on; }
worker_rlimit_nofile 40000;
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path       $dir/tmp/proxy;
    fastcgi_temp_path     $dir/tmp/fastcgi;
    uwsgi_temp_path       $dir/tmp/uwsgi;
    scgi_temp_path        $dir/tmp/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    keepalive_requests 1000000;
    upstream workers {
        $balance
$servers        keepalive 256;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://workers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering on;
            proxy_cache off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_next_upstream error timeout;
        }
    }
}
CONF
      start_bg "$name" nginx -c "$dir/nginx.conf" -p "$dir" -g 'daemon off;' "${extra[@]}"
      wait_for "$name" "$base/health"
      echo "$name $base"
      ;;
    *) die "KIND must be vllm-router, sglang-router or nginx" ;;
  esac
}

stop_one() {
  local f=$1 name pid i
  name=$(basename "$f" .pid); pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    echo "stopped $name ($pid)"
  fi
  rm -f "$f"
}

cmd=${1:-help}; shift || true
case $cmd in
  start) start "$@" ;;
  stop)
    if [[ -n ${1:-} ]]; then
      [[ -f "$RUN/$1.pid" ]] && stop_one "$RUN/$1.pid"
    else
      for f in "$RUN"/*.pid; do [[ -e $f ]] && stop_one "$f"; done
    fi
    true
    ;;
  status)
    for f in "$RUN"/*.pid; do
      [[ -e $f ]] || continue
      n=$(basename "$f" .pid); s=dead; alive "$n" && s=running
      echo "$n pid=$(cat "$f") $s"
    done
    ;;
  logs) cat "$RUN/${1:?NAME}.log" ;;
  *) sed -n 2,20p "$0"; [[ $cmd == help ]] ;;
esac
