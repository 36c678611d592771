#!/usr/bin/env bash
# Starts a local 3-node Blixard cluster on loopback, shows its status, and stops it
# (pass --keep to leave it running; its data dirs are printed).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo.sh: cargo is missing; install Rust (https://rustup.rs) or use 'nix develop'" >&2; exit 1; }
keep=false
[ "${1:-}" = "--keep" ] && keep=true

cargo build --locked --release --bin blixard
bin=$PWD/target/release/blixard
dir=$(mktemp -d /tmp/blixard-demo.XXXXXX)
pids=()
stop() { [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true; }
$keep || trap stop EXIT

# Waits until the node in data dir $1 answers `cluster status`.
wait_ready() {
  for _ in $(seq 1 100); do
    "$bin" --data-dir "$1" cluster status --stale >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "node $1 did not come up; its log:" >&2; cat "$1.log" >&2; exit 1
}

echo "== starting n1 (new cluster) in $dir"
# Each node gets its own binary cache port and store dir (they share one host here).
node_args() { echo "--cache-listen 127.0.0.1:1738$1 --store-dir $dir/n$1.store"; }
# shellcheck disable=SC2046
"$bin" node run --data-dir "$dir/n1" --listen 127.0.0.1:17001 --name n1 $(node_args 1) --init >"$dir/n1.log" 2>&1 &
pids+=($!)
wait_ready "$dir/n1"
for i in 2 3; do
  ticket=$("$bin" --data-dir "$dir/n1" cluster token create --ttl 10m)
  echo "== n$i joins with a one-time ticket"
  # shellcheck disable=SC2046
  "$bin" node run --data-dir "$dir/n$i" --listen 127.0.0.1:1700$i --name "n$i" $(node_args "$i") --join "$ticket" >"$dir/n$i.log" 2>&1 &
  pids+=($!)
  wait_ready "$dir/n$i"
done
echo "== a write through n3"
"$bin" --data-dir "$dir/n3" cluster meta set greeting hello
for _ in $(seq 1 100); do
  voters=$("$bin" --data-dir "$dir/n1" cluster status --output json | grep -c '"role": "Voter"' || true)
  [ "$voters" = 3 ] && break
  sleep 0.1
done
echo "== blixard --data-dir $dir/n2 cluster status"
"$bin" --data-dir "$dir/n2" cluster status
echo "== blixard --data-dir $dir/n1 cluster meta get"
"$bin" --data-dir "$dir/n1" cluster meta get
echo "== an image: a plain directory imported on n1, pulled by n3 over Iroh"
mkdir -p "$dir/runner/bin"
printf '#!/bin/sh\necho hello from a runner\n' >"$dir/runner/bin/microvm-run"
chmod +x "$dir/runner/bin/microvm-run"
"$bin" --data-dir "$dir/n1" image import "$dir/runner" --name demo
"$bin" --data-dir "$dir/n3" image pull demo
"$bin" --data-dir "$dir/n1" image list
if $keep; then
  echo "== cluster left running (pids ${pids[*]}); data dirs and logs in $dir"
fi
