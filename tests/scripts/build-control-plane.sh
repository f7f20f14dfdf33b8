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

say_prefix=control-plane
# shellcheck source=go-build-lib.sh
source "$here/go-build-lib.sh"

bin="$cache/bin/$KUBERNETES_VERSION"
components=(kube-apiserver kube-controller-manager kube-scheduler kubectl kube-proxy)

missing=()
for c in "${components[@]}" etcd; do
  [ -x "$bin/$c" ] || missing+=("$c")
done
if [ ${#missing[@]} -eq 0 ]; then
  say "cached: $bin (kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION)"
  exit 0
fi

ensure_go
say "building ${missing[*]} with $(go version | awk '{print $3}') into $bin"
mkdir -p "$bin"

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
    printf 'module ferrolb.local/etcd\n\n%s\n' "$(go_line)" > go.mod
  fi
  say "etcd: resolving go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  quiet_go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  quiet_go mod tidy
  say "etcd: compiling"
  go build -v -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" . 2>&1 | progress etcd
  mv "$bin/etcd.tmp" "$bin/etcd"
}

start=$(date +%s)
if [[ " ${missing[*]} " == *" etcd "* ]]; then (build_etcd); fi
if [ ${#missing[@]} -gt 1 ] || [[ " ${missing[*]} " != *" etcd "* ]]; then
  (build_kubernetes "$KUBERNETES_VERSION" "$cache/build/kubernetes-$KUBERNETES_VERSION" "$bin" "${components[@]}")
fi
say "done in $(( $(date +%s) - start ))s: $bin"
