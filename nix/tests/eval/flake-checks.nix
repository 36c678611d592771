# The flake's evaluation checks (`nix flake check --no-build` runs them): every host
# configuration, the template's, every node of every NixOS test, and the module's case
# table (./cases.nix), each forced down to its system's toplevel drvPath. They build
# nothing: a check's derivation only records the drvPath it forced (without depending on
# it), so building a check is instant and evaluating it is the test. The eval harness
# (./default.nix) evaluates this same file over its stand-ins.
{ lib, pkgs, nixosSystem, module, hosts, template, tests }:
let
  # Forces `drvPath` when the check is evaluated; depends on nothing.
  evalCheck = name: drvPath: pkgs.runCommand "eval-${name}"
    { drv = builtins.unsafeDiscardStringContext drvPath; }
    "echo \"$drv\" > $out";
  toplevel = config: config.system.build.toplevel.drvPath;
  prefixed = prefix: f: lib.mapAttrs' (n: v: lib.nameValuePair "${prefix}${n}" (f n v));
  cases = import ./run-cases.nix { inherit lib nixosSystem module; };
in
prefixed "eval-host-" (n: c: evalCheck "host-${n}" (toplevel c.config)) hosts
// prefixed "eval-template-" (n: c: evalCheck "template-${n}" (toplevel c.config)) template
// lib.concatMapAttrs (t: test:
  prefixed "eval-test-${t}-" (n: node: evalCheck "test-${t}-${n}" (toplevel node)) test.config.nodes) tests
// prefixed "eval-case-" (n: r:
  if r.ok then pkgs.runCommand "eval-case-${n}" { } "touch $out"
  else throw "eval case ${n} failed:\n${lib.concatLines r.report}") cases.results
