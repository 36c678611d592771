# Shared by nixos-tests/: a three-node cluster on the test VLAN. node1 starts the
# cluster; node2 and node3 join with a ticket the test script writes to /run/keys (as
# NixOps or colmena would: root-owned, mode 0400, in the 0750 root:keys ramfs). Until it
# is there, their blixard.service fails at boot (exit 8: no ticket), and stays failed
# until the script restarts it; once joined, a node needs the ticket never again.
{ self }:
let
  member = n: { config, pkgs, ... }: {
    imports = [ self.nixosModules.default ];
    virtualisation.memorySize = 1024;
    environment.systemPackages = [ pkgs.jq ];
    services.blixard = {
      enable = true;
      name = n;
      listen = "${config.networking.primaryIPAddress}:7000";
      openFirewall = true;
      init = n == "node1";
      joinTicketFile = if n == "node1" then null else "/run/keys/blixard-ticket";
      labels.zone = n;
      raft = { tickMs = 100; electionTicks = 10; heartbeatTicks = 2; };
      # Rendered into [vms]; the hook admits every VM (drain.nix declares one on node1).
      vms = {
        strategy = "spread";
        hooks = [ (pkgs.writeShellScript "blixard-admit-all" "cat >/dev/null") ];
      };
      # Endpoint ids are generated on first start, so only names are declared here.
      members = {
        node1 = { };
        node2 = { };
        node3 = { };
      };
    };
  };
in
{
  node1 = member "node1";
  node2 = member "node2";
  node3 = member "node3";
}
