#!/usr/bin/env bash
# Run ringport's whole test suite on a fresh Debian 12 machine.
#
# Installs the Debian packages the tests use when they are missing (one
# `apt-get update` at most), runs every test of the workspace, then the
# benchmark's smoke mode. The network-namespace tests need root (CI is root).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests and the benchmark smoke run need.
packages=(
  iproute2 nftables iptables curl python3 jq   # namespaces, rules, probes
  dnsmasq bind9-dnsutils                       # a real DNS server and dig
  conntrack                                    # UDP conntrack clean-up and its tests
  haproxy nginx libnginx-mod-stream            # the benchmark's peers; nginx reads PROXY headers in tests/proxy_protocol.rs
  iperf3                                       # the benchmark's UDP loss case
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${missing[*]}" >&2
  # Installed, never started as system services: tests run their own.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# Formatting and lints first: cheap, and a red build says why at once.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# Every tests/*.rs runs here, among them: metrics_scrape (a real scrape read
# by a real parser), cli (status, version, flags, completions, man),
# packaging (LICENSE, Containerfile, kustomize, systemd notify).
cargo test --workspace --locked "$@"

# The benchmark must never rot: run every scenario for a second against
# every peer (installs haproxy and nginx when missing; judges no speed).
bench/run.sh --smoke
