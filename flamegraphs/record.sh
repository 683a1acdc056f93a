#!/usr/bin/env bash
# Records where ringport spends its CPU under tcp-crr, tcp-rr and tcp-stream, and
# renders flamegraphs/<scenario>-<shortcommit>.svg with inferno.
#
#   flamegraphs/record.sh [--bin-dir DIR] [--seconds N]
#
# perf record -e cpu-clock -g on the ringport process only (all its
# threads), while loadgen drives load through it to `loadgen serve`
# backends on loopback. Uses the release build, which keeps line tables
# (`debug = "line-tables-only"`). Set CALL_GRAPH=dwarf to unwind with DWARF
# instead of frame pointers (deeper Rust stacks, much bigger perf.data).
# Installs linux-perf (apt) and inferno (cargo install --root) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export LC_ALL=C

BIN=${RINGPORT_BENCH_BIN_DIR:-} SECONDS_PER=5
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) BIN=$2; shift ;;
    --seconds) SECONDS_PER=$2; shift ;;
    *) echo "flamegraphs/record.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
INFERNO_ROOT=${INFERNO_ROOT:-$TARGET/inferno}
export PATH=$INFERNO_ROOT/bin:$PATH

if ! command -v perf >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >&2
fi
if ! command -v inferno-flamegraph >/dev/null 2>&1; then
  cargo install --locked --root "$INFERNO_ROOT" inferno >&2
fi
if [ -z "$BIN" ]; then
  cargo build --locked --release -p ringport -p loadgen >&2
  BIN=$TARGET/release
fi

WORK=$(mktemp -d /tmp/ringport-flame.XXXXXX)
PIN=0 PROXY_WORKERS=$(nproc) SERVE_BOUND=10m
# shellcheck source=bench/lib/peers.sh
. "$ROOT/bench/lib/peers.sh"
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

choose_port_base
start_backends
start_ringport ringport "$PROXY_WORKERS" auto
RP=${PEER_PID[ringport]}
COMMIT=$(git rev-parse --short HEAD)
CALL_GRAPH=${CALL_GRAPH:-fp}
cg=(-g); [ "$CALL_GRAPH" = dwarf ] && cg=(--call-graph dwarf,16384)

# record SCENARIO -- loadgen args...
record() {
  local name=$1; shift 2
  echo "flamegraphs: $name: perf record for ${SECONDS_PER}s" >&2
  "$BIN/loadgen" "$@" -d "$((SECONDS_PER + 2))s" --json >"$WORK/$name.load.json" 2>&1 &
  local lg=$!
  track_pid "$lg"
  sleep 1
  perf record -e cpu-clock -F 999 "${cg[@]}" -p "$RP" -o "$WORK/$name.data" -- sleep "$SECONDS_PER" \
    2>"$WORK/$name.perf.err" || { cat "$WORK/$name.perf.err" >&2; return 1; }
  wait "$lg" || true
  perf script -i "$WORK/$name.data" 2>/dev/null | inferno-collapse-perf >"$WORK/$name.folded"
  inferno-flamegraph --title "ringport $name ($COMMIT, cpu-clock, $CALL_GRAPH unwinding)" \
    <"$WORK/$name.folded" >"$ROOT/flamegraphs/$name-$COMMIT.svg"
  # Keep the collapsed stacks too: small, greppable, diffable.
  sort -t' ' -k2 -nr "$WORK/$name.folded" | gzip -9 >"$ROOT/flamegraphs/$name-$COMMIT.folded.gz"
  echo "flamegraphs: wrote flamegraphs/$name-$COMMIT.svg ($(jq -r '"\(.ops_per_s|floor) ops/s, \(.gbit_per_s*100|floor/100) Gbit/s, \(.errors_total) errors"' "$WORK/$name.load.json" 2>/dev/null))" >&2
  # head closes the pipe early: that SIGPIPE is not a failure.
  self_time "$WORK/$name.folded" | head -15 >&2 || true
}

# Top frames by self time (the leaf of each stack), in percent.
self_time() {
  awk '{n=$NF; $NF=""; k=split($0, f, ";"); leaf=f[k]; gsub(/ +$/, "", leaf);
        s[leaf]+=n; t+=n} END {for (l in s) printf "%6.2f%%  %s\n", 100*s[l]/t, l}' "$1" | sort -nr
}

record tcp-crr -- tcp-crr -t "$(peer_target ringport echo)" -c 64 --source 127.0.0.2-127.0.0.50
record tcp-rr -- tcp-rr -t "$(peer_target ringport echo)" -c 64
record tcp-stream -- tcp-stream -t "$(peer_target ringport sink)" -c 1 --direction send
