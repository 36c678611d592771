# Assertions for services.blixard; messages name the offending node, VM or value.
{ config, lib, ... }:
let
  cfg = config.services.blixard;
  blib = import ../nix/lib.nix;
  rendered = cfg.daemonConfig;
  # The address the daemon binds, as rendered (`settings.listen` wins over `listen`).
  listen = rendered.listen or "0.0.0.0:7000";
in
{
  config = lib.mkIf cfg.enable {
    assertions =
      blib.checkCluster {
        node = "services.blixard (${config.networking.hostName})";
        inherit (cfg) init joinTicketFile members relayUrl;
        inherit listen;
        # as rendered: `settings.raft` wins over `raft`
        raft = {
          tickMs = rendered.raft.tick_ms or null;
          electionTicks = rendered.raft.election_ticks or null;
          heartbeatTicks = rendered.raft.heartbeat_ticks or null;
        };
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
          # lib.polkitRule matches on the unit a request names; systemd passes it for
          # StartTransientUnit (`systemd-run`) only from 257 on.
          assertion = (rendered.vms.supervisor or "process") != "systemd"
            || lib.versionAtLeast (config.systemd.package.version or "0") "257";
          message = "services.blixard.vms.supervisor = \"systemd\" needs systemd 257 or later (this host has ${config.systemd.package.version or "an unknown version"}): older ones do not tell polkit which unit `systemd-run` creates, so the module's rule cannot allow the VM units; use supervisor = \"process\"";
        }
        {
          assertion = !cfg.openFirewall || blib.isSocketAddr listen;
          message = "services.blixard.openFirewall needs a port in listen (${builtins.toJSON listen})";
        }
      ];
  };
}
