# A single-node development host: starts its own cluster.
# Build: nixos-rebuild build --flake .#dev
{ lib, ... }:
{
  boot.loader.grub.device = lib.mkDefault "nodev";
  fileSystems."/" = lib.mkDefault { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
  networking.hostName = "blixard-dev";
  system.stateVersion = "25.11";

  services.blixard = {
    enable = true;
    init = true;
    listen = "127.0.0.1:7000";
    labels.zone = "dev";
    settings.raft.snapshot_threshold = 1000;
  };
}
