#!/usr/bin/env bash
# The committed-write benchmark with etcd side by side, in one run (docs/benchmarks.md):
# installs Debian's etcd (server and etcdctl) and protoc when missing, builds the release
# daemon and the etcd load generator (tests/etcd-load, a workspace of its own), then runs
# `cargo bench --bench writes` with BENCH_ETCD=1. Extra environment (BENCH_SECS, …) is
# passed through; the report goes to stdout. Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need etcd || missing+=(etcd-server)
need etcdctl || missing+=(etcd-client)
need protoc || missing+=(protobuf-compiler)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    echo "bench-writes.sh: installing ${missing[*]}" >&2
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bench-writes.sh: missing ${missing[*]}; install them (Debian: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
# Debian starts an etcd service on install; the benchmark runs its own members.
if need systemctl && systemctl is-active --quiet etcd 2>/dev/null; then
  echo "bench-writes.sh: stopping the etcd service Debian started (it would share the machine)" >&2
  systemctl stop etcd
fi
target=${CARGO_TARGET_DIR:-target}
cargo build --locked --release --bin blixard
cargo build --locked --release --manifest-path tests/etcd-load/Cargo.toml --target-dir "$target"
BENCH_ETCD=1 BENCH_ETCD_LOAD="$(realpath "$target")/release/blixard-etcd-load" \
  cargo bench --locked -p blixard-tests --bench writes
