#!/usr/bin/env bash
# Start-up cost of --proxy-port-mode per-service vs shared: N ClusterIP
# service ports (one endpoint each, never connected to), ringport with nft
# rules in a network namespace of its own, 2 workers. Prints, per mode: the
# time from start to /readyz (rules synced), open fds, listening TCP
# sockets and RSS. No traffic is sent; the namespace is removed on exit.
#
# usage: sudo bench/proxy_port_mode.sh [BINARY] N...
# e.g.   sudo bench/proxy_port_mode.sh target/debug/ringport 1000 5000 10000
# Compare modes within one run only (a debug build's times are not figures
# to quote on their own).
set -euo pipefail
bin=${1:-target/debug/ringport}; shift || true
counts=("${@:-1000}")
ns="rp-ppm-$$"
dir=$(mktemp -d)
cleanup() {
  [[ -n "${pid:-}" ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up

manifest() { # N -> services + endpoints, 10.96.0.0/12 and 10.200.0.0/16
  python3 - "$1" <<'PY'
import sys
n = int(sys.argv[1])
out = []
for i in range(n):
    vip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
    ep = f"10.200.{(i // 250) % 250}.{i % 250 + 1}"
    out.append(f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n"
               f"spec:\n  clusterIP: {vip}\n  ports:\n  - {{port: 80, targetPort: 8080, protocol: TCP}}\n"
               f"---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: s{i}, namespace: default}}\n"
               f"subsets:\n- addresses: [{{ip: \"{ep}\"}}]\n  ports: [{{port: 8080, protocol: TCP}}]\n")
print("".join(out))
PY
}

printf '%-12s %7s %9s %8s %10s %9s\n' mode ports ready_s fds listening rss_mib
for n in "${counts[@]}"; do
  manifest "$n" >"$dir/services.yaml"
  for mode in per-service shared; do
    start=$(date +%s.%N)
    ip netns exec "$ns" "$bin" run --config "$dir/services.yaml" --redirect nft --workers 2 --no-pin \
      --proxy-port-mode "$mode" --healthz-bind-address 127.0.0.1:10256 \
      --metrics-bind-address 127.0.0.1:10249 --handover-socket none 2>"$dir/log" &
    pid=$!
    ready=""
    for _ in $(seq 1 1200); do
      if ! kill -0 "$pid" 2>/dev/null; then break; fi
      if [[ $(ip netns exec "$ns" curl -s --max-time 1 http://127.0.0.1:10249/readyz || true) == ok ]]; then
        ready=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {print b - a}'); break
      fi
      sleep 0.1
    done
    if [[ -z "$ready" ]]; then
      printf '%-12s %7s %9s  (did not start: %s)\n' "$mode" "$n" - "$(grep -m1 -o 'needs about.*limit' "$dir/log" || tail -c 200 "$dir/log")"
    else
      fds=$(ls "/proc/$pid/fd" | wc -l)
      listening=$(ip netns exec "$ns" ss -Hltn | wc -l)
      rss=$(awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$pid/status")
      printf '%-12s %7s %9.2f %8s %10s %9s\n' "$mode" "$n" "$ready" "$fds" "$listening" "$rss"
    fi
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""
    ip netns exec "$ns" nft delete table inet ringport 2>/dev/null || true
  done
done
