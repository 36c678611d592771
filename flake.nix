{
  description = "Blixard: a microVM cluster (one binary: daemon + CLI), with a NixOS module";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    microvm = {
      url = "github:microvm-nix/microvm.nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, microvm }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      inherit (nixpkgs) lib;
      blixardLib = import ./nix/lib.nix;

      blixard = pkgs.callPackage ./nix/package.nix { };

      module = import ./modules { inherit microvm; };

      nixosTest = file: pkgs.testers.runNixOSTest (import file { inherit self; });
    in
    {
      lib = blixardLib;

      packages.${system} = {
        inherit blixard;
        default = blixard;
      };

      nixosModules = {
        blixard = module;
        default = module;
      };

      # The NixOS tests need KVM and nixpkgs; they are not run by scripts/nix-check.sh.
      checks.${system} = {
        package = blixard;
        cluster = nixosTest ./nixos-tests/cluster.nix;
        drain = nixosTest ./nixos-tests/drain.nix;
      };

      nixosConfigurations = {
        dev = nixpkgs.lib.nixosSystem {
          inherit system;
          modules = [ self.nixosModules.default ./hosts/dev.nix ];
        };
      } // lib.genAttrs [ "node1" "node2" "node3" ] (node: nixpkgs.lib.nixosSystem {
        inherit system;
        specialArgs = { inherit node; };
        modules = [ self.nixosModules.default ./hosts/cluster.nix ];
      });

      devShells.${system}.default = pkgs.mkShell {
        packages = with pkgs; [ cargo rustc clippy rustfmt cargo-nextest qemu nix iproute2 ];
      };

      templates.default = {
        path = ./templates/cluster;
        description = "A NixOS host running a Blixard node";
      };
    };
}
