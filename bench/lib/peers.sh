# shellcheck shell=bash
# Peers of the benchmark: the backends and each proxy in front of them.
#
# Sourced by bench/run.sh (and flamegraphs/record.sh). Every process started
# here is recorded with `track_pid` so the caller's EXIT trap stops it, even
# when the run fails half way. Every config lives in $WORK (a temp dir): the
# system nginx and haproxy services and their files are never touched.
#
# Needs: $WORK, $BIN (dir with ringport and loadgen), $PIN (0|1),
# $PROXY_WORKERS, $PORT_BASE.

PIDS=()
track_pid() { PIDS+=("$1"); }

# Stops every tracked process: TERM, a bounded wait, then KILL.
stop_all() {
  local pid i
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for i in $(seq 1 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  PIDS=()
}

# Prefix that puts a proxy on core 0 (--pin) or nowhere in particular.
proxy_cpu() { if [ "$PIN" = 1 ]; then echo "taskset -c 0"; fi; }
# Prefix for load generator and backends: core 1 under --pin.
load_cpu() { if [ "$PIN" = 1 ]; then echo "taskset -c 1"; fi; }
load_workers() { if [ "$PIN" = 1 ]; then echo 1; else nproc; fi; }

# Polls a condition (a command) every 50 ms for at most $1 seconds.
wait_until() {
  local secs=$1; shift
  local end=$(( $(date +%s%N) + secs * 1000000000 ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s%N)" -ge "$end" ] && return 1
    sleep 0.05
  done
}

port_free() { ! ss -Hltun "sport = :$1" | grep -q .; }

# Picks $PORT_BASE: the first block of 200 ports with nothing listening,
# below the ephemeral range so no outgoing connection can hold one of them.
choose_port_base() {
  local base p ok low
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
  for base in 21000 22000 23000 24000 25000 26000 27000 28000 29000; do
    [ $((base + 200)) -lt "$low" ] || continue
    ok=1
    for p in $(seq "$base" $((base + 199))); do port_free "$p" || { ok=0; break; }; done
    # IPERF_PORT is fixed with the block: every ringport manifest names it,
    # whether or not this run starts the iperf3 server.
    [ "$ok" = 1 ] && { PORT_BASE=$base; IPERF_PORT=$((base + 60)); return 0; }
  done
  echo "no free port block found" >&2; return 1
}

# Starts `loadgen serve` (echo, sink, source, udp echo on 127.0.0.1, free
# ports) and sets BACKEND_{ECHO,SINK,SOURCE,UDP} to their addresses.
start_backends() {
  local out=$WORK/backend.out bound
  # shellcheck disable=SC2046
  $(load_cpu) "$BIN/loadgen" serve --id backend --workers "$(load_workers)" \
    --tcp-echo 127.0.0.1:0 --tcp-sink 127.0.0.1:0 --tcp-source 127.0.0.1:0 \
    --udp-echo 127.0.0.1:0 --duration "${SERVE_BOUND:-30m}" >"$out" 2>"$WORK/backend.err" &
  track_pid $!
  BACKEND_PID=$!
  wait_until 10 grep -q listening "$out" || { cat "$WORK/backend.err" >&2; return 1; }
  bound=$(head -n1 "$out")
  BACKEND_ECHO=$(jq -r '.listening[] | select(.mode=="echo") | .addr' <<<"$bound")
  BACKEND_SINK=$(jq -r '.listening[] | select(.mode=="sink") | .addr' <<<"$bound")
  BACKEND_SOURCE=$(jq -r '.listening[] | select(.mode=="source") | .addr' <<<"$bound")
  BACKEND_UDP=$(jq -r '.listening[] | select(.mode=="udp-echo") | .addr' <<<"$bound")
}

# An iperf3 server (UDP loss at a fixed rate, `udp-iperf`) on PORT_BASE + 60.
# iperf3 talks TCP (control) and UDP (data) on one port, so a proxy in
# front of it serves both protocols on one port number.
start_iperf_server() {
  # shellcheck disable=SC2046
  $(load_cpu) iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >"$WORK/iperf3-server.log" 2>&1 &
  track_pid $!
  wait_until 10 listening "$IPERF_PORT" || { echo "iperf3 -s did not start:" >&2; cat "$WORK/iperf3-server.log" >&2; return 1; }
}

# Slots 1..5 live in PORT_BASE's first 100 ports, slots 6..10 in the next
# 100, the same way (slot 6 as slot 1, ...). Within its hundred, a peer of
# slot s listens on 10*s + {0 echo, 1 sink, 2 source, 3 udp}; ringport's
# admin ports are +8 and +9. Its iperf3 port (TCP and UDP) is 60 + s;
# ringport's six proxy ports are 60 + 6*s .. +5 (66..95 for s in 1..5).
# The iperf3 server itself is PORT_BASE + 60.
peer_slot() {
  case $1 in
    ringport) echo 1 ;; haproxy) echo 2 ;; nginx) echo 3 ;;
    ringport-copy) echo 4 ;; ringport-w1) echo 5 ;;
    ringport-ring) echo 6 ;; ringport-splice) echo 7 ;; *) return 1 ;;
  esac
}

# A port of a peer's slot: peer_port PEER KIND (base|iperf|proxy).
peer_port() {
  local slot hundred s
  slot=$(peer_slot "$1")
  hundred=$(( (slot - 1) / 5 * 100 )) s=$(( (slot - 1) % 5 + 1 ))
  case $2 in
    base) echo $((PORT_BASE + hundred + 10 * s)) ;;
    iperf) echo $((PORT_BASE + hundred + 60 + s)) ;;
    proxy) echo $((PORT_BASE + hundred + 60 + 6 * s)) ;;
  esac
}

# The address a scenario's load goes to for a peer; kind = echo|sink|source|udp.
peer_target() {
  local peer=$1 kind=$2 off
  if [ "$peer" = direct ]; then
    case $kind in
      echo) echo "$BACKEND_ECHO" ;; sink) echo "$BACKEND_SINK" ;;
      source) echo "$BACKEND_SOURCE" ;; udp) echo "$BACKEND_UDP" ;;
      iperf) echo "127.0.0.1:$IPERF_PORT" ;;
    esac
    return
  fi
  if [ "$kind" = iperf ]; then
    echo "127.0.0.1:$(peer_port "$peer" iperf)"
    return
  fi
  case $kind in echo) off=0 ;; sink) off=1 ;; source) off=2 ;; udp) off=3 ;; esac
  local ip=127.0.0.1
  redirected "$peer" && ip=$CLUSTER_IP
  echo "$ip:$(($(peer_port "$peer" base) + off))"
}

# The process ids making up a peer now (main process and its children).
peer_pids() {
  local main=${PEER_PID[$1]:-}
  [ -n "$main" ] || return 0
  echo "$main"
  pgrep -P "$main" || true
}

declare -A PEER_PID

port_of() { echo "${1##*:}"; }

# With --redirect, the cluster IP the main ringport peer is reached on: a
# loopback address no interface has, so it gets a rule, and the client's
# packets take the node's OUTPUT path (nat REDIRECT to the proxy port).
CLUSTER_IP=127.96.0.10

# Whether this peer is reached through the cluster IP and its rule.
redirected() { [ "${REDIRECT:-0}" = 1 ] && [ "$1" = ringport ]; }

# ringport on a generated manifest: one Service with fixed ports, reached on
# externalIPs 127.0.0.1 (or, with --redirect, on its cluster IP through its
# own nft rule), its Endpoints pointing at the backends.
# Args: peer name, workers, relay mode.
start_ringport() {
  local peer=$1 workers=$2 relay=$3 dir=$WORK/$1 base cluster=10.96.0.90 external='  externalIPs: ["127.0.0.1"]' redirect=none bind=127.0.0.1
  base=$(peer_port "$peer" base)
  redirected "$peer" && { cluster=$CLUSTER_IP external="" redirect=nft bind=0.0.0.0; }
  mkdir -p "$dir"
  cat >"$dir/bench.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: default}
spec:
  clusterIP: $cluster
$external
  ports:
    - {name: echo, protocol: TCP, port: $base, targetPort: echo}
    - {name: sink, protocol: TCP, port: $((base + 1)), targetPort: sink}
    - {name: source, protocol: TCP, port: $((base + 2)), targetPort: source}
    - {name: udp, protocol: UDP, port: $((base + 3)), targetPort: udp}
---
apiVersion: v1
kind: Endpoints
metadata: {name: bench, namespace: default}
subsets:
  - addresses: [{ip: 127.0.0.1}]
    ports:
      - {name: echo, protocol: TCP, port: $(port_of "$BACKEND_ECHO")}
      - {name: sink, protocol: TCP, port: $(port_of "$BACKEND_SINK")}
      - {name: source, protocol: TCP, port: $(port_of "$BACKEND_SOURCE")}
      - {name: udp, protocol: UDP, port: $(port_of "$BACKEND_UDP")}
---
apiVersion: v1
kind: Service
metadata: {name: iperf, namespace: default}
spec:
  clusterIP: 10.96.0.91
  externalIPs: ["127.0.0.1"]
  ports:
    - {name: ctl, protocol: TCP, port: $(peer_port "$peer" iperf)}
    - {name: data, protocol: UDP, port: $(peer_port "$peer" iperf)}
---
apiVersion: v1
kind: Endpoints
metadata: {name: iperf, namespace: default}
subsets:
  - addresses: [{ip: 127.0.0.1}]
    ports:
      - {name: ctl, protocol: TCP, port: $IPERF_PORT}
      - {name: data, protocol: UDP, port: $IPERF_PORT}
YAML
  local pin_flag=--no-pin
  [ "$PIN" = 1 ] && pin_flag=
  # shellcheck disable=SC2046,SC2086
  RUST_LOG=${RUST_LOG:-warn} $(proxy_cpu) "$BIN/ringport" run --config "$dir/bench.yaml" --handover-socket none \
    --workers "$workers" $pin_flag --relay "$relay" --redirect "$redirect" --bind-address "$bind" \
    --proxy-port-range "$(peer_port "$peer" proxy)-$(($(peer_port "$peer" proxy) + 5))" \
    --metrics-bind-address "127.0.0.1:$((base + 8))" \
    --healthz-bind-address "127.0.0.1:$((base + 9))" >"$dir/out.log" 2>&1 &
  track_pid $!
  PEER_PID[$peer]=$!
  wait_until 15 curl -fsS -o /dev/null "http://127.0.0.1:$((base + 8))/readyz" ||
    { echo "$peer did not become ready:" >&2; tail -20 "$dir/out.log" >&2; return 1; }
  if ! redirected "$peer"; then
    wait_until 5 listening "$base" || { echo "$peer: nothing on port $base" >&2; return 1; }
  fi
}

listening() { ss -Hltn "sport = :$1" | grep -q .; }

# HAProxy in TCP mode with kernel splicing both ways, nbthread = workers.
start_haproxy() {
  local dir=$WORK/haproxy base cpumap=""
  base=$(peer_port haproxy base)
  mkdir -p "$dir"
  [ "$PIN" = 1 ] && cpumap="    cpu-map auto:1/1-1 0"
  cat >"$dir/haproxy.cfg" <<CFG
global
    nbthread $PROXY_WORKERS
$cpumap
    maxconn 7000
    pidfile $dir/haproxy.pid

defaults
    mode tcp
    maxconn 7000
    backlog 4096
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    option splice-request
    option splice-response

frontend fe_echo
    bind 127.0.0.1:$base
    default_backend be_echo
frontend fe_sink
    bind 127.0.0.1:$((base + 1))
    default_backend be_sink
frontend fe_source
    bind 127.0.0.1:$((base + 2))
    default_backend be_source

backend be_echo
    server echo $BACKEND_ECHO
backend be_sink
    server sink $BACKEND_SINK
backend be_source
    server source $BACKEND_SOURCE
CFG
  # shellcheck disable=SC2046
  $(proxy_cpu) haproxy -db -f "$dir/haproxy.cfg" >"$dir/out.log" 2>&1 &
  track_pid $!
  PEER_PID[haproxy]=$!
  wait_until 10 listening "$base" || { echo "haproxy did not start:" >&2; tail -20 "$dir/out.log" >&2; return 1; }
}

# nginx stream{} proxy, worker_processes = workers, in the foreground with
# its own prefix, pid file and error log.
start_nginx() {
  local dir=$WORK/nginx base affinity=""
  base=$(peer_port nginx base)
  mkdir -p "$dir/logs"
  [ "$PIN" = 1 ] && affinity="worker_cpu_affinity 0001;"
  cat >"$dir/nginx.conf" <<CFG
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process on;
worker_processes $PROXY_WORKERS;
$affinity
worker_rlimit_nofile 19500;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 12000; }
stream {
    proxy_connect_timeout 2s;
    proxy_timeout 120s;
    server { listen 127.0.0.1:$base reuseport backlog=4096; proxy_pass $BACKEND_ECHO; }
    server { listen 127.0.0.1:$((base + 1)) reuseport backlog=4096; proxy_pass $BACKEND_SINK; }
    server { listen 127.0.0.1:$((base + 2)) reuseport backlog=4096; proxy_pass $BACKEND_SOURCE; }
    server {
        listen 127.0.0.1:$((base + 3)) udp reuseport;
        proxy_pass $BACKEND_UDP;
        proxy_responses 1;
        proxy_timeout 5s;
    }
}
CFG
  # shellcheck disable=SC2046
  $(proxy_cpu) nginx -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" >"$dir/out.log" 2>&1 &
  track_pid $!
  PEER_PID[nginx]=$!
  wait_until 10 listening "$base" || { echo "nginx did not start:" >&2; tail -20 "$dir/logs/error.log" >&2; return 1; }
}
