# services.blixard options. Implementation: ./default.nix; assertions: ./asserts.nix.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption types literalExpression;
  settingsFormat = pkgs.formats.toml { };

  memberModule = { name, ... }: {
    options = {
      name = mkOption {
        type = types.str;
        default = name;
        description = "The member's node name (defaults to the attribute name).";
      };
      endpointId = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "7aa4cdfa310c6c75191e5e5da02a5e9060b272f7e25241c439322823fa9d3840";
        description = "The member's Iroh endpoint id (64 hex characters, as `blixard cluster status` shows it).";
      };
      addresses = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "10.0.0.2:7000" ];
        description = "The member's UDP socket addresses (IP:PORT).";
      };
    };
  };

  vmModule = { name, ... }: {
    options = {
      runner = mkOption {
        type = types.nullOr types.package;
        default = null;
        description = "A microvm.nix runner package (`config.microvm.declaredRunner` of a guest). Set this or `config`.";
      };
      config = mkOption {
        type = types.nullOr types.deferredModule;
        default = null;
        description = "A NixOS module for the guest; built into a runner with microvm.nix. Set this or `runner`.";
      };
      vcpus = mkOption {
        type = types.nullOr (types.ints.between 1 256);
        default = null;
        description = ''
          Virtual CPUs (1–256), as the scheduler counts them. With `config`: the guest's
          default `microvm.vcpu` (what the guest sets wins, and is what the scheduler is
          told; null: microvm.nix's default, 1). With `runner`: must match what the runner
          was built with (null: 1).
        '';
      };
      memory = mkOption {
        type = types.nullOr (types.ints.between 16 4194304);
        default = null;
        description = ''
          Memory in MiB (16 MiB to 4 TiB). With `config`: the guest's default `microvm.mem`
          (the guest's own value wins and is what the scheduler is told; null:
          microvm.nix's default, 512). With `runner`: must match the runner (null: 512).
          Written as `memory_mib`.
        '';
      };
      tenant = mkOption { type = types.nullOr types.str; default = null; description = "The tenant that owns the VM; it must exist (null: the `default` tenant)."; };
      labels = mkOption { type = types.attrsOf types.str; default = { }; description = "Labels of the VM (the daemon adds `blixard.declared-by`)."; };
      constraints = mkOption {
        type = types.attrsOf types.str;
        default = { };
        example = { zone = "a"; };
        description = "Node labels the VM must be placed on.";
      };
      restart = mkOption {
        type = types.enum [ "always" "on-failure" "never" ];
        default = "on-failure";
        description = "What the host does when the runner exits: restart it always, only after a failure, or never.";
      };
      placement = mkOption {
        type = types.enum [ "cluster" "local" ];
        default = "cluster";
        description = ''
          `cluster`: the leader places the VM on any host that fits (its `vms.strategy`,
          `constraints`). `local`: the VM is pinned to this node (the daemon adds the
          constraint `blixard.node=nN`).
        '';
      };
      readyMarker = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "blixard-guest-ready";
        description = "A line the guest prints on its console once ready; null: a running VM counts as ready. Written as `ready_marker`.";
      };
    };
  };
in
{
  options.services.blixard = {
    enable = mkEnableOption "the Blixard node daemon";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../nix/package.nix { };
      defaultText = literalExpression "pkgs.callPackage \"\${blixard}/nix/package.nix\" { }";
      description = "The blixard package (daemon and CLI).";
    };

    dataDir = mkOption {
      type = types.externalPath;
      default = "/var/lib/blixard";
      description = ''
        The node's data dir (raft log, state, keys). When it is the default, systemd's
        StateDirectory creates it with mode 0700.
      '';
    };

    listen = mkOption {
      type = types.str;
      default = "0.0.0.0:7000";
      example = "[::]:7000";
      description = "UDP socket address (IP:PORT) the Iroh endpoint binds. Written as `listen`.";
    };

    name = mkOption {
      type = types.nullOr types.str;
      default = null;
      defaultText = literalExpression "null (the daemon uses the host name)";
      description = "This node's name. Written as `name`.";
    };

    relayUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "An Iroh relay URL; relays are off when null. Written as `relay_url`.";
    };

    labels = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { zone = "a"; rack = "r1"; };
      description = "Placement labels of this node. Written as `[labels]`.";
    };

    capacity = {
      vcpus = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "vCPUs this node offers to VMs; detected when null. Written as `capacity.vcpus`.";
      };
      memoryMib = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Memory (MiB) this node offers to VMs; detected when null. Written as `capacity.memory_mib`.";
      };
    };

    raft = {
      tickMs = mkOption { type = types.nullOr types.ints.positive; default = null; description = "One raft tick in ms (daemon default 100). `raft.tick_ms`."; };
      electionTicks = mkOption { type = types.nullOr types.ints.positive; default = null; description = "Ticks before a follower campaigns (daemon default 10). `raft.election_ticks`."; };
      heartbeatTicks = mkOption { type = types.nullOr types.ints.positive; default = null; description = "Heartbeat interval in ticks (daemon default 2). `raft.heartbeat_ticks`."; };
      snapshotThreshold = mkOption { type = types.nullOr types.ints.positive; default = null; description = "Compact the log past this many entries (daemon default 10000). `raft.snapshot_threshold`."; };
    };

    images = {
      storeDir = mkOption {
        type = types.nullOr types.externalPath;
        default = null;
        description = "Where closures are unpacked with `materialise = \"unpack\"` (daemon default /nix/store). `images.store_dir`.";
      };
      cacheListen = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "127.0.0.1:7380";
        description = "Where the node's Nix binary cache listens (daemon default 127.0.0.1:7380). `images.cache_listen`.";
      };
      cacheSizeMib = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Evict unpinned images least-recently-used beyond this many MiB; null keeps all. `images.cache_size_mib`.";
      };
      materialise = mkOption {
        type = types.enum [ "unpack" "nix" ];
        default = "nix";
        description = ''
          How fetched images reach the host's store. On NixOS the store is Nix's, so the
          default is `nix`: the daemon runs `nix copy --from` its own binary cache (the
          module makes the `blixard` user a trusted Nix user for that). `unpack` writes
          straight into `storeDir`, for hosts without a Nix daemon. `images.materialise`.
        '';
      };
      nixStore = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "With `materialise = \"nix\"`: copy into this store instead of the host's. `images.nix_store`.";
      };
      importPaths = mkOption {
        type = types.nullOr (types.listOf types.externalPath);
        default = null;
        example = [ "/nix/store" "/srv/runners" ];
        description = "Where callers other than this node's admin credential may import images from (daemon default: the Nix store). `images.import_paths`.";
      };
    };

    metrics = {
      listen = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "0.0.0.0:7390";
        description = ''
          Where the node serves `GET /metrics` for Prometheus (daemon default
          127.0.0.1:7390), or `"off"`. `metrics.listen`. docs/monitoring.md lists the metrics.
        '';
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the TCP port of `metrics.listen` in the firewall (for a Prometheus on another host).";
      };
      prometheus.enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Register this node with the local `services.prometheus` (job `blixard`, scraped
          at `metrics.listen`) and load Blixard's alert and recording rules
          (monitoring/rules.yml).
        '';
      };
      grafana.enable = mkOption {
        type = types.bool;
        default = false;
        description = "Provision Blixard's dashboard (monitoring/grafana-dashboard.json) into the local `services.grafana`.";
      };
    };

    telemetry.otlpEndpoint = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "http://127.0.0.1:4318";
      description = ''
        The OTLP/HTTP endpoint (an `http://` URL; spans are posted to its `/v1/traces`) the
        node exports its trace spans to, e.g. a local OpenTelemetry Collector. Unset: the
        daemon's environment (`OTEL_EXPORTER_OTLP_ENDPOINT`) decides, else no traces.
        `telemetry.otlp_endpoint`. docs/monitoring.md describes the spans.
      '';
    };

    requestTimeoutMs = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      description = "How long an API request may take, in ms. Written as `request_timeout_ms`.";
    };

    daemonConfig = mkOption {
      type = types.attrsOf types.anything;
      readOnly = true;
      internal = true;
      description = ''
        The daemon's configuration as the module renders it (typed options, then
        `settings`), in the daemon's key names: what /etc/blixard/blixard.toml holds.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = settingsFormat.type; };
      default = { };
      example = { raft.snapshot_threshold = 50000; };
      description = ''
        Freeform daemon configuration, in the daemon's own key names (see README.md,
        "The daemon"). Merged over the typed options above; rendered to TOML. Unknown keys
        make the daemon refuse to start (exit 8), so a typo is caught at boot.
      '';
    };

    init = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Start a new cluster with this node as its first member (`--init`). Harmless on
        restart: a data dir that already holds the cluster ignores it.
      '';
    };

    joinTicketFile = mkOption {
      type = types.nullOr types.externalPath;
      default = null;
      example = "/run/keys/blixard-join-ticket";
      description = ''
        A file holding a join ticket (`blixard cluster token create`) for a node that has
        not joined yet. An absolute path outside the Nix store (a path literal or a store
        path is refused: the store is world-readable and the ticket is a secret); deliver
        the file out of band: NixOps or colmena `deployment.keys` (/run/keys), agenix
        (`config.age.secrets.<name>.path`), sops-nix (`config.sops.secrets.<name>.path`).
        systemd reads it as root when the unit starts and hands the daemon a private copy
        (the credential `join-ticket`), so the file may be readable by root alone. Once
        joined, the node resumes from its data dir: a missing, empty or used ticket is then
        only noted in the log (after a reboot /run/keys is empty), never an error.
      '';
    };

    members = mkOption {
      type = types.attrsOf (types.submodule memberModule);
      default = { };
      description = ''
        The cluster's expected members. Checked at evaluation (no duplicate names or
        endpoint ids, addresses are IP:PORT), written to /etc/blixard/members.json and named
        in the daemon config (`expected_members`): the daemon then refuses a join from a
        key not listed under that name, even with a valid ticket, and dials each member at
        its addresses here as well as at those in the cluster state. Members still join
        with tickets; the list does not add them.
      '';
    };

    memoryMax = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "512M";
      description = ''
        The daemon's memory cgroup limit (`MemoryMax=` of blixard.service). `null`: 1G with
        the systemd supervisor (VMs are units of their own, limited by their
        `MemoryMax=`), none with the process supervisor (whose runners may run in the
        daemon's cgroup, which a limit would cap too).
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the UDP port of `listen` in the firewall.";
    };

    tuning.highDensity = {
      enable = mkEnableOption "sysctls and limits for hosts running many VMs";
      pidMax = mkOption { type = types.int; default = 4194303; description = "kernel.pid_max."; };
      threadsMax = mkOption { type = types.int; default = 999999999; description = "kernel.threads-max."; };
      neighGcThresh1 = mkOption { type = types.int; default = 1024; description = "net.ipv4.neigh.default.gc_thresh1."; };
      neighGcThresh2 = mkOption { type = types.int; default = 2048; description = "net.ipv4.neigh.default.gc_thresh2."; };
      neighGcThresh3 = mkOption { type = types.int; default = 4096; description = "net.ipv4.neigh.default.gc_thresh3."; };
      localPortRange = mkOption { type = types.str; default = "1024 65535"; description = "net.ipv4.ip_local_port_range."; };
      nofile = mkOption { type = types.int; default = 1048576; description = "Open-file limit (LimitNOFILE of blixard units, and PAM nofile)."; };
      nproc = mkOption { type = types.int; default = 1048576; description = "Process limit (LimitNPROC of blixard units, and PAM nproc)."; };
      defaultTasksMax = mkOption { type = types.str; default = "infinity"; description = "systemd DefaultTasksMax."; };
    };

    thinPool = {
      enable = mkEnableOption ''
        a device-mapper thin pool for VM disks, set up by `blixard-thinpool.service` before
        any VM unit starts (VM units are ordered after it). Blixard itself does not create
        volumes on it yet: it is there for runners and hooks that put guest volumes on thin
        volumes of the pool (`dmsetup message <pool> 0 create_thin N`). A changed setup
        applies at the next boot: the unit is not restarted by `nixos-rebuild switch`,
        as stopping it would remove the pool from under running VMs'';
      name = mkOption { type = types.str; default = "blixard-pool"; description = "Device-mapper name (/dev/mapper/NAME)."; };
      backingFile = mkOption {
        type = types.nullOr types.externalPath;
        default = null;
        example = "/var/lib/blixard-pool/pool.img";
        description = "A sparse file to back the pool through loop devices. Set this or `device`.";
      };
      device = mkOption {
        type = types.nullOr types.externalPath;
        default = null;
        example = "/dev/disk/by-id/nvme-…";
        description = "A block device for the pool data (metadata then lives in a file next to the data dir). Set this or `backingFile`.";
      };
      dataSize = mkOption { type = types.ints.positive; default = 20480; description = "Data size in MiB."; };
      metadataSize = mkOption { type = types.ints.positive; default = 256; description = "Metadata size in MiB (2–16384)."; };
      blockSize = mkOption { type = types.ints.positive; default = 128; description = "dm-thin block size in 512-byte sectors (a multiple of 128)."; };
    };

    # The daemon's `[vms]` section (crates/node/src/config.rs, VmsConfig), plus the
    # declared-VM list under `vms.declared`. null: the daemon's default applies (the
    # supervisor has a default of its own, written out).
    vms = {
      stateDir = mkOption {
        type = types.nullOr types.externalPath;
        default = null;
        defaultText = literalExpression "null (the daemon uses DATA_DIR/vms: /var/lib/blixard/vms)";
        example = "/srv/blixard-vms";
        description = ''
          Per-VM state dirs (console log, `current`/`booted` runner links; the pid file
          with the process supervisor, the unit name and exit code with the systemd one).
          Outside `dataDir`, the module creates it (owned by `blixard`, mode 0700) and
          makes it writable for the unit. `vms.state_dir`.
        '';
      };
      consoleMaxMib = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Keep each VM's console log near this many MiB (daemon default 8). `vms.console_max_mib`.";
      };
      downTimeoutMs = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = ''
          The leader marks a host down after this long without contact and moves its VMs
          (daemon default 30000). Must exceed `fenceTimeoutMs + stopTimeoutMs` plus the
          raft election timeout (`raft.tickMs × raft.electionTicks`); asserted, as the
          daemon refuses the config otherwise. `vms.down_timeout_ms`.
        '';
      };
      fenceTimeoutMs = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "A host without a leader for this long stops its VMs (daemon default 15000). `vms.fence_timeout_ms`.";
      };
      stopTimeoutMs = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "How long a runner gets to shut down (`bin/microvm-shutdown`, else SIGTERM) before SIGKILL (daemon default 10000). `vms.stop_timeout_ms`.";
      };
      strategy = mkOption {
        type = types.nullOr (types.enum [ "bin-pack" "spread" ]);
        default = null;
        description = "Placement strategy, used while this node leads (daemon default `bin-pack`). `vms.strategy`.";
      };
      cpuOvercommitPct = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        example = 200;
        description = "How much of a host's vCPUs may be promised to VMs, in percent (daemon default 100). `vms.cpu_overcommit_pct`.";
      };
      memoryOvercommitPct = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "How much of a host's memory may be promised to VMs, in percent (daemon default 100). `vms.memory_overcommit_pct`.";
      };
      hooks = mkOption {
        type = types.listOf types.path;
        default = [ ];
        example = literalExpression ''[ (pkgs.writeShellScript "blixard-admit" (builtins.readFile ./admit.sh)) ]'';
        description = ''
          Operator hooks: executables the daemon runs before a VM is created, after it
          starts and before it is deleted, with the event (`before_vm_create`,
          `after_vm_start`, `before_vm_delete`) as argument and the VM as JSON on stdin; a
          non-zero exit vetoes, with its stderr as the reason. A hook is typically a
          `pkgs.writeShellScript` (it is then in the Nix store, with what it references).
          Empty: no hooks (the daemon's default). `vms.hooks`.
        '';
      };
      hookTimeoutMs = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "How long one hook may run, in ms (daemon default 5000). `vms.hook_timeout_ms`.";
      };
      supervisor = mkOption {
        type = types.enum [ "process" "systemd" ];
        # Written explicitly: the daemon's own default is "process".
        default = "systemd";
        description = ''
          How this host runs VM runners. `systemd` (the module's default, as microvm.nix's
          `microvm@` units): each VM is a transient unit `blixard-vm-<tenant>\x40<name>.service`,
          created by the daemon with `systemd-run`, outside `blixard.service`: restarting or
          stopping the daemon never touches it. The module then enables polkit with a rule
          letting the `blixard` user manage those units (and no others), and gives them a
          sandbox of their own (`unitProperties`); it needs systemd 257 or later (asserted:
          older ones do not tell polkit which unit `systemd-run` makes). `process` (the
          daemon's default, for hosts without systemd): each
          runner is a child process of the daemon, inside `blixard.service`'s sandbox.
          `vms.supervisor`.
        '';
      };
      unitProperties = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "CPUWeight=50" "Slice=machine.slice" ];
        description = ''
          With `supervisor = "systemd"`: more `Key=value` systemd properties for every VM
          unit (as `systemd-run --property`). The module's own (user `blixard`, group `kvm`,
          device list, locked memory, sandboxing, write access to the state dirs:
          `lib.vmUnitProperties`) come first, so an entry here adds to them or, for a
          single-valued property, overrides it. Each must contain `=` and no newline
          (asserted). `vms.unit_properties` (`settings.vms.unit_properties` replaces the
          whole list, the module's entries included).
        '';
      };

      declared = mkOption {
        type = types.attrsOf (types.submodule vmModule);
        default = { };
        description = ''
          VMs this node declares. The module writes them to /etc/blixard/vms.json and
          points the daemon at it (`vms.declared_file`); at start, the daemon imports each
          runner's closure as an image and creates the missing VMs, replaces those whose
          spec changed and deletes those it declared before that are gone from the list.
          VMs it did not declare (`blixard vm create`) are never touched. A change
          restarts `blixard.service` (the VMs keep running; changed ones are replaced).
        '';
      };
    };
  };
}
