#!/usr/bin/env bash
# The cost of the PROXY protocol per connection: loadgen tcp-crr through two
# ringport processes in a row on loopback (one worker each), plain against a header sent by the first hop
# and accepted by the second (v2, v1), in interleaved rounds, side by side
# in one run. Prints conn/s and mean/p50/p99 latency per arm and round, and
# each arm's median ratio to plain. Loopback only; bounded (rounds x arms x
# duration). See docs/proxy-protocol.md.
#
#   bench/proxy_protocol.sh [BIN_DIR] [ROUNDS] [SECONDS]
#   (default target/release, 3 rounds, 5 s per arm and round)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release} ROUNDS=${2:-3} SECS=${3:-5}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ECHO=$(free_port)
"$BIN/loadgen" serve --tcp-echo "127.0.0.1:$ECHO" --workers 1 --duration 30m >/dev/null 2>&1 & PIDS+=($!)
svc() { # name ip port annotations endpoint-ip endpoint-port
  printf -- '---\napiVersion: v1\nkind: Service\nmetadata:\n  name: %s\n  namespace: default\n  annotations: {%s}\nspec:\n  clusterIP: None-placeholder\n  externalIPs: ["%s"]\n  ports: [{port: %s, targetPort: %s}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: %s, namespace: default}\nsubsets:\n- addresses: [{ip: "%s"}]\n  ports: [{port: %s}]\n' \
    "$1" "$4" "$2" "$3" "$6" "$1" "$5" "$6" | sed '/clusterIP: None-placeholder/d'
}
declare -A FRONT
for arm in plain:127.0.0.31: v2:127.0.0.32:v2 v1:127.0.0.33:v1; do
    IFS=: read -r name ip v <<<"$arm"
    p1=$(free_port) p2=$(free_port)
    send="" accept=""
    if [ -n "$v" ]; then send="ringport.io/proxy-protocol: $v"; accept="ringport.io/accept-proxy-protocol: $v"; fi
    svc "hop2-$name" "$ip" "$p2" "$accept" 127.0.0.1 "$ECHO" >>"$WORK/hop2.yaml"
    svc "hop1-$name" "$ip" "$p1" "$send" "$ip" "$p2" >>"$WORK/hop1.yaml"
    echo "$name $ip:$p1" >>"$WORK/fronts"
done
for hop in hop2 hop1; do
  METRICS=$(free_port)
  "$BIN/ringport" run --config "$WORK/$hop.yaml" --redirect none --handover-socket none --workers 1 --no-pin \
    --bind-address 127.0.0.1 --healthz-bind-address "127.0.0.1:$METRICS" \
    --metrics-bind-address "127.0.0.1:$METRICS" 2>"$WORK/$hop.log" & PIDS+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$METRICS/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$METRICS/readyz" >/dev/null || { cat "$WORK/$hop.log"; exit 1; }
done

while read -r name target; do FRONT[$name]=$target; done <"$WORK/fronts"
for round in $(seq "$ROUNDS"); do
  for name in plain v2 v1; do
    out=$("$BIN/loadgen" tcp-crr -t "${FRONT[$name]}" -c 8 -w 1 -d "${SECS}s" --warmup 1s --json)
    echo "$round $name $out" >>"$WORK/results"
  done
done
python3 - "$WORK/results" <<'PY'
import json, statistics, sys
rows = {}
print("round arm     conn/s    mean_us  p50_us  p99_us  errors")
for line in open(sys.argv[1]):
    rnd, arm, js = line.split(" ", 2)
    r = json.loads(js)
    lat = r["latency_us"] or {}
    rows.setdefault(arm, []).append(r)
    print(f"{rnd:>5} {arm:<6} {r['ops_per_s']:>8.0f} {lat.get('mean', 0):>9.1f} {lat.get('p50', 0):>7} {lat.get('p99', 0):>7} {r['errors_total']:>7}")
base = statistics.median(r["ops_per_s"] for r in rows["plain"])
base_us = statistics.median((r["latency_us"] or {}).get("mean", 0) for r in rows["plain"])
for arm in ("v2", "v1"):
    ops = statistics.median(r["ops_per_s"] for r in rows[arm])
    us = statistics.median((r["latency_us"] or {}).get("mean", 0) for r in rows[arm])
    print(f"{arm}: median {ops:.0f} conn/s vs plain {base:.0f} (ratio {ops / base:.3f}); "
          f"mean latency {us:.1f} us vs {base_us:.1f} us (+{us - base_us:.1f} us per connection, two hops)")
PY
