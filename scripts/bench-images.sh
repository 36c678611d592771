#!/usr/bin/env bash
# The image-transfer benchmark with its peers in one run (docs/benchmarks.md): installs
# Debian's nginx, iperf3 and Nix when missing, builds the release daemon, then runs
# `cargo bench --bench images`. Extra environment (BENCH_IMAGE_MIB, BENCH_CACHE,
# BENCH_UPLINK_MBIT) is passed through; the report goes to stdout. Run it on a quiet
# machine, as root (single-user Nix writes /nix/store).
set -euo pipefail
cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need nginx || missing+=(nginx-light)
need iperf3 || missing+=(iperf3)
need nix-build || missing+=(nix-bin)
need curl || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    echo "bench-images.sh: installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bench-images.sh: missing ${missing[*]}; install them (Debian: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
# Debian starts nginx and iperf3 services on install; the benchmark runs its own.
if need systemctl; then
  for unit in nginx iperf3; do
    if systemctl is-active --quiet "$unit" 2>/dev/null; then
      echo "bench-images.sh: stopping the $unit service Debian started (it would share the machine)" >&2
      systemctl stop "$unit"
    fi
  done
fi
cargo build --locked --release --bin blixard
cargo bench --locked -p blixard-tests --bench images
