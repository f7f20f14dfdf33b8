#!/usr/bin/env bash
# The one command that runs every FerroLB test: unit and property tests of
# each crate, and the lab tests against a real control plane in network
# namespaces (root needed; FERROLB_SKIP_LAB=1 skips them on purpose).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
say() { printf '[test] %s\n' "$*" >&2; }

tests/scripts/prereqs.sh
say "building the workspace (binaries are needed by the lab tests)"
cargo build --workspace --bins --tests
say "running tests"
cargo test --workspace
