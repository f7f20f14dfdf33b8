#!/usr/bin/env bash
# The README's main command: installs what is missing, builds FerroLB and
# runs the lab demo (a real control plane, nodes, pods and a client as
# network namespaces; needs root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
tests/scripts/prereqs.sh
echo "[demo] building FerroLB (release)" >&2
cargo build --release --workspace --bins
exec target/release/ferrolb-lab demo "$@"
