#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the storage contract suite, the seeded raft
# simulation, and the process tests that start real `blixard` daemons on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null 2>&1; }
if ! need cargo; then
  echo "test.sh: cargo is missing; install Rust (https://rustup.rs) or use 'nix develop'" >&2
  exit 1
fi
# Build the binary the process tests start.
cargo build --locked --bin blixard
if need cargo-nextest; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
