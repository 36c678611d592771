# Stand-in for nixpkgs' nixos/lib/eval-config.nix, reached as `pkgs.path + "/nixos/lib/eval-config.nix"`
# when the harness' stand-in `pkgs` is in use: the Blixard module evaluates a declared
# VM's guest (`vms.declared.<name>.config`) through it, as it would with nixpkgs.
{ pkgs, modules, prefix ? [ ], specialArgs ? { }, extraModules ? [ ], system ? null, ... }:
let
  utils = import ../../../utils.nix { inherit (pkgs) lib; };
  nixos = import ../../../nixos.nix { inherit (pkgs) lib; inherit pkgs utils; };
in
nixos.nixosSystem { inherit prefix specialArgs; modules = modules ++ extraModules; }
