#!/usr/bin/env bash
# Builds the peers our benchmarks compare against from their Go modules and
# caches them under ~/.cache/ferrolb/peers/:
#   kube-proxy-<version>/kube-proxy               (k8s.io/kubernetes)
#   metallb-<version>/{controller,speaker,crds/}  (go.universe.tf/metallb)
# Versions are pinned in tests/control-plane.env. Nothing of theirs is kept in
# the repository: sources stay in the Go module cache, builds under the cache.
#
# Idempotent: when everything is already cached it returns in well under a
# second. Prints what it is doing, since a cold build takes many minutes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../control-plane.env
source "$here/../control-plane.env"

say_prefix=peers
# shellcheck source=go-build-lib.sh
source "$here/go-build-lib.sh"

peers="$cache/peers"
kube_proxy="$peers/kube-proxy-$PEER_KUBE_PROXY_VERSION"
metallb="$peers/metallb-$PEER_METALLB_VERSION"
metallb_pkgs=(go.universe.tf/metallb/controller go.universe.tf/metallb/speaker)

missing=()
[ -x "$kube_proxy/kube-proxy" ] || missing+=(kube-proxy)
if [ ! -x "$metallb/controller" ] || [ ! -x "$metallb/speaker" ] || [ ! -d "$metallb/crds" ]; then
  missing+=(metallb)
fi
if [ ${#missing[@]} -eq 0 ]; then
  say "cached: $peers (kube-proxy $PEER_KUBE_PROXY_VERSION, metallb $PEER_METALLB_VERSION)"
  exit 0
fi

ensure_go
say "building ${missing[*]} with $(go version | awk '{print $3}') into $peers"

build_metallb() {
  local work="$cache/build/metallb-$PEER_METALLB_VERSION"
  mkdir -p "$work" "$metallb"
  cd "$work"
  # MetalLB's go.mod has no replace lines; a module that requires it is enough.
  [ -f go.mod ] || printf 'module ferrolb.local/metallb\n\n%s\n' "$(go_line)" > go.mod
  say "metallb: resolving go.universe.tf/metallb@$PEER_METALLB_VERSION"
  quiet_go get "${metallb_pkgs[@]/%/@$PEER_METALLB_VERSION}"
  say "metallb: compiling controller and speaker"
  rm -rf "$metallb/.tmp"
  CGO_ENABLED=0 go build -v -trimpath -ldflags "-s -w" -o "$metallb/.tmp/" "${metallb_pkgs[@]}" 2>&1 |
    progress metallb
  mv "$metallb/.tmp/controller" "$metallb/.tmp/speaker" "$metallb/"
  # The CRDs are data files of the module source (read-only in the module cache).
  local src
  src=$(go mod download -json "go.universe.tf/metallb@$PEER_METALLB_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  mkdir -p "$metallb/.tmp/crds"
  install -m 0644 "$src"/config/crd/bases/*.yaml "$metallb/.tmp/crds/"
  rm -rf "$metallb/crds"
  mv "$metallb/.tmp/crds" "$metallb/crds"
  rm -rf "$metallb/.tmp"
  say "metallb: CRDs in $metallb/crds ($(ls "$metallb/crds" | wc -l) files)"
}

start=$(date +%s)
if [[ " ${missing[*]} " == *" kube-proxy "* ]]; then
  (build_kubernetes "$PEER_KUBE_PROXY_VERSION" "$cache/build/kubernetes-$PEER_KUBE_PROXY_VERSION" "$kube_proxy" kube-proxy)
fi
if [[ " ${missing[*]} " == *" metallb "* ]]; then (build_metallb); fi
say "done in $(( $(date +%s) - start ))s: $peers"
