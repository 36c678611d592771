#!/usr/bin/env bash
# The P2P stability suite (docs/stability.md): real daemons, each in a network namespace
# of its own, under partitions, latency and loss, a NAT with only a relay between nodes,
# 1,000 API clients and image fetches, with every write and read checked for
# linearizability. Prints a markdown table per scenario.
#
#   scripts/stability.sh              the short run CI makes (about a minute)
#   scripts/stability.sh --long       every scenario longer and three times (about 25 min)
#   scripts/stability.sh --soak HOURS mixed load with a fault every cycle; failures per hour
#
# Needs root (network namespaces, iptables). Reports go to a temp dir (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=short
hours=
case "${1:-}" in
  "") ;;
  --long) mode=long ;;
  --soak)
    mode=soak
    hours="${2:-}"
    if ! [[ "$hours" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
      echo "stability.sh: --soak needs a number of hours, e.g. --soak 2" >&2
      exit 2
    fi
    ;;
  -h | --help)
    sed -n 2,11p "$0"
    exit 0
    ;;
  *)
    echo "stability.sh: unknown argument '$1' (try --help)" >&2
    exit 2
    ;;
esac
if [ "$(id -u)" != 0 ]; then
  echo "stability.sh: needs root (network namespaces, iptables)" >&2
  exit 1
fi
need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need iptables || missing+=(iptables)
need nsenter || missing+=(util-linux)
need ip || missing+=(iproute2)
need python3 || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  echo "stability.sh: installing ${missing[*]}"
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi

target="${CARGO_TARGET_DIR:-target}"
cargo build --locked --bin blixard
# The local Iroh relay, in a workspace of its own (tests/relay/Cargo.toml says why).
cargo build --locked --manifest-path tests/relay/Cargo.toml --target-dir "$target"

out=$(mktemp -d /tmp/blixard-stability.XXXXXX)
export BLIXARD_STABILITY_REPORT="$out/report.jsonl"
status=0
started=$(date +%s)
if [ "$mode" = soak ]; then
  BLIXARD_SOAK_HOURS="$hours" BLIXARD_SOAK_SUMMARY="$out/soak.md" \
    cargo test --locked -p blixard-tests --test stability -- --ignored --exact soak \
    --nocapture --test-threads=1 || status=1
else
  BLIXARD_STABILITY="$mode" \
    cargo test --locked -p blixard-tests --test stability -- --nocapture --test-threads=1 ||
    status=1
fi
elapsed=$(($(date +%s) - started))

echo
echo "## Stability suite ($mode), $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ), ${elapsed} s"
echo
if [ -s "$BLIXARD_STABILITY_REPORT" ]; then
  python3 - "$BLIXARD_STABILITY_REPORT" <<'PY'
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]

def recovery(r):
    v = r["recovery_secs"]
    return "-" if v is None else (f"{v:.2f} s" if isinstance(v, (int, float)) else "**" + v + "**")

def errors(r):
    total = sum(r["errors"].values())
    if not total:
        return "0"
    top = sorted(r["errors"].items(), key=lambda kv: -kv[1])[:2]
    return f"{total} (" + "; ".join(f"{n}× {k[:60]}" for k, n in top) + ")"

def lin(r):
    v = r["linearizable"]
    return "yes" if v is True else ("**NO**" if v is False else "**" + str(v) + "**")

print("| scenario | fault | recovery after heal | writes acked | writes unknown | writes lost | errors seen | linearizable |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    lost = r["writes_lost"]
    print(f"| {r['scenario']} | {r['fault']} ({r['fault_secs']:.1f} s) | {recovery(r)} | {r['writes_acked']} | "
          f"{r['writes_unknown']} | {lost if lost == 0 else f'**{lost}**'} | {errors(r)} | {lin(r)} |")
print()
print("| scenario | write latency p50 / p99 | terms | commit index | RSS MiB (max node) | CPU s (all nodes) | notes |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    b, a = r["before"], r["after"]
    terms = f"{max(n['term'] for n in b)} → {max(n['term'] for n in a)}"
    commit = f"{max(n['commit'] for n in b)} → {max(n['commit'] for n in a)}"
    rss = lambda ns: max((n["rss_kib"] or 0) for n in ns) / 1024
    # A restarted node's CPU time counts from its restart.
    cpu = sum((y["cpu_secs"] or 0) - ((x["cpu_secs"] or 0) if x.get("pid") == y.get("pid") else 0)
              for x, y in zip(b, a))
    lat = r["write_latency_ms"]
    notes = "; ".join(f"{k}: {v}" for k, v in r["extra"].items())
    print(f"| {r['scenario']} | {lat['p50']:.0f} / {lat['p99']:.0f} ms | {terms} | {commit} | "
          f"{rss(b):.0f} → {rss(a):.0f} | {cpu:.1f} | {notes} |")
failed = [r for r in rows if r["failures"]]
if failed:
    print()
    print("### Failures")
    for r in failed:
        for f in r["failures"]:
            print(f"- {r['scenario']}: {f.splitlines()[0]}")
PY
else
  echo "(no scenario reported; see the output above)"
fi
if [ -s "$out/soak.md" ]; then
  echo
  cat "$out/soak.md"
fi
echo
echo "reports: $out"
exit $status
