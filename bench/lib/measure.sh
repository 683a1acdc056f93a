# shellcheck shell=bash
# One measurement: run loadgen against one peer and sample the peer's
# processes around the measured window.
#
# CPU: utime+stime (all threads, summed over the peer's processes) read from
# /proc/<pid>/stat after the warmup and again at the end of the window.
# Idle: VmRSS and the number of open fds (summed over processes) just before
# the run (the baseline) and when loadgen writes its --ready-file.

CLK_TCK=$(getconf CLK_TCK)

# Total CPU ticks of the given pids.
cpu_ticks() {
  local pid total=0 stat rest
  for pid in "$@"; do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    rest=${stat##*) }           # drop "pid (comm) ", comm may hold spaces
    # shellcheck disable=SC2086
    set -- $rest
    total=$((total + ${12} + ${13}))  # fields 14 and 15 of the full line
  done
  echo "$total"
}

rss_kb() {
  local pid total=0 v
  for pid in "$@"; do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

fd_count() {
  local pid total=0 n
  for pid in "$@"; do
    n=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    total=$((total + n))
  done
  echo "$total"
}

# measure SCENARIO PEER ROUND -- loadgen-subcommand args...
# Appends one JSON line to $RAW. Returns non-zero only if loadgen failed to run.
measure() {
  local scenario=$1 peer=$2 round=$3; shift 4
  local out=$WORK/runs/$scenario.$peer.$round
  mkdir -p "$WORK/runs"
  local -a pids
  mapfile -t pids < <(peer_pids "$peer")
  local rss0=0 fd0=0 rss1=0 fd1=0 rss_r=0 fd_r=0 cpu0=0 cpu1=0 t0 t1 ready=""
  local is_idle=0
  [ "$1" = idle ] && is_idle=1
  if [ "$is_idle" = 1 ] && [ ${#pids[@]} -gt 0 ]; then
    rss0=$(rss_kb "${pids[@]}"); fd0=$(fd_count "${pids[@]}")
  fi
  local -a extra=()
  [ "$is_idle" = 1 ] && extra=(--ready-file "$out.ready")
  rm -f "$out.ready"
  local started; started=$(date +%s%N)
  # shellcheck disable=SC2046
  $(load_cpu) "$BIN/loadgen" "$@" --workers "$(load_workers)" --warmup "$WARMUP" \
    --json "${extra[@]}" >"$out.json" 2>"$out.err" &
  local lg=$!
  track_pid "$lg"
  if [ "$is_idle" = 1 ]; then
    # Sample at the ready moment; loadgen's own deadline bounds this wait.
    while kill -0 "$lg" 2>/dev/null && [ ! -s "$out.ready" ]; do sleep 0.02; done
    if [ -s "$out.ready" ] && [ ${#pids[@]} -gt 0 ]; then
      rss_r=$(rss_kb "${pids[@]}"); fd_r=$(fd_count "${pids[@]}")
      # The client's connects are done; the proxy may still be accepting
      # and dialing upstream. Sample again once its fd count is steady.
      settle "${pids[@]}"
      rss1=$(rss_kb "${pids[@]}"); fd1=$(fd_count "${pids[@]}")
    fi
    ready=$(cat "$out.ready" 2>/dev/null || true)
  else
    sleep "$WARMUP"
    mapfile -t pids < <(peer_pids "$peer")
    [ ${#pids[@]} -gt 0 ] && cpu0=$(cpu_ticks "${pids[@]}")
    t0=$(date +%s%N)
    # Sample at the end of the window while loadgen drains its last requests.
    while kill -0 "$lg" 2>/dev/null && [ $(( $(date +%s%N) - t0 )) -lt "$(ns "$DURATION")" ]; do
      sleep 0.05
    done
    [ ${#pids[@]} -gt 0 ] && cpu1=$(cpu_ticks "${pids[@]}")
    t1=$(date +%s%N)
  fi
  local rc=0
  wait "$lg" || rc=$?
  local wall; wall=$(awk -v a="$started" -v b="$(date +%s%N)" 'BEGIN{printf "%.2f", (b-a)/1e9}')
  local lgjson
  lgjson=$(cat "$out.json" 2>/dev/null)
  if ! jq -e . >/dev/null 2>&1 <<<"$lgjson" || [ -z "$lgjson" ]; then
    lgjson=null
    echo "  ! $scenario/$peer round $round: loadgen rc=$rc: $(tail -c 300 "$out.err")" >&2
  fi
  jq -nc --arg scenario "$scenario" --arg peer "$peer" --argjson round "$round" \
    --argjson rc "$rc" --argjson lg "$lgjson" \
    --argjson cpu_s "$(awk -v a="$cpu0" -v b="$cpu1" -v h="$CLK_TCK" 'BEGIN{printf "%.4f", (b-a)/h}')" \
    --argjson window_s "$(awk -v a="${t0:-0}" -v b="${t1:-0}" 'BEGIN{printf "%.4f", (b-a)/1e9}')" \
    --argjson nprocs "${#pids[@]}" --argjson wall "$wall" \
    --argjson rss0 "$rss0" --argjson rss1 "$rss1" --argjson fd0 "$fd0" --argjson fd1 "$fd1" \
    --argjson rss_r "$rss_r" --argjson fd_r "$fd_r" \
    --arg ready "$ready" \
    '{scenario:$scenario, peer:$peer, round:$round, loadgen_rc:$rc, loadgen:$lg,
      cpu_s:$cpu_s, cpu_window_s:$window_s, processes:$nprocs, wall_s:$wall,
      idle:{rss_kb_before:$rss0, rss_kb_ready:$rss_r, fds_before:$fd0, fds_ready:$fd_r,
            rss_kb_settled:$rss1, fds_settled:$fd1, ready:$ready}}' >>"$RAW"
  local summary
  summary=$(jq -r 'if .loadgen == null then "no result" else
      "\(.loadgen.completed) done, \(.loadgen.errors_total) err, \(.loadgen.ops_per_s|floor)/s, \(.loadgen.gbit_per_s*100|floor/100) Gbit/s, cpu \(.cpu_s)s, \(.wall_s)s wall" end' <<<"$(tail -n1 "$RAW")")
  printf '  %-14s %-14s r%s  %s\n' "$scenario" "$peer" "$round" "$summary" >&2
  return 0
}

# Waits (at most 2 s) until the pids' fd count is the same 4 samples running.
settle() {
  local last=-1 same=0 n i
  for i in $(seq 1 40); do
    n=$(fd_count "$@")
    if [ "$n" = "$last" ]; then same=$((same + 1)); else same=0; fi
    [ "$same" -ge 3 ] && return 0
    last=$n
    sleep 0.05
  done
}

# "1.5" or "500ms" or "2s" -> nanoseconds.
ns() {
  awk -v d="$1" 'BEGIN{ if (d ~ /ms$/) { sub(/ms$/,"",d); printf "%d", d*1e6 }
                        else { sub(/s$/,"",d); printf "%d", d*1e9 } }'
}

# System-wide UDP receive-buffer drops (every socket of this namespace).
udp_rcvbuf_errors() { awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) col[$i] = i; h = 1 } else print $col["RcvbufErrors"] }' /proc/net/snmp; }

# measure_iperf SCENARIO PEER ROUND TARGET: iperf3 UDP at $IPERF_RATE with
# $IPERF_LEN datagrams through TARGET. Appends one JSON line to $RAW with
# the receiver's loss, the system's UdpRcvbufErrors over the run, and the
# UDP sockets that had dropped datagrams (`ss -uam`'s d counter) at 90% of
# the run, so a loss can be placed on the socket where it happened.
measure_iperf() {
  local scenario=$1 peer=$2 round=$3 target=$4
  local out=$WORK/runs/$scenario.$peer.$round
  mkdir -p "$WORK/runs"
  local secs rcv0 rcv1 rc=0 started
  secs=$(awk -v d="$DURATION" 'BEGIN { s = int(d + 0.5); print (s < 1 ? 1 : s) }')
  started=$(date +%s%N)
  rcv0=$(udp_rcvbuf_errors)
  # One sample at 90% of the run: every UDP socket with drops by then.
  ( sleep "$(awk -v s="$secs" 'BEGIN { print s * 0.9 }')"; ss -uamnH >"$out.ss" 2>/dev/null ) &
  local sampler=$!
  # shellcheck disable=SC2046
  $(load_cpu) timeout $((secs + 20)) iperf3 -c "${target%:*}" -p "${target##*:}" -u -b "$IPERF_RATE" \
    -l "$IPERF_LEN" -t "$secs" -J >"$out.json" 2>"$out.err" || rc=$?
  wait "$sampler" 2>/dev/null || true
  rcv1=$(udp_rcvbuf_errors)
  local wall; wall=$(awk -v a="$started" -v b="$(date +%s%N)" 'BEGIN{printf "%.2f", (b-a)/1e9}')
  local result
  result=$(jq -c 'if .end.sum.packets then {lost_percent: .end.sum.lost_percent, packets: .end.sum.packets,
      lost_packets: .end.sum.lost_packets, gbit: (.end.sum.bits_per_second / 1e9)} else null end' "$out.json" 2>/dev/null) || result=null
  [ -n "$result" ] || result=null
  [ "$result" = null ] && echo "  ! $scenario/$peer round $round: iperf3 rc=$rc: $(jq -r '.error // empty' "$out.json" 2>/dev/null) $(tail -c 300 "$out.err")" >&2
  # Sockets that dropped: local, peer and the skmem drop count.
  local drops
  # (`ss` prints each socket's addresses on one line, its skmem on the next.)
  drops=$(awk '!/skmem:/ { local = $4; peer = $5; next }
      match($0, /,d[0-9]+\)/) { d = substr($0, RSTART + 2, RLENGTH - 3) + 0
        if (d > 0) { printf "%s%s -> %s dropped %d", sep, local, peer, d; sep = "; " } }' "$out.ss" 2>/dev/null)
  jq -nc --arg scenario "$scenario" --arg peer "$peer" --argjson round "$round" --argjson rc "$rc" \
    --argjson iperf "$result" --argjson rcvbuf "$((rcv1 - rcv0))" --arg drops "$drops" --argjson wall "$wall" \
    '{scenario:$scenario, peer:$peer, round:$round, loadgen_rc:$rc, loadgen:null, cpu_s:0, wall_s:$wall,
      iperf:(if $iperf == null then null else ($iperf + {rcvbuf_errors:$rcvbuf, socket_drops:$drops}) end)}' >>"$RAW"
  printf '  %-14s %-14s r%s  %s\n' "$scenario" "$peer" "$round" \
    "$(jq -r 'if .iperf == null then "no result" else "\(.iperf.lost_percent*100|floor/100)% lost of \(.iperf.packets), UdpRcvbufErrors +\(.iperf.rcvbuf_errors), drops: \(.iperf.socket_drops)" end' <<<"$(tail -n1 "$RAW")")" >&2
  return 0
}
