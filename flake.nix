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

      # The NixOS tests; they need KVM to run (`nix build .#checks.x86_64-linux.cluster`).
      tests = lib.mapAttrs (_: file: pkgs.testers.runNixOSTest (import file { inherit self; })) {
        cluster = ./nixos-tests/cluster.nix;
        drain = ./nixos-tests/drain.nix;
        upgrade = ./nixos-tests/upgrade.nix;
      };

      # The template's hosts, with this flake as its `blixard` input.
      template = ((import ./templates/cluster/flake.nix).outputs {
        self = { };
        inherit nixpkgs;
        blixard = self;
      }).nixosConfigurations;
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

      # `nix flake check --no-build` evaluates every host, the template, every NixOS test's
      # nodes and the module's case table (the eval-* checks: nix/tests/eval/flake-checks.nix);
      # `nix flake check` also builds the package and runs the NixOS tests.
      checks.${system} = { package = blixard; } // tests
        // import ./nix/tests/eval/flake-checks.nix {
          inherit lib pkgs module tests template;
          inherit (lib) nixosSystem;
          hosts = self.nixosConfigurations;
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
