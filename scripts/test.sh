#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the storage contract suite, the seeded raft
# simulation, the process tests that start real `blixard` daemons on loopback, and the
# Nix checks (every .nix file parses; the module's pure functions evaluate to the expected
# JSON; the daemon accepts the config they produce), and a short run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null 2>&1; }
if ! need cargo; then
  echo "test.sh: cargo is missing; install Rust (https://rustup.rs)" >&2
  exit 1
fi
# Nix (image tests, Nix checks), QEMU + busybox + cpio (a real guest for the supervisor
# and VM tests; tests/fixtures/guest/build.sh fetches the Debian cloud kernel with
# apt-get), iptables and iproute2 (the partition test; the stability suite's network
# namespaces), systemd and util-linux (the systemd supervisor tests run systemd as PID 1
# of a private namespace; it is not started on the host; nsenter).
missing=()
need nix-instantiate || missing+=(nix-bin)
need qemu-system-x86_64 || missing+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
need cpio || missing+=(cpio)
need iptables || missing+=(iptables)
need ip || missing+=(iproute2)
[ -x /lib/systemd/systemd ] && need systemd-run || missing+=(systemd)
need nsenter || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    echo "test.sh: installing ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "test.sh: missing ${missing[*]}; install them (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# Prometheus and promtool (the monitoring test: the rules, their unit tests, a real
# scrape); without its recommends (the node exporter), and its service is not started.
if ! [ -x /usr/bin/prometheus ] || ! [ -x /usr/bin/promtool ]; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    echo "test.sh: installing prometheus"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "test.sh: missing prometheus; install it (Debian/Ubuntu: sudo apt-get install prometheus)" >&2
    exit 1
  fi
fi

# ty and ruff check the NixOS tests' scripts as nixpkgs does (nix/tests/driver/README.md).
if ! python3 -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("ty") and u.find_spec("ruff") else 1)' 2>/dev/null; then
  echo "test.sh: installing ty and ruff (pip)"
  python3 -m pip install -q ty==1.2.0 ruff==0.17.6 || { echo "test.sh: pip install ty ruff failed" >&2; exit 1; }
fi

# Build the binary the process tests and the Nix checks start, and the stability suite's
# local Iroh relay (a workspace of its own; tests/relay/Cargo.toml says why). The
# stability suite's short run is part of the nextest run below (docs/stability.md).
cargo build --locked --bin blixard
cargo build --locked --manifest-path tests/relay/Cargo.toml --target-dir "${CARGO_TARGET_DIR:-target}"
status=0
if need cargo-nextest; then
  cargo nextest run --workspace --locked --no-fail-fast || status=1
else
  cargo test --workspace --locked --no-fail-fast || status=1
fi
./scripts/nix-check.sh || status=1
# The module against the real nixpkgs lib and microvm.nix: only where both are given
# (NIXPKGS_LIB, MICROVM_SRC); otherwise it says loudly that it did not run.
./scripts/nix-eval.sh || status=1
# Every fuzz target for a short run from its committed corpus (FUZZ_SECONDS each, default
# 20); a crash fails the run and names its reproducer.
./scripts/fuzz.sh || status=1
exit $status
