#!/usr/bin/env bash
# The one command that runs every FerroLB test: unit and property tests of
# each crate, and the lab tests against a real control plane in network
# namespaces (root needed; FERROLB_SKIP_LAB=1 skips them on purpose).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
say() { printf '[test] %s\n' "$*" >&2; }

tests/scripts/prereqs.sh

# A full disk shows up as linker crashes or a lab that cannot start etcd, far
# from the cause; say it first. A cold build takes about 2 GiB under target/.
free_kib=$(df -Pk "$(dirname "${CARGO_TARGET_DIR:-./target}")" | awk 'NR==2 {print $4}')
say "$((free_kib / 1024 / 1024)) GiB free for target/ (a cold build needs about 3 GiB)"
if [ "$free_kib" -lt $((2 * 1024 * 1024)) ]; then
  say "warning: under 2 GiB free; the build or the lab's etcd may fail with 'No space left on device'"
fi
say "building the workspace (binaries are needed by the lab tests)"
cargo build --workspace --bins --tests
say "running tests"
cargo test --workspace
