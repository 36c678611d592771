#!/usr/bin/env bash
# Checks the Nix side without nixpkgs (which cannot be fetched here):
#  (a) every .nix file parses;
#  (b) nix/tests/cases.nix evaluates (pure, builtins only) to nix/tests/expected/*.json;
#  (c) configs produced by nix/lib.nix's mkDaemonConfig are accepted (or, for the invalid
#      samples, refused with exit 8) by `blixard node check-config`.
# Needs: nix-instantiate (apt-get install nix-bin). Prints "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
export NIX_CONFIG=$'experimental-features = nix-command flakes\nsandbox = false\nbuild-users-group ='
# Single-user Nix as root from a fresh install: make sure its state dirs exist.
if [ "$(id -u)" = 0 ]; then mkdir -p /nix/var/nix/db /nix/var/nix/profiles /nix/var/nix/gcroots /nix/store 2>/dev/null || true; fi

command -v nix-instantiate >/dev/null || { echo "nix-instantiate missing: apt-get install -y nix-bin" >&2; exit 2; }

pass=0; fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# (a) parse every .nix file
while IFS= read -r -d '' f; do
  if err=$(nix-instantiate --parse "$f" 2>&1 >/dev/null); then ok "parse $f"; else bad "parse $f: $err"; fi
done < <(find . \( -path ./target -o -path ./fuzz/target -o -path ./.git \) -prune -o -name '*.nix' -type f -print0 | sort -z)

# (b) eval tests: each case against its expected JSON (compared as values, in Nix)
cases=$(nix-instantiate --eval --strict --json -E 'builtins.attrNames (import ./nix/tests/cases.nix)' | tr -d '[]"' | tr ',' ' ')
[ -n "$cases" ] || bad "no eval cases found"
for c in $cases; do
  exp="nix/tests/expected/$c.json"
  if [ ! -f "$exp" ]; then bad "eval $c: missing $exp"; continue; fi
  if ! actual=$(nix-instantiate --eval --strict --json nix/tests/cases.nix -A "$c" 2>"$tmp/err"); then
    bad "eval $c: $(cat "$tmp/err")"; continue
  fi
  same=$(nix-instantiate --eval --strict --json -E \
    "(import ./nix/tests/cases.nix).\"$c\" == builtins.fromJSON (builtins.readFile ./$exp)" 2>&1)
  if [ "$same" = true ]; then ok "eval $c"; else bad "eval $c: got $actual"; fi
done
# every expected file has a case
for e in nix/tests/expected/*.json; do
  n=$(basename "$e" .json)
  case " $cases " in *" $n "*) ;; *) bad "expected file $e has no case";; esac
done

# (c) the daemon accepts what mkDaemonConfig renders
bin=${CARGO_TARGET_DIR:-target}/debug/blixard
if [ ! -x "$bin" ]; then cargo build --bin blixard || { bad "cargo build --bin blixard"; }; fi
check_config() { # CASE EXPECTED_EXIT [TEXT the output must contain]
  local c=$1 want=$2 text=${3:-} rc
  nix-instantiate --eval --strict --json nix/tests/cases.nix -A "$c" > "$tmp/$c.json" || { bad "check-config $c: eval"; return; }
  "$bin" node check-config "$tmp/$c.json" >"$tmp/$c.out" 2>&1; rc=$?
  if [ "$rc" != "$want" ]; then bad "check-config $c: exit $rc, want $want: $(cat "$tmp/$c.out")"
  elif [ -n "$text" ] && ! grep -qF -- "$text" "$tmp/$c.out"; then bad "check-config $c: exit $rc but no \"$text\" in: $(cat "$tmp/$c.out")"
  else ok "check-config $c exit $rc"; fi
}
# Every rendered config: daemon-config-*, module-daemon-config* and sample-valid* must be
# accepted; sample-invalid* (e.g. the [vms] timing rule broken by 1 ms) refused with exit 8.
for c in $cases; do
  case $c in
    daemon-config-*|module-daemon-config*|sample-valid*) check_config "$c" 0 ;;
    sample-invalid-vms-timing) check_config "$c" 8 "vms.down_timeout_ms" ;;
    sample-invalid) check_config "$c" 8 "raft.election_ticks" ;;
    sample-invalid*) check_config "$c" 8 ;;
  esac
done

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
