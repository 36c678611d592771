# The eval harness: evaluates this project's flake, as `nix flake check --no-build`
# would, with the real nixpkgs `lib` and the real microvm.nix modules, but over stand-ins
# for the rest of nixpkgs (NixOS' options with nixpkgs' types: nixos-options.nix; the
# evaluator: nixos.nix; packages: pkgs.nix; `utils`: utils.nix). Neither lib nor
# microvm.nix is part of this repository: pass them by path (scripts/nix-eval.sh does).
#
#   nix-instantiate --eval --strict nix/tests/eval -A checks \
#     --arg lib 'import /path/to/nixpkgs/lib' --argstr microvmSrc /path/to/microvm.nix
{ lib, microvmSrc }:
let
  system = "x86_64-linux";
  utils = import ./utils.nix { inherit lib; };
  nixos = import ./nixos.nix { inherit lib pkgs utils; };
  pkgs = import ./pkgs.nix { inherit lib; } // {
    testers.runNixOSTest = nixos.runNixOSTest;
  };
  nixpkgs = {
    lib = lib // { inherit (nixos) nixosSystem; };
    legacyPackages.${system} = pkgs;
  };
  microvm = import ./microvm.nix { src = microvmSrc; };

  flake = import ../../../flake.nix;
  root = ../../..;
  outputs = flake.outputs { self = outputs // { outPath = root; }; inherit nixpkgs microvm; };
  checks = outputs.checks.${system};
  evalChecks = lib.filterAttrs (n: _: lib.hasPrefix "eval-" n) checks;
  cases = import ./run-cases.nix { inherit lib; inherit (nixos) nixosSystem; module = outputs.nixosModules.default; };
in
{
  # name -> drvPath of the flake's eval check (forcing it is the test)
  checks = lib.mapAttrs (_: c: c.drvPath) evalChecks;
  checkNames = lib.attrNames evalChecks;
  # name -> { ok; report }
  cases = cases.results;
  inherit (cases) toplevelOf;
  caseKinds = lib.mapAttrs (_: c: if c ? expect then "expect" else if c ? failsAssertion then "assertion" else "eval") cases.cases;
  failText = lib.mapAttrs (_: c: c.failsAssertion or c.failsEval or null) cases.cases;
  # NixOS tests: node names and the test script as the driver would run it
  tests = lib.mapAttrs (_: t: {
    nodes = lib.attrNames t.config.nodes;
    testScript = t.config.testScript;
  }) (lib.filterAttrs (n: _: !(lib.hasPrefix "eval-" n) && n != "package") checks);
  selftest = import ./nixos-options-selftest.nix { inherit lib; };
}
