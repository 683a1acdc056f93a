#!/usr/bin/env bash
# ringport's peer benchmark: direct vs ringport vs HAProxy vs nginx, on
# loopback, in interleaved rounds, medians reported. See bench/README.md.
#
#   bench/run.sh                 default run (~12 min, estimated), 3 rounds
#   bench/run.sh --quick         shorter windows (~4 min), 3 rounds
#   bench/run.sh --smoke         every scenario ~1 s, 1 round, debug build;
#                                fails if any peer did no work or direct erred
#   bench/run.sh --pin           proxy on core 0, load + backends on core 1
#   bench/run.sh --redirect      the node-agent path: everything in a fresh
#                                network namespace, ringport reached through
#                                a cluster IP and its own nft REDIRECT rule
#   options: --force (run on a busy machine), --rounds N,
#            --bin-dir DIR (or RINGPORT_BENCH_BIN_DIR; skips the build),
#            --profile release|dev, --out DIR
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export LC_ALL=C

MODE=default PIN=0 FORCE=0 ROUNDS="" BIN=${RINGPORT_BENCH_BIN_DIR:-} PROFILE="" OUT="" REDIRECT=0
ARGS=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --quick) MODE=quick ;;
    --smoke) MODE=smoke ;;
    --pin) PIN=1 ;;
    --redirect) REDIRECT=1 ;;
    --force) FORCE=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --bin-dir) BIN=$2; shift ;;
    --profile) PROFILE=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Windows per mode (seconds). Idle: connections held, and how long.
case $MODE in
  default) WARMUP=1;   DURATION=3;   DEF_ROUNDS=3; IDLE_CONNS=5000; IDLE_HOLD=3 ;;
  quick)   WARMUP=0.25; DURATION=0.6; DEF_ROUNDS=3; IDLE_CONNS=5000; IDLE_HOLD=1.5 ;;
  smoke)   WARMUP=0.2; DURATION=1;   DEF_ROUNDS=1; IDLE_CONNS=1000; IDLE_HOLD=2 ;;
esac
ROUNDS=${ROUNDS:-$DEF_ROUNDS}
RR1_RATE=1000   # tcp-rr 1 connection: requests per second, open loop
IPERF_RATE=2G IPERF_LEN=32K   # udp-iperf: iperf3 -u -b, -l (issue 16's loss case)

# shellcheck source=bench/lib/host.sh
. "$ROOT/bench/lib/host.sh"
ensure_packages
[ "$MODE" = smoke ] || [ "$FORCE" = 1 ] || refuse_if_busy

# Binaries: build unless a directory is given.
if [ -z "$BIN" ]; then
  PROFILE=${PROFILE:-$([ "$MODE" = smoke ] && echo dev || echo release)}
  echo "bench/run.sh: cargo build --profile $PROFILE -p ringport -p loadgen" >&2
  cargo build --locked --profile "$PROFILE" -p ringport -p loadgen >&2
  dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$dir
fi
BIN=$(cd "$BIN" && pwd)
[ -x "$BIN/ringport" ] && [ -x "$BIN/loadgen" ] || { echo "no ringport/loadgen in $BIN" >&2; exit 1; }

# --redirect: run this very script again inside a fresh network namespace
# (only loopback in it), so ringport's nft rules touch nothing outside. The
# namespace goes away whatever happens.
if [ "$REDIRECT" = 1 ] && [ -z "${RINGPORT_BENCH_NETNS:-}" ]; then
  [ "$(id -u)" = 0 ] && command -v nft >/dev/null && command -v ip >/dev/null ||
    { echo "bench/run.sh --redirect needs root, ip and nft" >&2; exit 1; }
  NS=rp-bench-$$
  ip netns add "$NS"
  trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
  ip -n "$NS" link set lo up
  rc=0
  ip netns exec "$NS" env RINGPORT_BENCH_NETNS="$NS" "$0" "${ARGS[@]}" --bin-dir "$BIN" --force || rc=$?
  exit "$rc"
fi
if [ "$REDIRECT" = 1 ]; then
  # Every peer here pays connection tracking (nat rules exist in this
  # namespace); TIME_WAIT entries are kept short so short-connection
  # scenarios cannot fill the table.
  sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait=1 2>/dev/null || true
fi

WORK=$(mktemp -d /tmp/ringport-bench.XXXXXX)
RAW=$WORK/raw.jsonl
# shellcheck source=bench/lib/peers.sh
. "$ROOT/bench/lib/peers.sh"
# shellcheck source=bench/lib/measure.sh
. "$ROOT/bench/lib/measure.sh"

cleanup() {
  local rc=$?
  stop_all
  if [ "${KEEP_WORK:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "bench/run.sh: scratch files kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$PIN" = 1 ]; then PROXY_WORKERS=1; else PROXY_WORKERS=$(nproc); fi
SERVE_BOUND=$((30 + ROUNDS * 5))m
choose_port_base
start_backends
start_iperf_server
declare -A START_CMD=(
  [ringport]="start_ringport ringport $PROXY_WORKERS auto"
  [ringport-copy]="start_ringport ringport-copy $PROXY_WORKERS copy"
  [ringport-ring]="start_ringport ringport-ring $PROXY_WORKERS ring"
  [ringport-splice]="start_ringport ringport-splice $PROXY_WORKERS splice"
  [ringport-w1]="start_ringport ringport-w1 1 auto"
  [haproxy]=start_haproxy [nginx]=start_nginx
)
MODES=(ringport-copy ringport-ring ringport-splice)
SCALING=0
[ "$PIN" = 0 ] && [ "$PROXY_WORKERS" -gt 1 ] && SCALING=1
for p in ringport "${MODES[@]}" haproxy nginx; do ${START_CMD[$p]}; done
[ "$SCALING" = 1 ] && ${START_CMD[ringport-w1]}

# Stops one peer (TERM, bounded wait, KILL) and starts it again, same ports.
restart_peer() {
  local pid=${PEER_PID[$1]} i
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  ${START_CMD[$1]}
  sleep 0.3  # let it finish starting (nginx workers, ringport housekeeping)
}
echo "bench/run.sh: mode=$MODE pin=$PIN rounds=$ROUNDS proxy workers=$PROXY_WORKERS ports=$PORT_BASE.. bin=$BIN" >&2

# (--redirect runs the whole benchmark in a namespace with ringport behind
# its own nft rule; see the top of this file.) Earlier plan, kept: a
# peer "ringport-redirect" here: a network namespace with a veth pair
# (only 127.0.0.0/8-style private addresses), the cluster IP redirected to
# ringport's proxy port by its own rules, and the same scenarios run from
# inside the namespace. See bench/README.md, "Not measured yet".

PEERS=(direct ringport haproxy nginx)
# ringport's other relay modes, each in every TCP shape (copy: bulk only).
RELAYS=(ringport-ring ringport-splice)
W1=(); [ "$SCALING" = 1 ] && W1=(ringport-w1)
SRC=(--source 127.0.0.2-127.0.0.50)

# scenario name | peers | loadgen arguments (target filled in per peer)
run_round() {
  local r=$1 last=$2 p plot
  for p in "${PEERS[@]}" "${RELAYS[@]}" ringport-copy; do
    measure stream-1 "$p" "$r" -- tcp-stream -t "$(peer_target "$p" sink)" -c 1 --direction send -d "${DURATION}s"
  done
  for p in "${PEERS[@]}" "${RELAYS[@]}"; do
    measure stream-8 "$p" "$r" -- tcp-stream -t "$(peer_target "$p" sink)" -c 8 --direction send -d "${DURATION}s"
  done
  for p in "${PEERS[@]}" "${RELAYS[@]}" "${W1[@]}"; do
    measure crr-64 "$p" "$r" -- tcp-crr -t "$(peer_target "$p" echo)" -c 64 "${SRC[@]}" -d "${DURATION}s"
  done
  for p in "${PEERS[@]}" "${RELAYS[@]}" "${W1[@]}"; do
    measure rr-64 "$p" "$r" -- tcp-rr -t "$(peer_target "$p" echo)" -c 64 -d "${DURATION}s"
  done
  for p in "${PEERS[@]}" "${RELAYS[@]}"; do
    plot=(); [ "$last" = 1 ] && plot=(--plot "$WORK/svg/rr-1-$p.svg")
    measure rr-1 "$p" "$r" -- tcp-rr -t "$(peer_target "$p" echo)" -c 1 --rate "$RR1_RATE" -d "${DURATION}s" "${plot[@]}"
  done
  for p in direct ringport nginx; do
    measure udp-rr "$p" "$r" -- udp-rr -t "$(peer_target "$p" udp)" -c 16 -d "${DURATION}s"
  done
  for p in direct ringport; do
    measure_iperf udp-iperf "$p" "$r" "$(peer_target "$p" iperf)"
  done
  for p in ringport "${RELAYS[@]}" haproxy nginx; do
    # A fresh process, so memory kept from the earlier scenarios (allocator
    # caches, grown tables) neither hides nor inflates the per-connection cost.
    restart_peer "$p"
    measure idle "$p" "$r" -- idle -t "$(peer_target "$p" echo)" -c "$IDLE_CONNS" -d "${IDLE_HOLD}s" "${SRC[@]}"
  done
}

mkdir -p "$WORK/svg"
LOADAVG_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
CONNTRACK_AT_START=$(conntrack_state)
START=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
  echo "bench/run.sh: round $r of $ROUNDS" >&2
  run_round "$r" "$([ "$r" = "$ROUNDS" ] && echo 1 || echo 0)"
done
ELAPSED=$(( $(date +%s) - START ))

# Proxies must still be alive: a crash mid-run would make its numbers lie.
for p in ringport "${MODES[@]}" "${W1[@]}" haproxy nginx; do
  kill -0 "${PEER_PID[$p]}" 2>/dev/null || { echo "bench/run.sh: $p exited during the run" >&2; exit 1; }
done

record_environment >"$WORK/env.json"
STAMP=$(date -u +%Y-%m-%d)-$(jq -r '.ringport_commit[:7]' "$WORK/env.json")
SUFFIX=""; [ "$MODE" != default ] && SUFFIX="-$MODE"; [ "$PIN" = 1 ] && SUFFIX="$SUFFIX-pin"
[ "$REDIRECT" = 1 ] && SUFFIX="$SUFFIX-redirect"
if [ -z "$OUT" ]; then
  if [ "$MODE" = smoke ]; then OUT=$WORK/results; else OUT=$ROOT/bench/results; fi
fi
mkdir -p "$OUT"
PREFIX=$OUT/$STAMP$SUFFIX
rc=0
python3 "$ROOT/bench/report.py" --raw "$RAW" --env "$WORK/env.json" --svg-dir "$WORK/svg" \
  --prefix "$PREFIX" --mode "$MODE" --pin "$PIN" --rounds "$ROUNDS" --elapsed "$ELAPSED" \
  $([ "$MODE" = smoke ] && echo --check) || rc=$?
if [ "$MODE" = default ] && [ "$PIN" = 0 ] && [ "$REDIRECT" = 0 ] && [ "$rc" = 0 ] && [ "$OUT" = "$ROOT/bench/results" ]; then
  cp "$PREFIX.md" "$ROOT/bench/RESULTS.md"
fi
echo "bench/run.sh: $MODE run took ${ELAPSED}s of load; results in $PREFIX.{json,md}" >&2
exit "$rc"
