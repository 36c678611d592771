# Assertions for services.blixard; messages name the offending node, VM or value.
{ config, lib, ... }:
let
  cfg = config.services.blixard;
  blib = import ../nix/lib.nix;
in
{
  config = lib.mkIf cfg.enable {
    assertions =
      blib.checkCluster {
        node = "services.blixard (${config.networking.hostName})";
        inherit (cfg) init joinTicketFile listen members relayUrl;
        raft = { inherit (cfg.raft) tickMs electionTicks heartbeatTicks; };
      }
      ++ blib.checkThinPool {
        inherit (cfg.thinPool) enable backingFile device dataSize metadataSize blockSize;
      }
      ++ blib.checkVms cfg.vms.declared
      # The daemon's [vms] timing rule, on the config as rendered (settings included).
      ++ blib.checkVmsConfig {
        node = "services.blixard (${config.networking.hostName})";
        config = blib.moduleDaemonConfig cfg;
      }
      ++ [
        {
          assertion = cfg.joinTicketFile == null || !(lib.hasPrefix builtins.storeDir cfg.joinTicketFile);
          message = "services.blixard.joinTicketFile = ${builtins.toJSON cfg.joinTicketFile} is in the Nix store, which is world-readable; deliver the ticket out of band";
        }
        {
          assertion = !cfg.openFirewall || blib.isSocketAddr cfg.listen;
          message = "services.blixard.openFirewall needs a port in listen (${builtins.toJSON cfg.listen})";
        }
      ];
  };
}
