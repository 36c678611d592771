# One host of a three-node cluster; `node` ("node1", "node2" or "node3") comes from
# specialArgs (see flake.nix nixosConfigurations). node1 starts the cluster; node2 and
# node3 join with a ticket from `blixard cluster token create` on node1, copied out of
# band to /run/keys/blixard-ticket (never into the Nix store).
{ lib, node, ... }:
let
  addrs = { node1 = "10.0.0.1"; node2 = "10.0.0.2"; node3 = "10.0.0.3"; };
in
{
  boot.loader.grub.device = lib.mkDefault "nodev";
  fileSystems."/" = lib.mkDefault { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
  networking.hostName = node;
  system.stateVersion = "25.11";

  services.blixard = {
    enable = true;
    name = node;
    listen = "${addrs.${node}}:7000";
    openFirewall = true;
    init = node == "node1";
    joinTicketFile = if node == "node1" then null else "/run/keys/blixard-ticket";
    labels = { zone = node; };
    members = lib.mapAttrs (_: ip: { addresses = [ "${ip}:7000" ]; }) addrs;
    tuning.highDensity.enable = true;
    thinPool = {
      enable = true;
      backingFile = "/var/lib/blixard-pool/data.img";
      dataSize = 102400;
    };
  };
}
