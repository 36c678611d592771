# The microvm.nix flake as the Blixard module sees it (`microvm.nixosModules.microvm`), for
# the eval harness: the real guest option declarations and assertions of microvm.nix
# (`src` is a checkout at the pinned revision, never committed here), and a stand-in for
# the runners, which microvm.nix builds with the full package set. A runner stand-in is a
# derivation named as microvm.nix names its runner (`microvm-<hypervisor>-<hostName>`)
# whose store path changes with everything a real runner is built from that the module
# can change: vCPUs, memory, host name, hypervisor and the guest's toplevel.
{ src }:
{
  nixosModules.microvm = { config, lib, pkgs, ... }: {
    imports = [
      "${src}/nixos-modules/microvm/options.nix"
      "${src}/nixos-modules/microvm/asserts.nix"
    ];
    config.microvm.runner = lib.genAttrs (import "${src}/lib" { inherit lib; }).hypervisors (hypervisor:
      (builtins.derivation {
        name = "microvm-${hypervisor}-${config.networking.hostName}";
        system = pkgs.stdenv.hostPlatform.system;
        builder = "/bin/sh";
        args = [ "-c" "exit 1" ];
        inherit hypervisor;
        vcpu = toString config.microvm.vcpu;
        mem = toString config.microvm.mem;
        toplevel = config.system.build.toplevel;
      }) // {
        passthru = { inherit hypervisor; };
        meta.mainProgram = "microvm-run";
      });
  };
}
