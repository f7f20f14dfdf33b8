#!/usr/bin/env bash
# Builds the lab's real control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kube-proxy and etcd) from their Go modules and caches
# the binaries under ~/.cache/ferrolb/bin/<kubernetes-version>/.
#
# Idempotent: when every binary is already cached it returns in well under a
# second. Prints what it is doing, since a cold build takes many minutes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../control-plane.env
source "$here/../control-plane.env"

cache=${FERROLB_CACHE:-$HOME/.cache/ferrolb}
bin="$cache/bin/$KUBERNETES_VERSION"
components=(kube-apiserver kube-controller-manager kube-scheduler kubectl kube-proxy)
export GOFLAGS=-buildvcs=false
export GOTOOLCHAIN=local

say() { printf '[control-plane] %s\n' "$*" >&2; }

missing=()
for c in "${components[@]}" etcd; do
  [ -x "$bin/$c" ] || missing+=("$c")
done
if [ ${#missing[@]} -eq 0 ]; then
  say "cached: $bin (kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION)"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  say "Go is missing: installing golang-go from Debian"
  apt-get update -qq && apt-get install -y -qq golang-go >/dev/null
fi
say "building ${missing[*]} with $(go version | awk '{print $3}') into $bin"
mkdir -p "$bin"

# go build -v prints one line per compiled package; turn that into a heartbeat.
progress() {
  local what=$1 n=0 line
  while IFS= read -r line; do
    n=$((n + 1))
    if [ $((n % 200)) -eq 0 ]; then say "$what: $n packages compiled"; fi
  done
  say "$what: $n packages compiled in total"
}

build_kubernetes() {
  local work="$cache/build/kubernetes-$KUBERNETES_VERSION"
  mkdir -p "$work"
  cd "$work"
  if [ ! -f go.mod ]; then
    say "[1/3] resolving k8s.io/kubernetes@$KUBERNETES_VERSION"
    # go install refuses modules with replace directives, so build from a
    # throw-away module that pins every staging module to its published tag.
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    local staging_version="v0${KUBERNETES_VERSION#v1}"
    {
      echo "module ferrolb.local/control-plane"
      echo
      echo "go $(go env GOVERSION | sed 's/^go//; s/\.[0-9]*$//').0"
      echo
      echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
      echo
      awk '/^\tk8s.io\/[^ ]+ v0.0.0$/ {print $1}' "$gomod" | sort -u |
        while read -r m; do echo "replace $m => $m $staging_version"; done
    } > go.mod.tmp
    mv go.mod.tmp go.mod
  fi
  local pkgs=()
  for c in "${components[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  say "[2/3] downloading modules for ${components[*]}"
  go get "${pkgs[@]/%/@$KUBERNETES_VERSION}" 2>&1 | grep -v '^go: downloading' >&2 || true
  say "[3/3] compiling (cold: 20-40 min on 2 cores)"
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  go build -v -trimpath -ldflags "$ld" -o "$bin/" "${pkgs[@]}" 2>&1 | progress kubernetes
  for c in "${components[@]}"; do [ -x "$bin/$c" ] || { say "build did not produce $c"; exit 1; }; done
}

build_etcd() {
  local work="$cache/build/etcd-$ETCD_VERSION"
  mkdir -p "$work"
  cd "$work"
  if [ ! -f main.go ]; then
    cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    printf 'module ferrolb.local/etcd\n\ngo %s.0\n' "$(go env GOVERSION | sed 's/^go//; s/\.[0-9]*$//')" > go.mod
  fi
  say "etcd: resolving go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" 2>&1 | grep -v '^go: downloading' >&2 || true
  go mod tidy 2>&1 | grep -v '^go: downloading' >&2 || true
  say "etcd: compiling"
  go build -v -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" . 2>&1 | progress etcd
  mv "$bin/etcd.tmp" "$bin/etcd"
}

start=$(date +%s)
if [[ " ${missing[*]} " == *" etcd "* ]]; then (build_etcd); fi
if [ ${#missing[@]} -gt 1 ] || [[ " ${missing[*]} " != *" etcd "* ]]; then (build_kubernetes); fi
say "done in $(( $(date +%s) - start ))s: $bin"
