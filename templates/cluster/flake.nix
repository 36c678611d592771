{
  description = "A NixOS host running a Blixard node";

  # Point this at where you got Blixard (a git URL or a local path:...).
  inputs.blixard.url = "github:blixard/blixard";
  inputs.nixpkgs.follows = "blixard/nixpkgs";

  outputs = { self, nixpkgs, blixard }: {
    nixosConfigurations.node1 = nixpkgs.lib.nixosSystem {
      system = "x86_64-linux";
      modules = [
        blixard.nixosModules.default
        ./hardware-configuration.nix
        {
          networking.hostName = "node1";
          system.stateVersion = "25.11";
          services.blixard = {
            enable = true;
            # The first node starts the cluster. On the others, drop `init` and set
            # joinTicketFile to a file holding a ticket from `blixard cluster token
            # create`, delivered out of band and never through the Nix store: e.g.
            # "/run/keys/blixard-ticket" (colmena/NixOps keys), or an agenix or sops-nix
            # secret's `path`. See docs/nixos.md.
            init = true;
            listen = "0.0.0.0:7000";
            openFirewall = true;
            labels.zone = "a";
          };
        }
      ];
    };
  };
}
