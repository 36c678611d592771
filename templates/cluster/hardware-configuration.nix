# Replace with the output of `nixos-generate-config --show-hardware-config`.
{ lib, ... }:
{
  boot.loader.grub.device = lib.mkDefault "nodev";
  fileSystems."/" = lib.mkDefault { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
}
