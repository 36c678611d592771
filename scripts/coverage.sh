#!/usr/bin/env bash
# Line coverage of the P2P code under the tests CI runs (scripts/test.sh: the `blixard`
# binary, then `cargo nextest run --workspace`), the daemons those tests start included.
#
#   scripts/coverage.sh            build instrumented, run the tests, report
#   scripts/coverage.sh --report   report again from the last run's profiles
#
# Stable rustc's `-C instrument-coverage` writes the profiles; Debian 12's llvm-19 tools
# read them (the stable toolchain ships no llvm-tools; set LLVM_PROFDATA and LLVM_COV to
# use others). Every process writes its own profile (`%p`), so the daemons the process
# tests start count, except the ones a test kills with SIGKILL (no exit, no profile).
# Lines of `#[cfg(test)]` modules and of test-only files are left out of the figures.
# Writes the per-file table to target/coverage/coverage.md (docs/coverage.md holds a copy).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out="${CARGO_TARGET_DIR:-$root/target}/coverage"
report_only=0
[ "${1:-}" = --report ] && report_only=1

profdata=${LLVM_PROFDATA:-llvm-profdata-19}
cov=${LLVM_COV:-llvm-cov-19}
if ! command -v "$profdata" >/dev/null || ! command -v "$cov" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "coverage.sh: installing llvm-19"
    apt-get update -qq && apt-get install -y -qq llvm-19 >/dev/null
  else
    echo "coverage.sh: need $profdata and $cov (Debian: apt-get install llvm-19)" >&2
    exit 1
  fi
fi

# Its own target dir: instrumented artifacts must not mix with the normal build's.
export CARGO_TARGET_DIR="$out/target"
export RUSTFLAGS="-C instrument-coverage"
unset CARGO_ENCODED_RUSTFLAGS
profiles="$out/profiles"
status=0
if [ $report_only = 0 ]; then
  rm -rf "$profiles" "$out/build-profiles" && mkdir -p "$profiles"
  # Build scripts and proc macros are instrumented too: their profiles go elsewhere.
  LLVM_PROFILE_FILE="$out/build-profiles/%p-%m.profraw" cargo build --locked --bin blixard
  LLVM_PROFILE_FILE="$out/build-profiles/%p-%m.profraw" cargo test --workspace --locked --no-run
  LLVM_PROFILE_FILE="$profiles/%p-%m.profraw" \
    cargo nextest run --workspace --locked --no-fail-fast || status=1
fi

"$profdata" merge -sparse "$profiles"/*.profraw -o "$out/all.profdata"
# Every binary the tests ran: the test binaries and the daemon.
objects=$(LLVM_PROFILE_FILE="$out/build-profiles/%p-%m.profraw" cargo nextest list --workspace --locked --list-type binaries-only --message-format json 2>/dev/null |
  python3 -c 'import json,sys; [print(b["binary-path"]) for b in json.load(sys.stdin)["rust-binaries"].values()]')
args=()
for o in $objects "$CARGO_TARGET_DIR/debug/blixard"; do args+=(-object "$o"); done
"$cov" export -format=lcov -instr-profile="$out/all.profdata" "${args[@]}" \
  -ignore-filename-regex='/\.cargo/|/rustc/|/target/' >"$out/lcov.info"

python3 - "$out/lcov.info" "$root" >"$out/coverage.md" <<'EOF'
import collections, os, re, sys
lcov, root = sys.argv[1], sys.argv[2]
# The P2P code: the network crate, and the images crate's fetch and cache paths.
groups = [
    ("crates/net", lambda f: f.startswith("crates/net/src/")),
    ("crates/images fetch", lambda f: f == "crates/images/src/fetch.rs"),
    ("crates/images cache", lambda f: f.startswith("crates/images/src/cache/")),
]

def test_lines(path):
    """Lines of #[cfg(test)] items: from the attribute to the item's closing brace."""
    skip, lines = set(), open(os.path.join(root, path)).read().split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "#[cfg(test)]":
            depth, j, opened = 0, i, False
            while j < len(lines):
                depth += lines[j].count("{") - lines[j].count("}")
                opened |= "{" in lines[j]
                if (opened and depth <= 0) or (not opened and lines[j].rstrip().endswith(";")):
                    break
                j += 1
            skip.update(range(i + 1, j + 2))
            i = j
        i += 1
    return skip

hits = collections.defaultdict(dict)
name = None
for line in open(lcov):
    if line.startswith("SF:"):
        name = os.path.relpath(line[3:].strip(), root)
    elif line.startswith("DA:") and name:
        n, c = line[3:].split(",")[:2]
        hits[name][int(n)] = max(hits[name].get(int(n), 0), int(c))

rows = []
for f in sorted(hits):
    group = next((g for g, match in groups if match(f)), None)
    if group is None or f.endswith("/tests.rs"):
        continue
    skip = test_lines(f)
    lines = {n: c for n, c in hits[f].items() if n not in skip}
    rows.append((group, f, len(lines), sum(1 for c in lines.values() if c)))

def pct(c, n):
    return f"{100 * c / n:.1f} %" if n else "-"

print("| file | lines | covered | coverage |\n|---|---:|---:|---:|")
for _, f, n, c in rows:
    print(f"| `{f}` | {n} | {c} | {pct(c, n)} |")
print("\n| part | lines | covered | coverage |\n|---|---:|---:|---:|")
for g, _ in groups:
    n = sum(r[2] for r in rows if r[0] == g)
    c = sum(r[3] for r in rows if r[0] == g)
    print(f"| {g} | {n} | {c} | {pct(c, n)} |")
n, c = sum(r[2] for r in rows), sum(r[3] for r in rows)
print(f"| **total** | {n} | {c} | **{pct(c, n)}** |")
EOF
cat "$out/coverage.md"
[ $status = 0 ] || echo "coverage.sh: some tests failed; the figures above include their runs" >&2
exit $status
