# Runs the case table (./cases.nix) with a NixOS evaluator: nixpkgs' `lib.nixosSystem`
# (flake checks) or the harness' stand-in (./default.nix). Every case is evaluated with
# `module` (the flake's nixosModules.default) and a base that NixOS needs to build a
# system at all. The result, per case: { ok = bool; report = [ lines ]; }, where `ok`
# also requires the system's toplevel drvPath to evaluate (expect cases) or not to
# (failing cases).
{ lib, nixosSystem, module }:
let
  cases = import ./cases.nix { inherit lib; };

  base = { lib, ... }: {
    networking.hostName = lib.mkDefault "case";
    system.stateVersion = "25.11";
    boot.loader.grub.device = "nodev";
    fileSystems."/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
  };

  evalCase = modules: nixosSystem {
    system = "x86_64-linux";
    specialArgs.blixard = module;
    modules = [ module base ] ++ modules;
  };

  forced = x: builtins.tryEval (builtins.deepSeq x x);

  run = name: case:
    let
      system = evalCase case.modules;
      toplevel = forced system.config.system.build.toplevel.drvPath;
      failed = map (a: a.message) (lib.filter (a: !a.assertion) system.config.assertions);
      extend = modules: system.extendModules { inherit modules; };
    in
    if case ? expect then
      let
        results = forced (case.expect { inherit (system) config options; inherit extend; });
        wrong = lib.filter (r: r.got != r.want) results.value;
        show = r: "${r.what}: got ${builtins.toJSON r.got}, want ${builtins.toJSON r.want}";
      in
      if !results.success then { ok = false; report = [ "${name}: its expectations did not evaluate" ]; }
      else if !toplevel.success then { ok = false; report = [ "${name}: the system did not evaluate" ] ++ map (m: "  assertion: ${m}") failed; }
      else { ok = wrong == [ ]; report = map (r: "${name}: ${show r}") wrong; }
    else if case ? failsAssertion then
      let
        messages = forced failed;
        hit = messages.success && lib.any (lib.hasInfix case.failsAssertion) messages.value;
      in
      {
        ok = hit && !toplevel.success;
        report = lib.optional (!hit) "${name}: no failing assertion says ${builtins.toJSON case.failsAssertion}${lib.optionalString messages.success "; failing: ${builtins.toJSON messages.value}"}"
          ++ lib.optional toplevel.success "${name}: the system evaluated despite the failing assertion";
      }
    else
      {
        ok = !toplevel.success;
        report = lib.optional toplevel.success "${name}: evaluated, but should fail (${case.failsEval})";
      };
in
{
  inherit cases;
  results = lib.mapAttrs run cases;
  # For the harness, which checks a failing case's message through nix-instantiate's
  # stderr: the value whose evaluation must fail.
  toplevelOf = name: (evalCase cases.${name}.modules).config.system.build.toplevel.drvPath;
}
