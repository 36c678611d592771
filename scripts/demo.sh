#!/usr/bin/env bash
# Starts a local 3-node Blixard cluster on loopback, moves an image between nodes, runs a
# real microVM (QEMU with Debian's cloud kernel and a busybox initramfs) through the
# cluster, prints its console and stops it; then stops the cluster (pass --keep to leave
# it running; its data dirs are printed). Installs QEMU, busybox-static and cpio with
# apt-get when run as root and they are missing.
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
# Each node gets its own binary cache and metrics ports and store dir (they share one
# host here).
node_args() { echo "--cache-listen 127.0.0.1:1738$1 --metrics-listen 127.0.0.1:1739$1 --store-dir $dir/n$1.store"; }
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

echo "== a VM: a real guest, created through n2, placed by the leader's scheduler"
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "demo.sh: installing ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "demo.sh: the VM part needs ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
# The kernel (Debian's cloud kernel, fetched with apt-get download) and an initramfs whose
# init prints BLIXARD-GUEST-UP, then ticks.
bash tests/fixtures/guest/build.sh "$dir/guest-build" >/dev/null
mkdir -p "$dir/guest/bin" "$dir/guest/share"
cp "$dir/guest-build/vmlinuz" "$dir/guest-build/initrd" "$dir/guest/share/"
# A runner the way microvm.nix writes one. TCG (software emulation) by default, so it
# runs anywhere; BLIXARD_ACCEL=kvm on a host with working KVM.
cat >"$dir/guest/bin/microvm-run" <<'RUN'
#!/bin/sh
d=$(dirname "$0")/../share
exec qemu-system-x86_64 -machine pc,accel=${BLIXARD_ACCEL:-tcg} -m 128 -display none \
  -nodefaults -serial stdio -no-reboot -kernel "$d/vmlinuz" -initrd "$d/initrd" \
  -append 'console=ttyS0 quiet panic=-1'
RUN
chmod +x "$dir/guest/bin/microvm-run"
"$bin" --data-dir "$dir/n1" image import "$dir/guest" --name guest
"$bin" --data-dir "$dir/n2" vm create hello --image guest --memory 128 \
  --ready-marker BLIXARD-GUEST-UP --wait ready
"$bin" --data-dir "$dir/n1" vm list
echo "== blixard --data-dir $dir/n3 vm logs hello   (read on the VM's host, from any node)"
"$bin" --data-dir "$dir/n3" vm logs hello --lines 5
"$bin" --data-dir "$dir/n1" vm stop hello >/dev/null
echo "== stopped:"
"$bin" --data-dir "$dir/n1" vm list
$keep || "$bin" --data-dir "$dir/n1" vm delete hello
if $keep; then
  echo "== cluster left running (pids ${pids[*]}); data dirs and logs in $dir"
fi
