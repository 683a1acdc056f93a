# shellcheck shell=bash
# The machine: Debian packages the benchmark needs, the "is it busy?" gate,
# and the environment recorded with every result.

# Installs haproxy, nginx + its stream module, iperf3, and the tools the runner
# uses, when missing; one `apt-get update` at most. Services are not
# started (policy-rc.d), and never used: the benchmark runs its own.
ensure_packages() {
  local missing=() entry pkg test
  for entry in "haproxy:command -v haproxy" "nginx:command -v nginx" \
      "libnginx-mod-stream:test -e /usr/lib/nginx/modules/ngx_stream_module.so" \
      "jq:command -v jq" "python3:command -v python3" "curl:command -v curl" \
      "iproute2:command -v ss" "procps:command -v pgrep" "util-linux:command -v taskset" \
      "iperf3:command -v iperf3"; do
    pkg=${entry%%:*} test=${entry#*:}
    eval "$test" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "bench: installing ${missing[*]}" >&2
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

# Refuses to run when the machine is busy: 1-minute load average above 0.7
# per core, or any other process above 20% of a core over a 1 s sample.
refuse_if_busy() {
  local cores load busy
  cores=$(nproc)
  load=$(cut -d' ' -f1 /proc/loadavg)
  if awk -v l="$load" -v c="$cores" 'BEGIN{exit !(l > 0.7 * c)}'; then
    echo "bench/run.sh: refusing to start: 1-minute load average $load > 0.7 x $cores cores (use --force to override)" >&2
    exit 3
  fi
  # With netfilter connection tracking active (any nat rule in this network
  # namespace loads it), every benchmark connection takes a conntrack entry
  # (TIME_WAIT ones for 120 s); a full table drops new flows (EPERM on UDP
  # sends, SYNs lost) for every peer.
  local ct
  ct=$(conntrack_state)
  if [ "$ct" != off ] && awk -v c="${ct%/*}" -v m="${ct#*/}" 'BEGIN{exit !(c > 0.5 * m)}'; then
    echo "bench/run.sh: refusing to start: conntrack table $ct entries (over half full; a full table drops packets). Nat rules in this namespace: $(nft list tables 2>/dev/null | tr '\n' ' ') (use --force to override)" >&2
    exit 3
  fi
  busy=$(busy_processes)
  if [ -n "$busy" ]; then
    echo "bench/run.sh: refusing to start: processes above 20% CPU over 1 s (use --force to override):" >&2
    echo "$busy" >&2
    exit 3
  fi
}

# "count/max" of the conntrack table, or "off" when netfilter tracks nothing.
conntrack_state() {
  if [ -r /proc/sys/net/netfilter/nf_conntrack_count ]; then
    echo "$(cat /proc/sys/net/netfilter/nf_conntrack_count)/$(cat /proc/sys/net/netfilter/nf_conntrack_max)"
  else
    echo off
  fi
}

# "pid ticks comm" of every process.
proc_ticks() {
  local f s rest
  for f in /proc/[0-9]*/stat; do
    s=$(cat "$f" 2>/dev/null) || continue
    rest=${s##*) }
    # shellcheck disable=SC2086
    set -- $rest
    echo "${s%% *} $(( ${12} + ${13} )) ${s#*(}" | sed 's/).*//'
  done
}

busy_processes() {
  local a b hz
  hz=$(getconf CLK_TCK)
  a=$(proc_ticks); sleep 1; b=$(proc_ticks)
  awk -v hz="$hz" -v self=$$ 'NR==FNR {t[$1]=$2; next}
    ($1 in t) && $1 != self { pct = ($2 - t[$1]) * 100 / hz;
      if (pct > 20) printf "  pid %s (%s): %.0f%%\n", $1, $3, pct }' \
    <(echo "$a") <(echo "$b")
}

# One JSON object: kernel, CPU, cores, versions, commit.
record_environment() {
  # The commit the binaries were built from (`ringport --version` names
  # it, with `-dirty` for uncommitted sources), not the checkout's HEAD:
  # with --bin-dir, or a merge during a run, the two differ.
  local commit dirty=false
  commit=$("$BIN/ringport" --version 2>/dev/null | sed -n 's/.*commit \([0-9a-f]*\)\(-dirty\)\{0,1\}.*/\1\2/p')
  case $commit in
    "") commit=$(git rev-parse HEAD)
        git diff --quiet HEAD -- src loadgen Cargo.toml Cargo.lock || dirty=true ;;
    *-dirty) commit=${commit%-dirty}; dirty=true ;;
  esac
  jq -n \
    --arg kernel "$(uname -r)" \
    --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    --argjson cores "$(nproc)" \
    --arg haproxy "$(haproxy -v 2>&1 | head -n1)" \
    --arg nginx "$(nginx -v 2>&1 | head -n1)" \
    --arg ringport_commit "$commit" --argjson dirty "$dirty" \
    --arg ringport "$("$BIN/ringport" --version 2>&1 | head -n1)" \
    --arg loadgen "$("$BIN/loadgen" --version 2>&1 | head -n1)" \
    --arg rustc "$(rustc --version 2>/dev/null || echo unknown)" \
    --arg bin "$BIN" --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg tw_reuse "$(sysctl -n net.ipv4.tcp_tw_reuse 2>/dev/null)" \
    --arg port_range "$(sysctl -n net.ipv4.ip_local_port_range 2>/dev/null | tr '\t' ' ')" \
    --arg loadavg "$(cut -d' ' -f1-3 /proc/loadavg)" --arg loadavg0 "${LOADAVG_AT_START:-}" \
    --arg ct0 "${CONNTRACK_AT_START:-}" --arg ct1 "$(conntrack_state)" \
    --arg nft "$(nft list tables 2>/dev/null | tr '\n' ' ' || true)" \
    '{date:$date, kernel:$kernel, cpu_model:$cpu, cores:$cores, haproxy:$haproxy, nginx:$nginx,
      ringport_commit:$ringport_commit, source_dirty:$dirty, ringport:$ringport, loadgen:$loadgen,
      rustc:$rustc, bin_dir:$bin, tcp_tw_reuse:$tw_reuse, ip_local_port_range:$port_range,
      loadavg_at_start:$loadavg0, loadavg_at_end:$loadavg,
      conntrack_at_start:$ct0, conntrack_at_end:$ct1, nft_tables:$nft}'
}
