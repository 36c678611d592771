#!/usr/bin/env bash
# Checks the Nix side without nixpkgs (which cannot be fetched here):
#  (a) every .nix file parses;
#  (b) nix/tests/cases.nix evaluates (pure, builtins only) to nix/tests/expected/*.json;
#  (c) configs produced by nix/lib.nix's mkDaemonConfig are accepted (or, for the invalid
#      samples, refused with exit 8) by `blixard node check-config`;
#  (d) declared-VM lists produced by mkDeclaredVms, named by `[vms] declared_file` as the
#      module names them, are accepted by check-config; bad ones are refused (exit 8)
#      naming the VM. The configs moduleDaemonConfig renders (supervisor, unit
#      properties) go through check-config the same way;
#  (e) lib.polkitRule, run in node against a stand-in for polkit (nix/tests/polkit-rule.js),
#      allows the daemon's user exactly its VM units (skipped, and said so, without node);
#  (f) every NixOS test's script type-checks and lints against the test driver's API
#      (nix/tests/driver/check.py: ty and ruff, as nixpkgs checks test scripts).
# The module evaluated with the real nixpkgs lib and microvm.nix: scripts/nix-eval.sh.
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
run_check() { # NAME CONFIG_FILE EXPECTED_EXIT [TEXT the output must contain]...
  local n=$1 f=$2 want=$3 rc t; shift 3
  "$bin" node check-config "$f" >"$tmp/$n.out" 2>&1; rc=$?
  if [ "$rc" != "$want" ]; then bad "check-config $n: exit $rc, want $want: $(cat "$tmp/$n.out")"; return; fi
  for t in "$@"; do
    if ! grep -qF -- "$t" "$tmp/$n.out"; then bad "check-config $n: exit $rc, but the output lacks $t: $(cat "$tmp/$n.out")"; return; fi
  done
  ok "check-config $n exit $rc"
}
check_config() { # CASE EXPECTED_EXIT [TEXT the output must contain]
  local c=$1; shift
  nix-instantiate --eval --strict --json nix/tests/cases.nix -A "$c" > "$tmp/$c.json" || { bad "check-config $c: eval"; return; }
  run_check "$c" "$tmp/$c.json" "$@"
}
# Every rendered config: daemon-config-* and sample-valid* must be accepted; sample-invalid*
# (e.g. the [vms] timing rule broken by 1 ms) refused with exit 8. module-daemon-config*
# name /etc/blixard/vms.json: checked in (d), with the file.
for c in $cases; do
  case $c in
    module-daemon-config*) ;;
    sample-valid) check_config "$c" 0 '"supervisor": "systemd"' ;;
    daemon-config-vms) check_config "$c" 0 '"Environment=RUST_LOG=info MODE=vm"' ;;
    daemon-config-*|sample-valid*) check_config "$c" 0 ;;
    sample-invalid-vms-timing) check_config "$c" 8 "vms.down_timeout_ms" ;;
    sample-invalid-unit-properties) check_config "$c" 8 "vms.unit_properties" '"Nice"' ;;
    sample-invalid-declared-file) check_config "$c" 8 "vms.declared_file" ;;
    sample-invalid-telemetry) check_config "$c" 8 "telemetry.otlp_endpoint" "only http://" ;;
    sample-invalid) check_config "$c" 8 "raft.election_ticks" ;;
    sample-invalid*) check_config "$c" 8 ;;
  esac
done

# (d) declared VMs. The config is CONFIG_CASE (what the module renders; module-daemon-config
# unless given) with vms.declared_file pointed from /etc/blixard/vms.json at a temp file
# holding the case VMS_CASE (a list from mkDeclaredVms, or a bad one made from it).
check_module() { # CONFIG_CASE NAME VMS_CASE|- EXPECTED_EXIT [TEXT the output must contain]...
  local cc=$1 n=$2 vms=$3 want=$4; shift 4
  local vf="$tmp/$n.vms.json"
  if [ "$vms" != - ]; then
    nix-instantiate --eval --strict --json nix/tests/cases.nix -A "$vms" > "$vf" || { bad "check-config $n: eval $vms"; return; }
  fi
  nix-instantiate --eval --strict --json --argstr file "$vf" --argstr case "$cc" -E '{ file, case }:
    let c = (import ./nix/tests/cases.nix).${case}; in
    assert c.vms.declared_file == "/etc/blixard/vms.json";
    c // { vms = c.vms // { declared_file = file; }; }' > "$tmp/$n.json" 2>"$tmp/$n.err" \
    || { bad "check-config $n: eval config: $(cat "$tmp/$n.err")"; return; }
  run_check "$n" "$tmp/$n.json" "$want" "$@"
}
check_declared() { check_module module-daemon-config "$@"; } # NAME VMS_CASE|- EXPECTED_EXIT [TEXT]...
check_declared declared-module module-declared-vms 0
check_declared declared-local declared-vms-local 0
check_declared declared-defaults declared-vms-defaults 0
check_declared declared-two declared-vms 0
# nothing declared: the module still writes the file (an empty list), so the daemon deletes
# what this node declared before
check_declared declared-none declared-vms-none 0
# the daemon names the VM as its Debug form ("web"), as the module's messages do
check_declared declared-bad-duplicate declared-vms-bad-duplicate 8 '"web"'
check_declared declared-bad-restart declared-vms-bad-restart 8 '"web"'
check_declared declared-missing - 8 "declared-missing.vms.json"
# Supervisors as the module renders them: systemd (its default) with the VM units' sandbox
# and the operator's entries after it; process; every module-daemon-config* case is here.
check_module module-daemon-config module-systemd module-declared-vms 0 \
  '"supervisor": "systemd"' '"User=blixard"' '"ReadWritePaths=/var/lib/blixard/vms"'
check_module module-daemon-config-unit-properties module-unit-properties module-declared-vms 0 \
  '"supervisor": "systemd"' '"ReadWritePaths=/srv/blixard-vms"' '"LimitNOFILE=1048576"' '"Environment=A=b c"'
check_module module-daemon-config-process module-process module-declared-vms 0 '"supervisor": "process"'
check_module module-daemon-config-no-vms module-no-vms declared-vms-none 0 '"supervisor": "systemd"'
for c in $cases; do
  case $c in
    module-daemon-config|module-daemon-config-unit-properties|module-daemon-config-process|module-daemon-config-no-vms) ;;
    module-daemon-config*) bad "check-config $c: not checked (add it to (d))" ;;
  esac
done

# (e) the polkit rule, as polkitd would run it
if command -v node >/dev/null; then
  if nix-instantiate --eval --strict --json nix/tests/cases.nix -A polkit-rule 2>"$tmp/polkit.err" \
       | node -e 'process.stdout.write(JSON.parse(require("fs").readFileSync(0, "utf8")))' > "$tmp/polkit.js" \
     && node nix/tests/polkit-rule.js "$tmp/polkit.js" > "$tmp/polkit.out" 2>&1; then
    ok "polkit rule: $(grep -c '^ok' "$tmp/polkit.out") requests answered as expected"
  else
    bad "polkit rule: $(cat "$tmp/polkit.err") $(grep -v '^ok' "$tmp/polkit.out")"
  fi
else
  echo "skip polkit rule: node not found"
fi

# (f) every NixOS test's script against the test driver's API, as nixpkgs checks it before
# a test runs (ty and ruff: nix/tests/driver). The nodes are not evaluated here (that is
# scripts/nix-eval.sh, with nixpkgs' lib): a script that takes `nodes` gets stand-ins
# with the attributes scripts use.
for t in nixos-tests/*.nix; do
  [ "$(basename "$t")" = common.nix ] && continue
  name=$(basename "$t" .nix)
  if ! nix-instantiate --eval --strict --json --argstr file "$PWD/$t" -E '{ file }:
      let
        test = import file { self = { nixosModules.default = { }; }; };
        names = builtins.attrNames test.nodes;
        stub = n: { system.build.toplevel = "${builtins.storeDir}/00000000000000000000000000000000-nixos-system-${n}"; };
        nodes = builtins.listToAttrs (map (n: { name = n; value = stub n; }) names);
      in {
        inherit names;
        script = if builtins.isFunction test.testScript then test.testScript { inherit nodes; } else test.testScript;
      }' > "$tmp/test-$name.json" 2> "$tmp/test-$name.err"; then
    bad "test script $name: $(cat "$tmp/test-$name.err")"; continue
  fi
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["script"])' "$tmp/test-$name.json" > "$tmp/test-$name.py"
  nodes=$(python3 -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))["names"]))' "$tmp/test-$name.json")
  python3 nix/tests/driver/check.py --nodes "$nodes" --name "$name" "$tmp/test-$name.py" > "$tmp/test-$name.out" 2>&1
  if [ $? = 0 ]; then ok "test script $name (nodes $nodes): ty and ruff find nothing"; else bad "test script $name: $(cat "$tmp/test-$name.out")"; fi
done
# ... and the checker catches what it should (a wrong node, method, argument, lint)
if sh nix/tests/driver/samples/run.sh > "$tmp/samples.out" 2>&1; then ok "test script checker: its samples pass and fail as they should"; else bad "test script checker samples: $(cat "$tmp/samples.out")"; fi

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
