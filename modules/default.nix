# The Blixard NixOS module: `import ./modules { microvm = <microvm.nix flake or null>; }`.
# Options: ./options.nix. Assertions: ./asserts.nix. Pure helpers: ../nix/lib.nix.
{ microvm ? null }:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.blixard;
  blib = import ../nix/lib.nix;
  settingsFormat = pkgs.formats.toml { };

  # Typed options (services.blixard.vms.* included) + settings, in the daemon's key names.
  daemonConfig = blib.moduleDaemonConfig cfg;
  configFile = settingsFormat.generate "blixard.toml" daemonConfig;

  runArgs = blib.mkRunArgs {
    inherit (cfg) dataDir init joinTicketFile;
    inherit configFile;
  };

  defaultDataDir = cfg.dataDir == "/var/lib/blixard";
  # VM state dirs (typed option or settings); null: DATA_DIR/vms, made by the daemon.
  vmStateDir = daemonConfig.vms.state_dir or null;
  vmStateDirOutside = vmStateDir != null && !(lib.hasPrefix "${cfg.dataDir}/" vmStateDir);
  privateDir = { user = "blixard"; group = "blixard"; mode = "0700"; };
  hd = cfg.tuning.highDensity;
  tp = cfg.thinPool;
  poolDir = "/var/lib/blixard-pool";

  # A declared VM's runner: given, or built from its NixOS module with microvm.nix.
  runnerOf = name: vm:
    if vm.runner != null then vm.runner
    else if microvm == null then throw "services.blixard.vms.declared.${name}: `config` needs the module from the Blixard flake (it brings microvm.nix); set `runner` instead"
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

  declaredVms = blib.mkDeclaredVms (lib.mapAttrs (name: vm: vm // { runner = runnerOf name vm; }) cfg.vms.declared);
  # Read by the daemon at start (`vms.declared_file`, set by moduleDaemonConfig when a VM
  # is declared): a change restarts it (restartTriggers), and it reconciles.
  declaredVmsJson = pkgs.writeText "blixard-vms.json" (builtins.toJSON declaredVms);

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
      # The unit's SupplementaryGroups (VM runners open /dev/kvm and the vhost devices).
      users.groups.kvm = { };

      # `materialise = "nix"`: the daemon copies signed closures from its own binary cache
      # into the host's store, which the Nix daemon allows only to trusted users (the
      # cluster's cache key is not known when the configuration is built).
      nix.settings.trusted-users = lib.mkIf (cfg.images.materialise == "nix") [ "blixard" ];

      # The data dir and an outside vms.stateDir, when StateDirectory does not make them.
      systemd.tmpfiles.settings."10-blixard" = lib.mkIf (!defaultDataDir || vmStateDirOutside) (
        lib.optionalAttrs (!defaultDataDir) { ${cfg.dataDir}.d = privateDir; }
        // lib.optionalAttrs vmStateDirOutside { ${vmStateDir}.d = privateDir; });

      networking.firewall.allowedUDPPorts = lib.mkIf cfg.openFirewall [ (blib.portOf cfg.listen) ];

      systemd.services.blixard = {
        description = "Blixard node";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ] ++ lib.optional tp.enable "blixard-thinpool.service";
        requires = lib.optional tp.enable "blixard-thinpool.service";
        # The daemon reads both only at start. VMs survive the restart (KillMode below);
        # the new daemon replaces the declared VMs whose spec changed.
        restartTriggers = [ configFile declaredVmsJson ];
        environment.BLIXARD_LOG = lib.mkDefault "info";
        # Importing store paths and `materialise = "nix"` run `nix`. The VM supervisor runs
        # `kill` (util-linux) on a runner's process group and `ip` (iproute2) to make tap
        # interfaces. Hypervisors come from each runner's own closure: nothing else here.
        path = [ config.nix.package pkgs.util-linux pkgs.iproute2 ];
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
          # VMs are the daemon's children, each in its own process group (the process
          # supervisor, crates/host/src/process.rs); there is no unit per VM. Stop only the
          # daemon's main process: `systemctl restart blixard` (and a `nixos-rebuild
          # switch` that changes the config) leaves the VMs running, and the new daemon
          # re-adopts them from their pid files (systemd logs "Found left-over process" for
          # each; expected). So `systemctl stop blixard` does not stop VMs either (`blixard
          # vm stop` does); at host shutdown, systemd's final SIGTERM/SIGKILL reaches
          # whatever still runs in this unit's cgroup.
          KillMode = "process";
          User = "blixard";
          Group = "blixard";
          StateDirectory = lib.mkIf defaultDataDir "blixard";
          StateDirectoryMode = "0700";
          ReadWritePaths = lib.optional (!defaultDataDir) cfg.dataDir
            ++ lib.optional vmStateDirOutside vmStateDir;

          # The daemon runs as `blixard`, not root. Runners inherit everything below, so
          # the control-plane baseline (as nixpkgs' conduit) has the exceptions a VM needs
          # (those of the blixard-vm@ template below):
          # - CAP_NET_ADMIN, to make and delete tap interfaces (`ip tuntap add`) and let
          #   the runner attach to them. It is ambient, so runners and hooks get it too.
          #   It needs PrivateUsers off: in a private user namespace the capability would
          #   not apply to the host's network namespace.
          # - /dev/kvm, /dev/net/tun and the vhost devices (PrivateDevices off, an explicit
          #   device list instead), the `kvm` group, unlimited locked memory.
          # - MemoryDenyWriteExecute off: it is inherited by the hypervisor, and QEMU's TCG
          #   (a JIT) cannot run under it.
          # - Delegate: the unit's cgroup subtree is handed to the daemon (writable,
          #   ProtectControlGroups off), which a non-root process needs for VM cgroups.
          #   NOTE: the daemon makes VM cgroups under /sys/fs/cgroup/blixard.slice, outside
          #   this subtree, which `blixard` cannot write; until it can be pointed at its own
          #   cgroup, VM limits (memory.max, cpu.max) are not enforced here and the
          #   supervisor logs why.
          UMask = "0077";
          NoNewPrivileges = true;
          CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
          AmbientCapabilities = [ "CAP_NET_ADMIN" ];
          Delegate = true;
          SupplementaryGroups = [ "kvm" ];
          DevicePolicy = "closed";
          DeviceAllow = [ "/dev/kvm rw" "/dev/net/tun rw" "/dev/vhost-net rw" ];
          LimitMEMLOCK = "infinity";
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = false;
          PrivateUsers = false;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = false;
          ProtectProc = "invisible";
          RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = false;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
        } // limits;
      };

      # Declared VMs, for the daemon (blib.declaredVmsFile = /etc/blixard/vms.json).
      environment.etc."blixard/vms.json".source = declaredVmsJson;

      # One VM per instance, run from its microvm.nix runner (bin/microvm-run and
      # bin/microvm-shutdown, the microvm.nix host/runner contract). UNUSED: nothing starts
      # these, and nothing creates /var/lib/blixard-vms/NAME/runner any more. The daemon
      # does not use systemd for VMs (declared ones included); it runs them itself, as
      # children in their own process groups (see KillMode above).
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
