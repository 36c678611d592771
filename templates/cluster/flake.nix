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
            # joinTicketFile = "/run/keys/blixard-ticket" (a ticket from
            # `blixard cluster token create`, copied out of band).
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
