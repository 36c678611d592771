# A stand-in for nixpkgs' NixOS evaluation, over the real nixpkgs `lib`: `nixosSystem`
# runs `lib.evalModules` with the option stand-ins (nixos-options.nix), the module
# arguments NixOS gives (`pkgs`, `utils`, `modulesPath`), `specialisation`, and a
# `system.build.toplevel` that, like NixOS', refuses to exist while an assertion fails,
# prints the warnings, and depends on everything that would end up in the system (so
# evaluating its drvPath forces units, /etc, users, sysctls, ...).
# `runNixOSTest` evaluates a NixOS test's nodes the way nixpkgs' test framework does.
{ lib, pkgs, utils }:
let
  inherit (lib) mkOption types;

  # What `nix-instantiate` shows for failing assertions, as NixOS words it.
  checked = config: value:
    let
      failed = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
      shown = lib.foldr (w: v: lib.warn w v) value config.warnings;
    in
    if failed == [ ] then shown
    else throw "\nFailed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failed}";

  # The parts of a configuration that NixOS turns into files of the system: rendered
  # as JSON into the stand-in toplevel, so every value in them is forced and checked.
  rendered = config: builtins.toJSON {
    services = lib.mapAttrs (_: s: {
      inherit (s) enable wantedBy requiredBy wants requires after before bindsTo partOf
        conflicts path environment serviceConfig unitConfig restartTriggers reloadTriggers
        restartIfChanged reloadIfChanged stopIfChanged description;
    }) config.systemd.services;
    manager = config.systemd.settings.Manager;
    tmpfiles = { inherit (config.systemd.tmpfiles) rules settings; };
    etc = lib.mapAttrs (_: e: { inherit (e) enable target source mode user group; }) config.environment.etc;
    inherit (config.environment) systemPackages variables;
    users = lib.mapAttrs (_: u: { inherit (u) name uid group extraGroups home isSystemUser isNormalUser; }) config.users.users;
    groups = lib.mapAttrs (_: g: { inherit (g) name gid members; }) config.users.groups;
    sysctl = config.boot.kernel.sysctl;
    inherit (config.boot) kernelModules;
    firewall = { inherit (config.networking.firewall) enable allowedUDPPorts allowedTCPPorts; };
    inherit (config.networking) hostName;
    pam = config.security.pam.loginLimits;
    polkit = { inherit (config.security.polkit) enable extraConfig; };
    nix = config.nix.settings;
    fileSystems = config.fileSystems;
    specialisations = lib.mapAttrs (_: s: s.toplevel) config.specialisation;
    stateVersion = config.system.stateVersion;
  };

  core = { config, extendModules, ... }: {
    options.specialisation = mkOption {
      type = types.attrsOf (types.submodule ({ config, ... }: {
        options = {
          configuration = mkOption { type = types.deferredModule; default = { }; description = "Its module."; };
          # NixOS evaluates a specialisation as the parent plus its module.
          toplevel = mkOption {
            type = types.unspecified;
            readOnly = true;
            internal = true;
            default = (extendModules {
              modules = [ config.configuration { specialisation = lib.mkForce { }; } ];
            }).config.system.build.toplevel;
            description = "Its system.";
          };
        };
      }));
      default = { };
      description = "Alternative systems built beside this one (switch-to-configuration of each).";
    };
    config = {
      system.build.toplevel = checked config (builtins.derivation {
        name = "nixos-system-${config.networking.hostName}";
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" "exit 1" ];
        config = rendered config;
      });
    };
  };

  nixosSystem = { modules, specialArgs ? { }, prefix ? [ ], ... }:
    lib.evalModules {
      inherit prefix;
      specialArgs = { modulesPath = "/nonexistent/nixos/modules (the eval harness has no NixOS modules)"; } // specialArgs;
      modules = [
        ./nixos-options.nix
        core
        {
          _module.args = { inherit pkgs utils; };
          nix.package = lib.mkDefault pkgs.nix;
          systemd.package = lib.mkDefault pkgs.systemd;
        }
      ] ++ modules;
    };

  # nixpkgs' testers.runNixOSTest, as far as evaluation goes: each node is a NixOS
  # configuration with the test framework's defaults (host name = node name, an address
  # on VLAN 1, a 1 GiB VM), and `config.testScript` is the script with `nodes` applied.
  # The result has `config` as the real one's passthru does.
  runNixOSTest = test:
    let
      t = if builtins.isFunction test then test { } else test;
      names = lib.attrNames t.nodes;
      nodes = lib.listToAttrs (lib.imap1 (i: name: {
        inherit name;
        value = (nixosSystem {
          modules = [
            t.nodes.${name}
            {
              networking.hostName = lib.mkDefault name;
              networking.primaryIPAddress = "192.168.1.${toString i}";
            }
          ];
        }).config;
      }) names);
      script = if builtins.isFunction t.testScript then t.testScript { inherit nodes; } else t.testScript;
    in
    {
      config = { inherit (t) name; inherit nodes; testScript = script; };
    };
in
{
  inherit nixosSystem runNixOSTest;
}
