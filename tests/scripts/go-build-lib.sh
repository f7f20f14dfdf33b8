# Shared by build-control-plane.sh and build-peers.sh; sourced, not run.
# Set say_prefix before sourcing. Provides the cache location, progress
# output, and the throw-away module that builds commands of k8s.io/kubernetes.

cache=${FERROLB_CACHE:-$HOME/.cache/ferrolb}
export GOFLAGS=-buildvcs=false
export GOTOOLCHAIN=local

say() { printf '[%s] %s\n' "$say_prefix" "$*" >&2; }

ensure_go() {
  if ! command -v go >/dev/null 2>&1; then
    say "Go is missing: installing golang-go from Debian"
    apt-get update -qq && apt-get install -y -qq golang-go >/dev/null
  fi
}

# The `go` line of a throw-away module: the local toolchain's language version.
go_line() { echo "go $(go env GOVERSION | sed 's/^go//; s/\.[0-9]*$//').0"; }

# Runs a go command without its per-module "downloading"/"added" chatter.
quiet_go() { go "$@" 2>&1 | grep -Ev '^go: (downloading|added) ' >&2 || true; }

# go build -v prints one line per compiled package; turn that into a heartbeat.
# Anything else (compiler errors contain spaces, or start with '#') is shown.
progress() {
  local what=$1 n=0 line
  while IFS= read -r line; do
    case $line in
      *' '* | '#'*) printf '%s\n' "$line" >&2; continue ;;
    esac
    n=$((n + 1))
    if [ $((n % 200)) -eq 0 ]; then say "$what: $n packages compiled"; fi
  done
  say "$what: $n packages compiled in total"
}

# build_kubernetes VERSION WORK_DIR OUT_DIR COMMAND...
# Builds k8s.io/kubernetes/cmd/COMMAND at VERSION into OUT_DIR, stamped with
# the version like a release build. go install refuses modules with replace
# directives, so WORK_DIR holds a throw-away module that pins every staging
# module to its published tag.
build_kubernetes() {
  local version=$1 work=$2 out=$3
  shift 3
  mkdir -p "$work" "$out"
  cd "$work"
  if [ ! -f go.mod ]; then
    say "[1/3] resolving k8s.io/kubernetes@$version"
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    local staging_version="v0${version#v1}"
    {
      echo "module ferrolb.local/kubernetes"
      echo
      go_line
      echo
      echo "require k8s.io/kubernetes $version"
      echo
      awk '/^\tk8s.io\/[^ ]+ v0.0.0$/ {print $1}' "$gomod" | sort -u |
        while read -r m; do echo "replace $m => $m $staging_version"; done
    } > go.mod.tmp
    mv go.mod.tmp go.mod
  fi
  local pkgs=("${@/#/k8s.io/kubernetes/cmd/}")
  say "[2/3] downloading modules for $*"
  quiet_go get "${pkgs[@]/%/@$version}"
  say "[3/3] compiling $* (cold: many minutes on 2 cores)"
  local minor=${version#v1.}; minor=${minor%%.*}
  local ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$version -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  go build -v -trimpath -ldflags "$ld" -o "$out/" "${pkgs[@]}" 2>&1 | progress kubernetes
  for p in "$@"; do [ -x "$out/$p" ] || { say "build did not produce $p"; exit 1; }; done
}
