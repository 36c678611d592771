#!/usr/bin/env bash
# Evaluates the flake the way `nix flake check --no-build` would, against the real nixpkgs
# `lib` and the real microvm.nix modules, over stand-ins for the rest of nixpkgs
# (nix/tests/eval, README there): every host in hosts/, the template, every node of every
# NixOS test, and the module's case table (nix/tests/eval/cases.nix), each down to its
# system's toplevel drvPath; the failing cases must fail with their message; and each
# NixOS test's script (with its evaluated nodes) is checked against the test driver's API
# (nix/tests/driver/check.py).
#
#   NIXPKGS_LIB=/path/to/nixpkgs/lib MICROVM_SRC=/path/to/microvm.nix scripts/nix-eval.sh
#
# nixpkgs' lib/ alone is github:nix-community/nixpkgs.lib; microvm.nix is
# github:microvm-nix/microvm.nix (the revisions pinned in flake.lock). Neither is part of
# this repository. Without them this prints one loud line and checks nothing.
# Needs: nix-instantiate; python3 with ty and ruff for the script check.
set -uo pipefail
cd "$(dirname "$0")/.."
export NIX_CONFIG=$'experimental-features = nix-command flakes\nsandbox = false\nbuild-users-group ='

lib=${NIXPKGS_LIB:-}
mvm=${MICROVM_SRC:-}
if [ -z "$lib" ] || [ ! -f "$lib/default.nix" ] || [ -z "$mvm" ] || [ ! -d "$mvm/nixos-modules" ]; then
  echo "!!! nix-eval: NOT RUN: set NIXPKGS_LIB (nixpkgs' lib/ dir) and MICROVM_SRC (a microvm.nix checkout); the flake's eval checks, the module case table and the NixOS test nodes were NOT evaluated against nixpkgs !!!"
  exit 0
fi
lib=$(cd "$lib" && pwd); mvm=$(cd "$mvm" && pwd)

pass=0; fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
harness() { # EXPR over `h` (the harness) -> JSON on stdout
  nix-instantiate --eval --strict --json --argstr lib "$lib" --argstr mvm "$mvm" -E \
    "{ lib, mvm }: let h = import ./nix/tests/eval { lib = import lib; microvmSrc = mvm; }; in $1"
}

# The stand-ins themselves behave as NixOS does (conflicts, types, merges).
if harness 'h.selftest' > "$tmp/self.json" 2> "$tmp/self.err"; then
  bad_self=$(python3 -c 'import json,sys; print(" ".join(k for k, v in json.load(open(sys.argv[1])).items() if v is not True))' "$tmp/self.json")
  if [ -z "$bad_self" ]; then ok "stand-ins behave as NixOS ($(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$tmp/self.json") checks)"; else bad "stand-in self-test: $bad_self"; fi
else
  bad "stand-in self-test: $(grep -m3 error "$tmp/self.err")"
fi

# Every eval check of the flake, each forced to its drvPath in one evaluation; a failing one
# is evaluated again alone, for its error.
harness 'builtins.mapAttrs (_: d: (builtins.tryEval (builtins.deepSeq d true)).success) h.checks' \
  > "$tmp/checks.json" 2> "$tmp/checks.err" || { bad "flake checks: $(grep -m5 -A3 error "$tmp/checks.err")"; }
for name in $(python3 -c 'import json,sys; print(" ".join(sorted(json.load(open(sys.argv[1])))))' "$tmp/checks.json" 2>/dev/null); do
  if [ "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$tmp/checks.json" "$name")" = True ]; then
    ok "$name"
  else
    harness "h.checks.\"$name\"" > /dev/null 2> "$tmp/one.err"
    bad "$name: $(grep -v '^trace: evaluation warning' "$tmp/one.err" | head -12)"
  fi
done

# A failing case fails for its own reason: its message is in the error.
harness 'h.failText' > "$tmp/fails.json" 2>/dev/null
for name in $(python3 -c 'import json,sys; print(" ".join(k for k, v in sorted(json.load(open(sys.argv[1])).items()) if v))' "$tmp/fails.json"); do
  want=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$tmp/fails.json" "$name")
  if harness "h.toplevelOf \"$name\"" > /dev/null 2> "$tmp/case.err"; then
    bad "case $name: evaluated, but should fail with: $want"
  elif grep -qF -- "$want" "$tmp/case.err"; then
    ok "case $name fails with: $want"
  else
    bad "case $name: failed, but without \"$want\": $(head -8 "$tmp/case.err")"
  fi
done

# Each NixOS test's script, with its nodes, against the driver's API.
harness 'builtins.mapAttrs (_: t: { inherit (t) nodes testScript; }) h.tests' > "$tmp/tests.json" 2> "$tmp/tests.err" \
  || bad "test scripts: $(grep -m3 -A3 error "$tmp/tests.err")"
for t in $(python3 -c 'import json,sys; print(" ".join(sorted(json.load(open(sys.argv[1])))))' "$tmp/tests.json" 2>/dev/null); do
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["testScript"])' "$tmp/tests.json" "$t" > "$tmp/$t.py"
  nodes=$(python3 -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))[sys.argv[2]]["nodes"]))' "$tmp/tests.json" "$t")
  python3 nix/tests/driver/check.py --nodes "$nodes" --name "$t" "$tmp/$t.py" > "$tmp/$t.out" 2>&1
  case $? in
    0) ok "test script $t (nodes $nodes): ty and ruff find nothing" ;;
    3) bad "test script $t: $(cat "$tmp/$t.out")" ;;
    *) bad "test script $t: $(cat "$tmp/$t.out")" ;;
  esac
done

echo "nix-eval: $pass passed, $fail failed (nixpkgs lib: $lib; microvm.nix: $mvm)"
[ "$fail" = 0 ]
