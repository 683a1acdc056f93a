#!/usr/bin/env bash
# Splice vs copy: ringport's two relay modes against a direct connection, in
# interleaved rounds on loopback (direct, splice, copy, direct, ...).
# Usage: bench/relay-modes.sh [ROUNDS] [SECONDS]   (release binaries are built)
# Prints one line per run and a median per (scenario, path). Bounded: every
# loadgen run stops after its duration; every process is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} secs=${2:-4}
cargo build --release -q -p ringport -p loadgen
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$bin/loadgen" serve --tcp-echo 127.0.0.1:0 --tcp-sink 127.0.0.1:0 --duration 30m > "$work/serve.json" &
pids+=($!)
for _ in $(seq 50); do [ -s "$work/serve.json" ] && break; sleep 0.1; done
echo_port=$(python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); print([l['addr'] for l in d['listening'] if l['mode']=='echo'][0].split(':')[1])" "$work/serve.json")
sink_port=$(python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); print([l['addr'] for l in d['listening'] if l['mode']=='sink'][0].split(':')[1])" "$work/serve.json")

start_proxy() { # mode sink-listen-port echo-listen-port admin-port
  cat > "$work/$1.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: default}
spec:
  externalIPs: ["127.0.0.1"]
  ports: [{name: sink, port: $2}, {name: echo, port: $3}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: bench, namespace: default}
subsets:
- addresses: [{ip: 127.0.0.1}]
  ports: [{name: sink, port: $sink_port}, {name: echo, port: $echo_port}]
YAML
  "$bin/ringport" run --config "$work/$1.yaml" --relay "$1" --workers 2 --redirect none \
    --healthz-bind-address 127.0.0.1:0 --metrics-bind-address "127.0.0.1:$4" 2> "$work/$1.log" &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$4/readyz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "ringport --relay $1 did not start:"; cat "$work/$1.log"; exit 1
}
start_proxy splice 29301 29302 29311
start_proxy copy 29401 29402 29411

declare -A sink=([direct]=$sink_port [splice]=29301 [copy]=29401)
declare -A echo=([direct]=$echo_port [splice]=29302 [copy]=29402)
run() { # scenario path
  local args
  case $1 in
    stream-1) args=(tcp-stream -t "127.0.0.1:${sink[$2]}" -c 1) ;;
    stream-8) args=(tcp-stream -t "127.0.0.1:${sink[$2]}" -c 8) ;;
    rr-64) args=(tcp-rr -t "127.0.0.1:${echo[$2]}" -c 64) ;;
  esac
  "$bin/loadgen" "${args[@]}" -d "${secs}s" --warmup 1s --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); v=d['gbit_per_s'] if d['scenario']=='tcp-stream' else d['ops_per_s']; print(f\"{v:.3f} {d['errors_total']}\")"
}
for scenario in stream-1 stream-8 rr-64; do
  for r in $(seq "$rounds"); do
    for path in direct splice copy; do
      read -r value errors < <(run "$scenario" "$path")
      echo "$scenario $path round=$r value=$value errors=$errors" | tee -a "$work/results"
    done
  done
done
echo
echo "medians (Gbit/s for stream, requests/s for rr), ratio to direct:"
python3 - "$work/results" <<'PY'
import collections, statistics, sys
vals = collections.defaultdict(list)
for line in open(sys.argv[1]):
    s, p, _, v, _ = line.split()
    vals[(s, p)].append(float(v.split("=")[1]))
for s in ["stream-1", "stream-8", "rr-64"]:
    d = statistics.median(vals[(s, "direct")])
    row = [f"{p} {statistics.median(vals[(s, p)]):.2f} ({statistics.median(vals[(s, p)]) / d:.2f})" for p in ["direct", "splice", "copy"]]
    print(f"{s:9} " + "  ".join(row))
PY
