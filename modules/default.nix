# The Blixard NixOS module: `import ./modules { microvm = <microvm.nix flake or null>; }`.
# Options: ./options.nix. Assertions: ./asserts.nix. Pure helpers: ../nix/lib.nix.
{ microvm ? null }:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.blixard;
  blib = import ../nix/lib.nix;
  settingsFormat = pkgs.formats.toml { };

  daemonConfig = blib.mkDaemonConfig {
    inherit (cfg) listen name relayUrl labels requestTimeoutMs;
    capacity = { inherit (cfg.capacity) vcpus memoryMib; };
    raft = { inherit (cfg.raft) tickMs electionTicks heartbeatTicks snapshotThreshold; };
    images = { inherit (cfg.images) storeDir cacheListen cacheSizeMib materialise nixStore importPaths; };
    settings = cfg.settings;
  };
  configFile = settingsFormat.generate "blixard.toml" daemonConfig;

  runArgs = blib.mkRunArgs {
    inherit (cfg) dataDir init joinTicketFile;
    inherit configFile;
  };

  defaultDataDir = cfg.dataDir == "/var/lib/blixard";
  hd = cfg.tuning.highDensity;
  tp = cfg.thinPool;
  poolDir = "/var/lib/blixard-pool";

  # A declared VM's runner: given, or built from its NixOS module with microvm.nix.
  runnerOf = name: vm:
    if vm.runner != null then vm.runner
    else if microvm == null then throw "services.blixard.vms.${name}: `config` needs the module from the Blixard flake (it brings microvm.nix); set `runner` instead"
    else
      (import (pkgs.path + "/nixos/lib/eval-config.nix") {
        system = pkgs.stdenv.hostPlatform.system;
        modules = [
          microvm.nixosModules.microvm
          vm.config
          {
            networking.hostName = lib.mkDefault name;
            microvm.vcpu = vm.vcpus;
            microvm.mem = vm.memory;
          }
        ];
      }).config.microvm.declaredRunner;

  declaredVms = blib.mkDeclaredVms (lib.mapAttrs (name: vm: vm // { runner = runnerOf name vm; }) cfg.vms);

  thinPoolScript = pkgs.writeShellScript "blixard-thinpool-setup" ''
    set -euo pipefail
    PATH=${lib.makeBinPath [ pkgs.lvm2 pkgs.util-linux pkgs.coreutils ]}
    if dmsetup status ${lib.escapeShellArg tp.name} >/dev/null 2>&1; then
      exit 0
    fi
    mkdir -p ${poolDir}
    chmod 0700 ${poolDir}
    ${if tp.backingFile != null then ''
      [ -e ${lib.escapeShellArg tp.backingFile} ] || truncate -s ${toString tp.dataSize}M ${lib.escapeShellArg tp.backingFile}
      data=$(losetup --find --show ${lib.escapeShellArg tp.backingFile})
    '' else ''
      data=${lib.escapeShellArg (toString tp.device)}
    ''}
    # A new sparse metadata file reads as zeroes, which dm-thin formats on first use.
    [ -e ${poolDir}/metadata.img ] || truncate -s ${toString tp.metadataSize}M ${poolDir}/metadata.img
    meta=$(losetup --find --show ${poolDir}/metadata.img)
    sectors=$(blockdev --getsz "$data")
    dmsetup create ${lib.escapeShellArg tp.name} \
      --table "0 $sectors thin-pool $meta $data ${toString tp.blockSize} 32768 1 skip_block_zeroing"
  '';

  thinPoolStop = pkgs.writeShellScript "blixard-thinpool-teardown" ''
    PATH=${lib.makeBinPath [ pkgs.lvm2 pkgs.util-linux pkgs.coreutils ]}
    dmsetup remove ${lib.escapeShellArg tp.name} || true
    for f in ${lib.optionalString (tp.backingFile != null) (lib.escapeShellArg tp.backingFile)} ${poolDir}/metadata.img; do
      for l in $(losetup -j "$f" -O NAME -n); do losetup -d "$l" || true; done
    done
  '';

  limits = lib.optionalAttrs hd.enable {
    LimitNOFILE = hd.nofile;
    LimitNPROC = hd.nproc;
  };
in
{
  imports = [ ./options.nix ./asserts.nix ];

  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      environment.systemPackages = [ cfg.package ];
      # The CLI finds the local node (node.json, admin.key) through the data dir.
      environment.variables.BLIXARD_DATA_DIR = cfg.dataDir;
      environment.etc."blixard/blixard.toml".source = configFile;
      environment.etc."blixard/members.json".text = builtins.toJSON (lib.mapAttrs (_: m: { inherit (m) name endpointId addresses; }) cfg.members);

      users.users.blixard = {
        isSystemUser = true;
        group = "blixard";
        home = cfg.dataDir;
      };
      users.groups.blixard = { };

      # `materialise = "nix"`: the daemon copies signed closures from its own binary cache
      # into the host's store, which the Nix daemon allows only to trusted users (the
      # cluster's cache key is not known when the configuration is built).
      nix.settings.trusted-users = lib.mkIf (cfg.images.materialise == "nix") [ "blixard" ];

      systemd.tmpfiles.settings."10-blixard" = lib.mkIf (!defaultDataDir) {
        ${cfg.dataDir}.d = { user = "blixard"; group = "blixard"; mode = "0700"; };
      };

      networking.firewall.allowedUDPPorts = lib.mkIf cfg.openFirewall [ (blib.portOf cfg.listen) ];

      systemd.services.blixard = {
        description = "Blixard node";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ] ++ lib.optional tp.enable "blixard-thinpool.service";
        requires = lib.optional tp.enable "blixard-thinpool.service";
        restartTriggers = [ configFile ];
        environment.BLIXARD_LOG = lib.mkDefault "info";
        # Importing store paths and `materialise = "nix"` run `nix`.
        path = [ config.nix.package ];
        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = "${lib.getExe cfg.package} node run ${lib.escapeShellArgs runArgs}";
          WatchdogSec = "30s";
          Restart = "on-failure";
          RestartSec = "2s";
          # Exit 8 (bad config) and 7 (unusable data dir) will not fix themselves.
          RestartPreventExitStatus = [ 7 8 ];
          TimeoutStopSec = "30s";
          User = "blixard";
          Group = "blixard";
          StateDirectory = lib.mkIf defaultDataDir "blixard";
          StateDirectoryMode = "0700";
          ReadWritePaths = lib.mkIf (!defaultDataDir) [ cfg.dataDir ];

          # Hardening baseline (as nixpkgs' conduit).
          UMask = "0077";
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          PrivateUsers = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectProc = "invisible";
          RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
        } // limits;
      };

      # Declared VMs: written for inspection; the daemon does not read this file yet.
      environment.etc."blixard/vms.json".text = builtins.toJSON declaredVms;
      systemd.tmpfiles.rules = lib.mapAttrsToList
        (name: vm: "L+ /var/lib/blixard-vms/${name}/runner - - - - ${runnerOf name vm}")
        cfg.vms;

      # One VM per instance, run from its microvm.nix runner (bin/microvm-run and
      # bin/microvm-shutdown, the microvm.nix host/runner contract). Nothing starts these
      # yet: the daemon has no VM feature.
      systemd.services."blixard-vm@" = {
        description = "Blixard VM %i";
        after = [ "network.target" ] ++ lib.optional tp.enable "blixard-thinpool.service";
        serviceConfig = {
          Type = "simple";
          WorkingDirectory = "/var/lib/blixard-vms/%i";
          ExecStart = "/var/lib/blixard-vms/%i/runner/bin/microvm-run";
          ExecStop = "/var/lib/blixard-vms/%i/runner/bin/microvm-shutdown";
          Restart = "on-failure";
          TimeoutStopSec = "150s";
          # Only the exceptions a VM needs: /dev/kvm, tap devices, locked memory.
          DeviceAllow = [ "/dev/kvm rw" "/dev/net/tun rw" "/dev/vhost-net rw" ];
          DevicePolicy = "closed";
          LimitMEMLOCK = "infinity";
          ProtectSystem = "strict";
          ReadWritePaths = [ "/var/lib/blixard-vms/%i" ];
          ProtectHome = true;
          PrivateTmp = true;
          NoNewPrivileges = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          RestrictRealtime = true;
          LockPersonality = true;
          SystemCallArchitectures = "native";
        } // limits;
      };
    }

    (lib.mkIf hd.enable {
      boot.kernel.sysctl = {
        "kernel.pid_max" = hd.pidMax;
        "kernel.threads-max" = hd.threadsMax;
        "net.ipv4.neigh.default.gc_thresh1" = hd.neighGcThresh1;
        "net.ipv4.neigh.default.gc_thresh2" = hd.neighGcThresh2;
        "net.ipv4.neigh.default.gc_thresh3" = hd.neighGcThresh3;
        "net.ipv4.ip_local_port_range" = hd.localPortRange;
      };
      security.pam.loginLimits = [
        { domain = "*"; type = "-"; item = "nofile"; value = toString hd.nofile; }
        { domain = "*"; type = "-"; item = "nproc"; value = toString hd.nproc; }
      ];
      systemd.settings.Manager.DefaultTasksMax = hd.defaultTasksMax;
    })

    (lib.mkIf tp.enable {
      boot.kernelModules = [ "dm-thin-pool" "loop" ];
      environment.systemPackages = [ pkgs.lvm2 pkgs.thin-provisioning-tools ];
      systemd.services.blixard-thinpool = {
        description = "Blixard device-mapper thin pool";
        wantedBy = [ "multi-user.target" ];
        before = [ "blixard.service" ];
        after = [ "local-fs.target" "systemd-modules-load.service" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = thinPoolScript;
          ExecStop = thinPoolStop;
        };
      };
    })
  ]);
}
