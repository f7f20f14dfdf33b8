#!/usr/bin/env bash
# Installs what FerroLB's tests and lab need on a fresh Debian machine, and
# nothing when it is all there already (safe to run any number of times).
set -euo pipefail
say() { printf '[prereqs] %s\n' "$*" >&2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Debian packages: command -> package.
declare -A need=([ip]=iproute2 [nft]=nftables [curl]=curl [openssl]=openssl [ping]=iputils-ping [go]=golang-go [socat]=socat [setsid]=util-linux [sysctl]=procps [iperf3]=iperf3 [tcpdump]=tcpdump)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    say "missing packages ${missing[*]}; run as root or install them" && exit 1
  fi
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  say "cargo is missing: install Rust with rustup first" && exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for comp in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$comp" || {
      say "adding rust component $comp"
      rustup component add "$comp" >/dev/null
    }
  done
fi

# The real control plane, built once per machine and cached.
"$here/build-control-plane.sh"
