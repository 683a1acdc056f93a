#!/usr/bin/env bash
# Run ringport's whole test suite on a fresh Debian 12 machine.
#
# Installs the Debian packages the tests use when they are missing (one
# `apt-get update` at most), then runs every test of the workspace. Needs
# root only when a package must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need (the command each provides, for the check).
packages=(
  "iproute2:ip"
  "dnsmasq:dnsmasq"
  "bind9-dnsutils:dig"
  "nftables:nft"
  "iptables:iptables"
  "curl:curl"
  "python3:python3"
)

missing=()
for entry in "${packages[@]}"; do
  pkg=${entry%%:*} cmd=${entry#*:}
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

cargo test --workspace --locked "$@"
