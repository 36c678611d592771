# The Blixard NixOS module: `import ./modules { microvm = <microvm.nix flake or null>; }`.
# Options: ./options.nix. Assertions: ./asserts.nix. Pure helpers: ../nix/lib.nix.
{ microvm ? null }:
{ config, lib, pkgs, utils, ... }:
let
  cfg = config.services.blixard;
  blib = import ../nix/lib.nix;
  settingsFormat = pkgs.formats.toml { };

  # Typed options (services.blixard.vms.* included) + settings, in the daemon's key names.
  daemonConfig = cfg.daemonConfig;
  configFile = settingsFormat.generate "blixard.toml" daemonConfig;

  runArgs = blib.mkRunArgs {
    inherit (cfg) dataDir init;
    inherit configFile;
  };
  # The join ticket, as a systemd credential (see blib.joinTicket).
  ticket = lib.mapNullable blib.joinTicket cfg.joinTicketFile;
  execStart = lib.concatStringsSep " " ([ (utils.escapeSystemdExecArgs ([ (lib.getExe cfg.package) "node" "run" ] ++ runArgs)) ]
    ++ lib.optionals (ticket != null) ticket.args);

  defaultDataDir = cfg.dataDir == "/var/lib/blixard";
  # VM state dirs (typed option or settings); null: DATA_DIR/vms, made by the daemon.
  vmStateDir = daemonConfig.vms.state_dir or null;
  # How the daemon runs VMs, as rendered (`settings` included): each a transient systemd
  # unit (the module's default), or a process of the daemon (crates/host/src/systemd.rs,
  # process.rs).
  systemdVms = (daemonConfig.vms.supervisor or blib.daemonDefaults.vms.supervisor) == "systemd";
  vmStateDirOutside = vmStateDir != null && !(lib.hasPrefix "${cfg.dataDir}/" vmStateDir);
  privateDir = { user = "blixard"; group = "blixard"; mode = "0700"; };
  hd = cfg.tuning.highDensity;
  tp = cfg.thinPool;
  poolDir = "/var/lib/blixard-pool";
  # The pool's data device as a systemd unit, to wait for (null with a backing file).
  poolDevice = lib.mapNullable (d: "${utils.escapeSystemdPath d}.device") tp.device;

  # A declared VM given as a NixOS module: its guest, evaluated with microvm.nix as
  # microvm.nix's own host module does (the host's nixpkgs and package set). The guest is
  # named after the VM (VM names are host names, asserted) and takes the VM's sizes as
  # defaults; what the guest sets wins, and is what the scheduler is told.
  guestOf = name: vm:
    if microvm == null then throw "services.blixard.vms.declared.${name}: `config` needs the module from the Blixard flake (it brings microvm.nix); set `runner` instead"
    else
      import (pkgs.path + "/nixos/lib/eval-config.nix") {
        inherit pkgs;
        system = pkgs.stdenv.hostPlatform.system;
        prefix = [ "services" "blixard" "vms" "declared" name "config" ];
        modules = [
          microvm.nixosModules.microvm
          vm.config
          {
            _file = "${toString ./default.nix} (services.blixard.vms.declared.${name})";
            networking.hostName = lib.mkDefault name;
            microvm.vcpu = lib.mkIf (vm.vcpus != null) (lib.mkDefault vm.vcpus);
            microvm.mem = lib.mkIf (vm.memory != null) (lib.mkDefault vm.memory);
          }
        ];
      };

  # Each declared VM with its runner and sizes resolved: given (`runner`), or from its
  # guest (`config`).
  resolved = lib.mapAttrs (name: vm:
    if vm.config == null then vm
    else
      let guest = (guestOf name vm).config; in
      vm // {
        runner = guest.microvm.declaredRunner;
        vcpus = guest.microvm.vcpu;
        memory = guest.microvm.mem;
      }) cfg.vms.declared;
  declaredVms = blib.mkDeclaredVms resolved;
  # Read by the daemon at start and on SIGHUP (`vms.declared_file`, always set by
  # moduleDaemonConfig): a change reloads it (reloadTriggers), and it reconciles.
  declaredVmsText = builtins.toJSON declaredVms;

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

  # Where /metrics is served, as rendered (null: off), and where a local Prometheus
  # reaches it (a wildcard address on loopback).
  metricsAt = blib.metricsListen daemonConfig;
  metricsTarget =
    let
      port = toString (blib.portOf metricsAt);
      host = lib.removeSuffix ":${port}" metricsAt;
    in
    if host == "0.0.0.0" then "127.0.0.1:${port}"
    else if host == "[::]" then "[::1]:${port}"
    else metricsAt;

  # The daemon's own memory limit (services.blixard.memoryMax; see its description).
  daemonMemoryMax =
    if cfg.memoryMax != null then cfg.memoryMax
    else if systemdVms then "1G"
    else null;
in
{
  # Named, so that NixOS names this file in errors (not <unknown-file>) and imports it once
  # however often it is imported (list options would otherwise get every entry twice).
  _file = ./default.nix;
  key = "blixard/modules/default.nix";
  imports = [ ./options.nix ./asserts.nix ];

  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      # What the daemon is configured with, for the config file, the assertions and tests.
      services.blixard.daemonConfig = blib.moduleDaemonConfig cfg;
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
      # VM runners open /dev/kvm and the vhost devices as members of `kvm`: the VM units'
      # SupplementaryGroups (systemd supervisor), or blixard.service's (process supervisor).
      users.groups.kvm = { };

      # `materialise = "nix"`: the daemon copies signed closures from its own binary cache
      # into the host's store, which the Nix daemon allows only to trusted users (the
      # cluster's cache key is not known when the configuration is built).
      nix.settings.trusted-users = lib.mkIf (cfg.images.materialise == "nix") [ "blixard" ];

      # The data dir and an outside vms.stateDir, when StateDirectory does not make them.
      systemd.tmpfiles.settings."10-blixard" = lib.mkIf (!defaultDataDir || vmStateDirOutside) (
        lib.optionalAttrs (!defaultDataDir) { ${cfg.dataDir}.d = privateDir; }
        // lib.optionalAttrs vmStateDirOutside { ${vmStateDir}.d = privateDir; });

      # The port the daemon binds, as rendered (`settings.listen` wins over `listen`).
      networking.firewall.allowedUDPPorts = lib.mkIf cfg.openFirewall [ (blib.portOf daemonConfig.listen) ];
      # The metrics endpoint (TCP), as rendered, when it is on.
      networking.firewall.allowedTCPPorts = lib.mkIf (cfg.metrics.openFirewall && metricsAt != null) [ (blib.portOf metricsAt) ];

      systemd.services.blixard = {
        description = "Blixard node";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        # The daemon reads its config only at start: a change restarts it (VMs survive the
        # restart, see KillMode). The declared VMs it reads again on SIGHUP: a change that
        # touches only them reloads it, and it replaces the VMs whose spec (closure,
        # sizes, ...) changed, deletes those no longer declared and leaves the rest running.
        restartTriggers = [ configFile ];
        reloadTriggers = [ declaredVmsText ];
        environment.BLIXARD_LOG = lib.mkDefault "info";
        # Importing store paths and `materialise = "nix"` run `nix`; the daemon runs `ip`
        # (iproute2) to make tap interfaces and `kill` (util-linux) on the process group
        # of a hook past its timeout (and, with the process supervisor, of a runner). The
        # systemd supervisor runs `systemd-run` and `systemctl`: the host's systemd, the
        # manager they talk to. Hypervisors come from each runner's own closure.
        path = [ config.nix.package pkgs.util-linux pkgs.iproute2 ]
          ++ lib.optional systemdVms config.systemd.package;
        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = execStart;
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          WatchdogSec = "30s";
          Restart = "on-failure";
          RestartSec = "2s";
          # Exit 8 (bad config, no join ticket on a node that has not joined, or no systemd
          # manager answering the systemd supervisor), 7 (unusable data dir) and 5 (the
          # cluster refused the join ticket) will not fix themselves: the unit stays failed,
          # with the reason in the journal, until the operator acts.
          RestartPreventExitStatus = [ 5 7 8 ];
          # The daemon's own stop bound (`shutdown_timeout_ms`, as rendered) and a margin:
          # systemd's SIGKILL comes only after the daemon has given up by itself.
          TimeoutStopSec = "${toString (blib.stopTimeoutSec daemonConfig)}s";
          # Stop only the daemon's main process. With the systemd supervisor, VMs are units
          # of their own (blixard-vm-*.service), outside this unit's cgroup: restarting or
          # stopping blixard never touches them, and this matters only for what the daemon
          # itself starts (hooks, `nix`). With the process supervisor, VMs are the daemon's
          # children, each in its own process group but in this unit's cgroup, and this is
          # what keeps them: `systemctl restart blixard` (and a `nixos-rebuild switch` that
          # changes the config) leaves them running, and the new daemon re-adopts them from
          # their pid files (systemd logs "Found left-over process" for each; expected). So
          # `systemctl stop blixard` does not stop VMs either (`blixard vm stop` does); at
          # host shutdown, systemd's final SIGTERM/SIGKILL reaches whatever still runs in
          # this cgroup.
          KillMode = "process";
          User = "blixard";
          Group = "blixard";
          StateDirectory = lib.mkIf defaultDataDir "blixard";
          StateDirectoryMode = "0700";
          ReadWritePaths = lib.optional (!defaultDataDir) cfg.dataDir
            ++ lib.optional vmStateDirOutside vmStateDir;

          # The daemon runs as `blixard`, not root, under the control-plane baseline (as
          # nixpkgs' conduit), with these exceptions:
          # - CAP_NET_ADMIN, to make and delete tap interfaces (`ip tuntap add`), and
          #   /dev/net/tun. It is ambient, so hooks (and, with the process supervisor,
          #   runners) get it too. It needs PrivateUsers off: in a private user namespace
          #   the capability would not apply to the host's network namespace.
          # - With the process supervisor only, as runners inherit this unit's sandbox:
          #   /dev/kvm and the vhost devices (PrivateDevices off, an explicit device list
          #   instead), the `kvm` group, unlimited locked memory, MemoryDenyWriteExecute
          #   off (QEMU's TCG, a JIT, cannot run under it), and Delegate: the unit's cgroup
          #   subtree is handed to the daemon (writable, ProtectControlGroups off), which a
          #   non-root process needs for VM cgroups. NOTE: the process supervisor makes VM
          #   cgroups under /sys/fs/cgroup/blixard.slice, outside this subtree, which
          #   `blixard` cannot write; until it can be pointed at its own cgroup, VM limits
          #   (memory.max, cpu.max) are not enforced with it and it logs why.
          # With the systemd supervisor, a VM's exceptions and sandbox are its own unit's
          # (lib.vmUnitProperties, in `vms.unit_properties`), and systemd enforces its
          # limits (MemoryMax, CPUQuota): none of the above is needed here.
          UMask = "0077";
          NoNewPrivileges = true;
          CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
          AmbientCapabilities = [ "CAP_NET_ADMIN" ];
          Delegate = !systemdVms;
          SupplementaryGroups = lib.optional (!systemdVms) "kvm";
          DevicePolicy = "closed";
          DeviceAllow = [ "/dev/net/tun rw" ]
            ++ lib.optionals (!systemdVms) [ "/dev/kvm rw" "/dev/vhost-net rw" ];
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
          ProtectControlGroups = systemdVms;
          ProtectProc = "invisible";
          RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = systemdVms;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
        } // lib.optionalAttrs (ticket != null) ticket.serviceConfig
          // lib.optionalAttrs (!systemdVms) { LimitMEMLOCK = "infinity"; }
          // lib.optionalAttrs (daemonMemoryMax != null) { MemoryMax = daemonMemoryMax; }
          // limits;
      };

      # Declared VMs, for the daemon (blib.declaredVmsFile = /etc/blixard/vms.json).
      environment.etc."blixard/vms.json".text = declaredVmsText;
    }

    # The systemd supervisor: the daemon (user `blixard`) creates, stops and resets the
    # transient units blixard-vm-*.service through systemd's D-Bus API, which asks polkit
    # for anyone but root. The rule (lib.polkitRule) allows exactly those units and verbs.
    (lib.mkIf systemdVms {
      security.polkit.enable = true;
      security.polkit.extraConfig = blib.polkitRule;
    })

    (lib.mkIf hd.enable {
      boot.kernel.sysctl = {
        "kernel.pid_max" = hd.pidMax;
        "kernel.threads-max" = hd.threadsMax;
        "net.ipv4.neigh.default.gc_thresh1" = hd.neighGcThresh1;
        "net.ipv4.neigh.default.gc_thresh2" = hd.neighGcThresh2;
        "net.ipv4.neigh.default.gc_thresh3" = hd.neighGcThresh3;
        "net.ipv4.ip_local_port_range" = hd.localPortRange;
        # The widened range includes the daemon's own ports: keep them for the daemon.
        "net.ipv4.ip_local_reserved_ports" = lib.concatStringsSep "," (blib.daemonPorts daemonConfig);
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
        # VM units are ordered after it (blib.vmUnitProperties); the daemon itself does
        # not use the pool and does not wait for it.
        after = [ "local-fs.target" "systemd-modules-load.service" ] ++ lib.optional (poolDevice != null) poolDevice;
        bindsTo = lib.optional (poolDevice != null) poolDevice;
        # Stopping it removes the pool from under running VMs: a changed setup applies at
        # the next boot (or `systemctl restart blixard-thinpool` with the VMs stopped).
        restartIfChanged = false;
        stopIfChanged = false;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = thinPoolScript;
          ExecStop = thinPoolStop;
        };
      };
    })
    # Monitoring: a local Prometheus scrapes the node and loads the rules; a local
    # Grafana gets the dashboard.
    (lib.mkIf cfg.metrics.prometheus.enable {
      assertions = [{
        assertion = metricsAt != null;
        message = "services.blixard.metrics.prometheus.enable needs the metrics endpoint; metrics.listen is \"off\"";
      }];
      services.prometheus.scrapeConfigs = lib.optional (metricsAt != null) {
        job_name = "blixard";
        static_configs = [{ targets = [ metricsTarget ]; labels.node = config.networking.hostName; }];
      };
      services.prometheus.ruleFiles = [ ../monitoring/rules.yml ];
    })
    (lib.mkIf cfg.metrics.grafana.enable {
      services.grafana.provision.enable = true;
      services.grafana.provision.dashboards.settings.providers = [{
        name = "blixard";
        type = "file";
        # A directory holding only the dashboard (Grafana's file provider reads a folder).
        options.path = builtins.path {
          name = "blixard-dashboards";
          path = ../monitoring;
          filter = p: t: t == "regular" && baseNameOf p == "grafana-dashboard.json";
        };
      }];
    })
  ]);
}
