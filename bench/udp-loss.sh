#!/usr/bin/env bash
# Issue 16's UDP loss case, side by side: `iperf3 -u -b 2G -l 32K -t 3`
# direct to an `iperf3 -s` on 127.0.0.1 and through one or two ringport
# binaries (e.g. before and after a change), interleaved round by round.
# Per run it prints the receiver's loss, the system's UdpRcvbufErrors and
# every UDP socket whose `ss -uam` drop counter (cumulative per socket) was
# non-zero at 90% of the run, named by its process. With CAPTURE=1 it also
# records each run with tcpdump on lo (64-byte snaplen) and prints the
# burst shape of every leg (bench/udp_bursts.py).
#
#   bench/udp-loss.sh RINGPORT_BIN [ROUNDS] [-- extra ringport args]
#   BIN2=other/ringport bench/udp-loss.sh target/release/ringport 5
#
# Ports are derived from the process id; every process is stopped on exit.
# Traffic goes to 127.0.0.1 only.
set -u
BIN=$1 ROUNDS=${2:-5}
shift $(($# < 2 ? $# : 2))
[ "${1:-}" = -- ] && shift
EXTRA=("$@")
CAPTURE=${CAPTURE:-0}
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d /tmp/ringport-udp-loss.XXXXXX)
# Below the ephemeral range (32768-60999), so no client port collides.
B=$((20000 + ($$ % 1200) * 10))
SP=$B
PIDS=""
trap 'kill $PIDS 2>/dev/null; wait 2>/dev/null' EXIT
iperf3 -s -B 127.0.0.1 -p "$SP" >"$W/iperf3-server.log" 2>&1 &
PIDS="$PIDS $!"

# start_ringport BIN NAME PORT: one Service with TCP and UDP on PORT to the
# iperf3 server; proxy and admin ports follow PORT.
start_ringport() {
  local bin=$1 name=$2 port=$3 mp=$(($3 + 7)) i
  cat >"$W/$name.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: iperf, namespace: default}
spec:
  clusterIP: 10.96.0.91
  externalIPs: ["127.0.0.1"]
  ports:
    - {name: ctl, protocol: TCP, port: $port}
    - {name: data, protocol: UDP, port: $port}
---
apiVersion: v1
kind: Endpoints
metadata: {name: iperf, namespace: default}
subsets:
  - addresses: [{ip: 127.0.0.1}]
    ports:
      - {name: ctl, protocol: TCP, port: $SP}
      - {name: data, protocol: UDP, port: $SP}
YAML
  RUST_LOG=warn "$bin" run --config "$W/$name.yaml" --workers 2 --no-pin --redirect none --handover-socket none \
    --bind-address 127.0.0.1 --proxy-port-range "$((port + 1))-$((port + 6))" \
    --metrics-bind-address "127.0.0.1:$mp" --healthz-bind-address "127.0.0.1:$((mp + 1))" \
    "${EXTRA[@]}" >"$W/$name.log" 2>&1 &
  PIDS="$PIDS $!"
  for i in $(seq 50); do curl -fsS -o /dev/null "http://127.0.0.1:$mp/readyz" 2>/dev/null && return; sleep 0.1; done
  echo "$name did not become ready:" >&2; tail -5 "$W/$name.log" >&2; exit 1
}
PEERS=(direct ringport)
start_ringport "$BIN" ringport $((B + 10))
if [ -n "${BIN2:-}" ]; then start_ringport "$BIN2" ringport2 $((B + 20)); PEERS+=(ringport2); fi
sleep 0.5

run() { # peer port round
  local peer=$1 port=$2 r=$3 o=$W/$1.$3 td=""
  nstat -n
  if [ "$CAPTURE" = 1 ]; then
    timeout 6 tcpdump -i lo -nn -s 64 -B 65536 -w "$o.pcap" udp 2>/dev/null &
    td=$!; sleep 0.5
  fi
  (sleep 2.7; ss -uamnpH >"$o.ss" 2>/dev/null) &
  local sampler=$!
  timeout 30 iperf3 -c 127.0.0.1 -p "$port" -u -b 2G -l 32K -t 3 -J >"$o.json" 2>"$o.err"
  wait "$sampler"
  nstat -z 'Udp*' >"$o.nstat"
  printf '%-9s r%s  loss %6.2f%% of %6s  UdpRcvbufErrors %6s  socket drops: %s\n' "$peer" "$r" \
    "$(jq '.end.sum.lost_percent // -1' "$o.json")" "$(jq '.end.sum.packets // 0' "$o.json")" \
    "$(awk '/UdpRcvbufErrors/ { print $2 }' "$o.nstat")" \
    "$(awk '!/skmem:/ { l = $4; p = $5; proc = $NF; next }
        match($0, /,d[0-9]+\)/) { d = substr($0, RSTART + 2, RLENGTH - 3) + 0
          if (d > 0) { gsub(/users:\(\("|",pid=.*/, "", proc); printf "%s->%s %s d=%d; ", l, p, proc, d } }' "$o.ss")"
  if [ -n "$td" ]; then
    sleep 0.3; kill "$td" 2>/dev/null; wait "$td" 2>/dev/null
    python3 "$HERE/udp_bursts.py" "$o.pcap" | sed 's/^/    /'
  fi
}
for r in $(seq "$ROUNDS"); do
  run direct "$SP" "$r"
  run ringport $((B + 10)) "$r"
  [ -n "${BIN2:-}" ] && run ringport2 $((B + 20)) "$r"
done
echo "files: $W"
