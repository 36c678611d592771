#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ with libFuzzer, on the stable toolchain: no cargo-fuzz,
# no nightly. The targets are built with the coverage instrumentation cargo-fuzz would
# ask for (stable rustc flags: the sancov pass and its LLVM options), plus overflow
# checks and debug assertions; libfuzzer-sys builds libFuzzer itself with the C++ compiler.
#
#   scripts/fuzz.sh                    every target for FUZZ_SECONDS (default 20) each (CI)
#   scripts/fuzz.sh --long SECONDS     every target for SECONDS each
#   scripts/fuzz.sh [--long S] T...    only targets T...
#   scripts/fuzz.sh --minimize T...    fold what the runs found into fuzz/corpus/T, minimized
#   scripts/fuzz.sh --build            build only
#
# Each target starts from its committed corpus, fuzz/corpus/<target>/, and keeps what it
# finds in the build dir (never in the repo unless --minimize). A crash, a timeout or an
# out-of-memory fails the run and prints the reproducer's path and how to replay it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${FUZZ_SECONDS:-20}
mode=run
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --long) seconds=${2:?--long needs SECONDS}; shift 2 ;;
    --minimize) mode=minimize; shift ;;
    --build) mode=build; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^blixard-fuzz$')
[ ${#targets[@]} -gt 0 ] || read -r -a targets <<<"$(echo $all)"
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$all" || { echo "fuzz.sh: no target $t (have: $(echo $all))" >&2; exit 2; }
done

# Its own target dir: the instrumentation flags must not reach the main build.
out="${CARGO_TARGET_DIR:-$root/target}/fuzz"
host=$(rustc -vV | sed -n 's/^host: //p')
flags=(
  --cfg fuzzing
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cdebug-assertions
  -Coverflow-checks
)
echo "fuzz.sh: building ${targets[*]}"
start=$(date +%s)
# --target keeps build scripts and proc macros uninstrumented (RUSTFLAGS then only apply
# to the target's code).
(cd fuzz && env -u CARGO_ENCODED_RUSTFLAGS RUSTFLAGS="${flags[*]}" \
  cargo build --release --locked --target "$host" --target-dir "$out" \
  $(printf -- '--bin %s ' "${targets[@]}"))
echo "fuzz.sh: built in $(($(date +%s) - start)) s"
[ "$mode" = build ] && exit 0
bin="$out/$host/release"

if [ "$mode" = minimize ]; then
  for t in "${targets[@]}"; do
    # The seeds (seed-*) stay; of the rest, a small set that reaches the same edges
    # (hit counts ignored, so the committed corpus stays small).
    new="$out/corpus/$t.min"
    rm -rf "$new" && mkdir -p "$new" "$out/corpus/$t"
    find "fuzz/corpus/$t" -name 'seed-*' -exec cp {} "$new/" \;
    "$bin/$t" -set_cover_merge=1 -use_counters=0 -use_cmp=0 "$new" "fuzz/corpus/$t" "$out/corpus/$t" >"$out/$t.merge.log" 2>&1 \
      || { tail -20 "$out/$t.merge.log"; exit 1; }
    rm -rf "fuzz/corpus/$t" && mv "$new" "fuzz/corpus/$t"
    echo "fuzz.sh: fuzz/corpus/$t: $(ls "fuzz/corpus/$t" | wc -l) inputs, $(du -sh --apparent-size "fuzz/corpus/$t" | cut -f1)"
  done
  exit 0
fi

status=0
# The nar target unpacks into a scratch dir under TMPDIR: keep it in the build dir.
export TMPDIR="$out/tmp"
rm -rf "$TMPDIR" && mkdir -p "$TMPDIR"
printf '%-12s %8s %12s %10s %8s\n' target seconds executions exec/s corpus
for t in "${targets[@]}"; do
  work="$out/corpus/$t"
  artifacts="$out/artifacts/$t"
  mkdir -p "$work" "$artifacts" "fuzz/corpus/$t"
  log="$out/$t.log"
  # New finds go to the first dir (the build dir's), the committed corpus is only read.
  if "$bin/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$artifacts/" \
      "$work" "fuzz/corpus/$t" >"$log" 2>&1; then
    ok=1
  else
    ok=0
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  secs=$(sed -n 's/.*Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  units=$(ls "$work" | wc -l)
  rate=$([ -n "${secs:-}" ] && [ "${secs:-0}" -gt 0 ] && echo $(( ${execs:-0} / secs )) || echo -)
  printf '%-12s %8s %12s %10s %8s\n' "$t" "${secs:-?}" "${execs:-?}" "$rate" "$units"
  if [ $ok = 0 ]; then
    status=1
    echo "fuzz.sh: $t FAILED; the end of its log ($log):" >&2
    tail -40 "$log" >&2
    for a in $(grep -o "Test unit written to .*" "$log" | sed 's/Test unit written to //'); do
      echo "fuzz.sh: reproducer: $a" >&2
      echo "fuzz.sh: replay with: $bin/$t $a" >&2
    done
  fi
done
exit $status
