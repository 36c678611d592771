# Assertions for services.blixard; messages name the offending node, VM or value.
{ config, lib, ... }:
let
  cfg = config.services.blixard;
  blib = import ../nix/lib.nix;
  rendered = blib.moduleDaemonConfig cfg;
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
      # The daemon's [vms] rules (timing, paths, unit properties), on the config as
      # rendered (settings included).
      ++ blib.checkVmsConfig {
        node = "services.blixard (${config.networking.hostName})";
        config = rendered;
      }
      ++ [
        {
          assertion = cfg.joinTicketFile == null || !(lib.hasPrefix builtins.storeDir cfg.joinTicketFile);
          message = "services.blixard.joinTicketFile = ${builtins.toJSON cfg.joinTicketFile} is in the Nix store, which is world-readable; deliver the ticket out of band";
        }
        {
          # lib.polkitRule matches on the unit a request names; systemd passes it for
          # StartTransientUnit (`systemd-run`) only from 257 on.
          assertion = (rendered.vms.supervisor or "process") != "systemd"
            || lib.versionAtLeast (config.systemd.package.version or "0") "257";
          message = "services.blixard.vms.supervisor = \"systemd\" needs systemd 257 or later (this host has ${config.systemd.package.version or "an unknown version"}): older ones do not tell polkit which unit `systemd-run` creates, so the module's rule cannot allow the VM units; use supervisor = \"process\"";
        }
        {
          assertion = !cfg.openFirewall || blib.isSocketAddr cfg.listen;
          message = "services.blixard.openFirewall needs a port in listen (${builtins.toJSON cfg.listen})";
        }
      ];
  };
}
