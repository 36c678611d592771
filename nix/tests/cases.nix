# Evaluation tests for nix/lib.nix. Each attribute is compared with expected/NAME.json by
# scripts/nix-check.sh. Pure: no nixpkgs.
let
  lib = import ../lib.nix;
  inherit (lib) mkDaemonConfig moduleDaemonConfig mkRunArgs checkCluster checkNodes checkThinPool checkVms checkVmsConfig failedAssertions mkDeclaredVms polkitRule daemonPorts;

  # Declared VMs as the module passes them (option defaults included), with runners that
  # look like real store paths: a local one with a ready marker, and one the cluster places.
  declaredLocal = {
    web = {
      runner = "/nix/store/1zq4y4qrwbbk4sfz2yc0ipb5ldfbczxv-microvm-web";
      config = null; vcpus = 2; memory = 1024; tenant = null;
      labels = { app = "web"; }; constraints = { };
      restart = "always"; placement = "local"; readyMarker = "web: ready";
    };
    batch = {
      runner = "/nix/store/8h2xrzw1gdq0x7lxaqkw5hbr4s0jl8vc-microvm-batch";
      config = null; vcpus = 1; memory = 256; tenant = null;
      labels = { }; constraints = { zone = "a"; };
      restart = "never"; placement = "cluster"; readyMarker = null;
    };
  };

  # services.blixard.vms.* at their option defaults: the daemon's defaults apply, except
  # for the supervisor (the module's default is "systemd", the daemon's "process").
  vmsDefaults = {
    stateDir = null; consoleMaxMib = null; downTimeoutMs = null; fenceTimeoutMs = null;
    stopTimeoutMs = null; strategy = null; cpuOvercommitPct = null; memoryOvercommitPct = null;
    hooks = [ ]; hookTimeoutMs = null; supervisor = "systemd"; unitProperties = [ ];
  };

  # Every services.blixard.vms.* option set.
  vmsAll = {
    stateDir = "/srv/blixard-vms";
    consoleMaxMib = 16;
    downTimeoutMs = 60000;
    fenceTimeoutMs = 20000;
    stopTimeoutMs = 30000;
    strategy = "spread";
    cpuOvercommitPct = 400;
    memoryOvercommitPct = 120;
    hooks = [ "/nix/store/00000000000000000000000000000000-blixard-admit" "/etc/blixard/hooks/audit" ];
    hookTimeoutMs = 2000;
    supervisor = "systemd";
    # a value may hold `=` and spaces: only the first `=` separates the key
    unitProperties = [ "CPUWeight=50" "Environment=RUST_LOG=info MODE=vm" ];
  };

  # raft 100 ms × 10 ticks = 1000 ms; fence + stop + 1000 must stay below down.
  vmsTiming = down: full // { vms = vmsDefaults // { fenceTimeoutMs = 15000; stopTimeoutMs = 10000; downTimeoutMs = down; }; };

  # What the module passes for a typical node (option defaults included).
  full = {
    listen = "0.0.0.0:7000";
    name = "node1";
    relayUrl = null;
    labels = { zone = "a"; rack = "r1"; };
    capacity = { vcpus = 16; memoryMib = 65536; };
    raft = { tickMs = 100; electionTicks = 10; heartbeatTicks = 2; snapshotThreshold = 10000; };
    requestTimeoutMs = 10000;
    images = { storeDir = null; cacheListen = "127.0.0.1:7380"; cacheSizeMib = 20480; materialise = "nix"; nixStore = null; importPaths = [ "/nix/store" "/srv/runners" ]; };
    vms = vmsDefaults;
    settings = { };
  };

  # The whole services.blixard value as the module sees it (for moduleDaemonConfig):
  # option defaults, except a few values; attributes it must not render are included.
  moduleCfg = {
    enable = true;
    dataDir = "/var/lib/blixard";
    listen = "10.0.0.1:7000";
    name = "node1";
    relayUrl = null;
    labels = { zone = "a"; };
    capacity = { vcpus = null; memoryMib = null; };
    raft = { tickMs = null; electionTicks = null; heartbeatTicks = null; snapshotThreshold = null; };
    images = { storeDir = null; cacheListen = null; cacheSizeMib = null; materialise = "nix"; nixStore = null; importPaths = null; };
    vms = vmsDefaults // {
      strategy = "spread";
      hooks = [ "/nix/store/00000000000000000000000000000000-blixard-admit" ];
      declared.web = { runner = "/nix/store/x"; config = null; vcpus = 1; memory = 512; };
    };
    requestTimeoutMs = null;
    settings = { vms.hook_timeout_ms = 1000; };
    init = true;
    joinTicketFile = null;
    members = { };
    openFirewall = true;
    metrics = { listen = null; openFirewall = false; prometheus.enable = false; grafana.enable = false; };
    telemetry = { otlpEndpoint = null; };
    memoryMax = null;
    thinPool = { enable = false; name = "blixard-pool"; backingFile = null; device = null; dataSize = 20480; metadataSize = 256; blockSize = 128; };
  };

  # services.blixard as the module sees it: with what it renders for the daemon
  withRendered = cfg: cfg // { daemonConfig = moduleDaemonConfig cfg; };

  # nixpkgs' lib functions modules/asserts.nix uses, as stand-ins
  stubAssertsLib = {
    mkIf = cond: content: if cond then content else { };
    hasPrefix = p: s: builtins.substring 0 (builtins.stringLength p) s == p;
    versionAtLeast = a: b: builtins.compareVersions a b >= 0;
  };

  # modules/default.nix evaluated with stand-ins for nixpkgs' lib and pkgs: what the
  # module-unit cases look at. `vms` is merged over moduleCfg's (stateDir outside dataDir).
  moduleUnit = moduleUnitWith { };
  # … with `top` merged over the whole services.blixard value
  moduleUnitWith = top: vms:
    let
      inherit (builtins) concatStringsSep attrNames;
      stubLib = {
        mkIf = cond: content: if cond then content else { };
        mkMerge = xs: xs;
        mkDefault = x: x;
        getExe = p: "${p}/bin/blixard";
        escapeShellArg = x: "'${toString x}'";
        escapeShellArgs = xs: concatStringsSep " " (map stubLib.escapeShellArg xs);
        makeBinPath = xs: concatStringsSep ":" (map (x: "${x}/bin") xs);
        hasPrefix = p: s: builtins.substring 0 (builtins.stringLength p) s == p;
        removeSuffix = suf: str:
          let n = builtins.stringLength str; k = builtins.stringLength suf; in
          if n >= k && builtins.substring (n - k) k str == suf then builtins.substring 0 (n - k) str else str;
        mapAttrs = builtins.mapAttrs;
        mapNullable = f: x: if x == null then null else f x;
        concatStringsSep = builtins.concatStringsSep;
        mapAttrsToList = f: a: map (n: f n a.${n}) (attrNames a);
        optional = c: x: if c then [ x ] else [ ];
        optionals = c: xs: if c then xs else [ ];
        optionalAttrs = c: a: if c then a else { };
        optionalString = c: x: if c then x else "";
      };
      stubPkgs = {
        formats.toml = { }: { generate = name: value: { outPath = "/nix/store/stub-${name}"; inherit value; }; };
        writeShellScript = name: _: "/nix/store/stub-${name}";
        writeText = name: text: { outPath = "/nix/store/stub-${name}"; inherit text; };
        lvm2 = "/nix/store/stub-lvm2";
        util-linux = "/nix/store/stub-util-linux";
        coreutils = "/nix/store/stub-coreutils";
        iproute2 = "/nix/store/stub-iproute2";
        thin-provisioning-tools = "/nix/store/stub-thin-provisioning-tools";
        path = "/nix/store/stub-nixpkgs";
        stdenv.hostPlatform.system = "x86_64-linux";
      };
      cfg = moduleCfg // {
        package = "/nix/store/stub-blixard";
        vms = moduleCfg.vms // { stateDir = "/srv/blixard-vms"; } // vms;
        tuning.highDensity = { enable = false; };
      } // top;
      m = import ../../modules { } {
        lib = stubLib;
        pkgs = stubPkgs;
        # nixpkgs' utils.escapeSystemdExecArgs, for what these cases pass it
        utils.escapeSystemdExecArgs = xs: concatStringsSep " " (map (x: builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON (toString x))) xs);
        config = {
          services.blixard = cfg // { daemonConfig = moduleDaemonConfig cfg; };
          networking.hostName = "node1";
          nix.package = "/nix/store/stub-nix";
          systemd.package = "/nix/store/stub-systemd";
        };
      };
      base = builtins.head m.config;
      unit = base.systemd.services.blixard;
      # what lib.mkMerge got, past the base: the supervisor's part is the only other one
      # with `security` (the high-density and thin-pool parts are off here)
      polkit = builtins.filter (p: p ? security) (builtins.tail m.config);
      monitoring = builtins.filter (p: p ? services) (builtins.tail m.config);
    in
    {
      # The metrics endpoint's firewall port and the monitoring parts (store paths as
      # base names: they change with the files' content).
      metrics = {
        tcpPorts = base.networking.firewall.allowedTCPPorts;
        scrapeConfigs = builtins.concatLists (map (p: p.services.prometheus.scrapeConfigs or [ ]) monitoring);
        ruleFiles = builtins.concatLists (map (p: map baseNameOf (p.services.prometheus.ruleFiles or [ ])) monitoring);
        assertions = builtins.concatLists (map (p: map (a: a.message) (builtins.filter (a: !a.assertion) (p.assertions or [ ]))) monitoring);
        dashboards = builtins.concatLists (map (p: map (d: { inherit (d) name type; path = builtins.substring 44 100 (toString d.options.path); })
          (p.services.grafana.provision.dashboards.settings.providers or [ ])) monitoring);
      };
      inherit (unit) path;
      serviceConfig = {
        inherit (unit.serviceConfig) KillMode User AmbientCapabilities CapabilityBoundingSet Delegate
          SupplementaryGroups DevicePolicy DeviceAllow PrivateDevices PrivateUsers ProtectControlGroups
          MemoryDenyWriteExecute ReadWritePaths ExecStart;
        LimitMEMLOCK = unit.serviceConfig.LimitMEMLOCK or null;
        MemoryMax = unit.serviceConfig.MemoryMax or null;
      };
      restartTriggers = map toString unit.restartTriggers;
      reloadTriggers = unit.reloadTriggers;
      tmpfiles = base.systemd.tmpfiles.settings."10-blixard";
      # no runner links under /var/lib/blixard-vms any more
      tmpfilesRules = base.systemd.tmpfiles.rules or null;
      config = base.environment.etc."blixard/blixard.toml".source.value;
      etc = attrNames base.environment.etc;
      declared = builtins.fromJSON base.environment.etc."blixard/vms.json".text;
      # the only services: the daemon (no blixard-vm@ template; the thin pool is off)
      services = attrNames base.systemd.services;
      polkitEnable = map (p: p.security.polkit.enable) polkit;
      # the rule itself is the polkit-rule case
      polkitRuleIsLib = map (p: p.security.polkit.extraConfig == polkitRule) polkit;
    };

  goodMembers = {
    node1 = { endpointId = "1111111111111111111111111111111111111111111111111111111111111111"; addresses = [ "10.0.0.1:7000" ]; };
    node2 = { endpointId = "2222222222222222222222222222222222222222222222222222222222222222"; addresses = [ "10.0.0.2:7000" "[fd00::2]:7000" ]; };
  };
in
{
  # mkDaemonConfig
  daemon-config-full = mkDaemonConfig full;
  daemon-config-minimal = mkDaemonConfig { listen = "0.0.0.0:7000"; name = null; labels = { }; capacity = { vcpus = null; memoryMib = null; }; raft = { tickMs = null; electionTicks = null; heartbeatTicks = null; snapshotThreshold = null; }; requestTimeoutMs = null; settings = { }; };
  daemon-config-settings-override = mkDaemonConfig (full // {
    settings = { raft.snapshot_threshold = 500; labels.zone = "b"; relay_url = "https://relay.example.org"; capacity.vcpus = null; };
  });
  daemon-config-empty = mkDaemonConfig { };
  # every vms.* option -> its [vms] key
  daemon-config-vms = mkDaemonConfig (full // { vms = vmsAll; });
  # settings win over typed vms options; a settings-only key is kept
  daemon-config-vms-settings = mkDaemonConfig (full // {
    vms = vmsDefaults // { strategy = "spread"; stopTimeoutMs = 5000; };
    settings.vms = { strategy = "bin-pack"; console_max_mib = 4; };
  });
  # what modules/default.nix renders from the option values: a VM is declared, so
  # vms.declared_file points at /etc/blixard/vms.json
  module-daemon-config = moduleDaemonConfig moduleCfg;

  # mkRunArgs
  run-args-init = mkRunArgs { dataDir = "/var/lib/blixard"; configFile = "/etc/blixard/blixard.toml"; init = true; joinTicketFile = null; };
  run-args-join = mkRunArgs { dataDir = "/var/lib/blixard"; configFile = "/etc/blixard/blixard.toml"; init = false; };
  # the join ticket: a systemd credential with an empty fallback, read from its directory
  join-ticket = (import ../lib.nix).joinTicket "/run/keys/blixard-ticket";
  run-args-resume = mkRunArgs { dataDir = "/srv/blixard"; configFile = null; init = false; joinTicketFile = null; };

  # checkCluster: good config has no failures; each bad one names the value.
  check-ok = failedAssertions (checkCluster { node = "node2"; init = false; joinTicketFile = "/run/keys/t"; listen = "[::]:7000"; members = goodMembers; raft = full.raft; });
  check-init-and-join = failedAssertions (checkCluster { node = "node2"; init = true; joinTicketFile = "/run/keys/t"; listen = "0.0.0.0:7000"; });
  check-bad-listen = map (l: failedAssertions (checkCluster { node = "n"; listen = l; })) [ "localhost:7000" "0.0.0.0" "300.0.0.1:7000" "0.0.0.0:70000" "7000" "[::1]:7000" "127.0.0.1:0" ];
  check-dup-members = failedAssertions (checkCluster {
    node = "node3";
    listen = "0.0.0.0:7000";
    members = goodMembers // {
      other = { name = "node1"; endpointId = "2222222222222222222222222222222222222222222222222222222222222222"; addresses = [ "db.example.org:7000" ]; };
      bad = { endpointId = "XYZ"; addresses = [ ]; };
    };
  });
  check-raft = failedAssertions (checkCluster { node = "n"; raft = { tickMs = 0; electionTicks = 2; heartbeatTicks = 2; }; relayUrl = "relay.example.org"; });
  check-nodes = failedAssertions (checkNodes {
    node1 = { init = true; listen = "0.0.0.0:7000"; };
    node2 = { init = true; listen = "0.0.0.0:7000"; };
    node3 = { init = false; joinTicketFile = "/run/keys/t"; listen = "0.0.0.0:7000"; };
  });
  check-nodes-none-init = failedAssertions (checkNodes { a = { joinTicketFile = "/k"; }; });

  # thin pool
  thinpool-ok = failedAssertions (checkThinPool { enable = true; backingFile = "/var/lib/blixard/thinpool.img"; device = null; dataSize = 20480; metadataSize = 256; blockSize = 128; });
  thinpool-bad = failedAssertions (checkThinPool { enable = true; backingFile = "/a"; device = "/dev/sdb"; dataSize = 100; metadataSize = 32768; blockSize = 100; });
  thinpool-disabled = failedAssertions (checkThinPool { enable = false; blockSize = 1; });

  # the [vms] timing rule (and paths), as the daemon's Config::validate has it
  check-vms-config-ok = failedAssertions (checkVmsConfig { node = "n"; config = mkDaemonConfig full; });
  check-vms-config-all = failedAssertions (checkVmsConfig { node = "n"; config = mkDaemonConfig (full // { vms = vmsAll; }); });
  check-vms-config-defaults = failedAssertions (checkVmsConfig { node = "n"; config = { }; });
  # 15000 + 10000 + 2 × 1000 = 27000: 27001 passes, 27000 does not (the rule is strict)
  check-vms-config-boundary = map (down: failedAssertions (checkVmsConfig { node = "n"; config = mkDaemonConfig (vmsTiming down); })) [ 27001 27000 ];
  # a slower raft (2 × 200 ms × 30 ticks = 12000 ms) breaks the daemon's vms defaults; relative paths from settings
  check-vms-config-bad = failedAssertions (checkVmsConfig {
    node = "node1";
    config = mkDaemonConfig (full // {
      raft = full.raft // { tickMs = 200; electionTicks = 30; };
      settings.vms = { state_dir = "vms"; hooks = [ "/ok" "hooks/admit" ]; declared_file = "vms.json"; };
    });
  });
  # the timing set only through settings is checked too
  check-vms-config-settings = failedAssertions (checkVmsConfig { node = "n"; config = mkDaemonConfig (full // { settings.vms.down_timeout_ms = 20000; }); });

  # modules/asserts.nix itself, with a stand-in for the few nixpkgs lib functions it uses:
  # the failing messages for a host whose vms timing (set through settings) is refused and
  # whose declared VM has a restart policy the daemon does not know.
  module-asserts =
    let
      m = import ../../modules/asserts.nix {
        lib = stubAssertsLib;
        config = {
          networking.hostName = "node1";
          systemd.package.version = "258.3";
          services.blixard = withRendered (moduleCfg // {
            settings.vms = { fence_timeout_ms = 25000; };
            vms = moduleCfg.vms // {
              declared.tiny = { runner = "/nix/store/y"; vcpus = 1; memory = 16; restart = "no"; placement = "local"; readyMarker = null; };
              unitProperties = [ "CPUWeight=50" "Nice" "Environment=A=b\nExecStartPre=/bin/sh" ];
            };
          });
        };
      };
    in
    failedAssertions m.config.assertions;

  # the systemd supervisor needs systemd >= 257 (polkit learns the unit of systemd-run's
  # request only from then on): refused on 256, fine on 257, not asked with "process"
  module-asserts-systemd-version = map ({ version, supervisor }:
    let
      m = import ../../modules/asserts.nix {
        lib = stubAssertsLib;
        config = {
          networking.hostName = "node1";
          systemd.package.version = version;
          services.blixard = withRendered (moduleCfg // { vms = moduleCfg.vms // { inherit supervisor; }; });
        };
      };
    in
    failedAssertions m.config.assertions) [
      { version = "256.8"; supervisor = "systemd"; }
      { version = "257"; supervisor = "systemd"; }
      { version = "256.8"; supervisor = "process"; }
    ];

  # modules/default.nix with stand-ins for nixpkgs' lib and pkgs (store paths are fake):
  # the parts of blixard.service that VMs depend on, for a vms.stateDir outside dataDir,
  # the declared-VM file it writes and restarts on, and polkit. With the systemd supervisor
  # (the default) the daemon's unit drops the VM-only exceptions and polkit gets the rule;
  # with "process" the runners inherit the unit, so it keeps them and polkit is left alone.
  module-unit = moduleUnit { };
  module-unit-process = moduleUnit { supervisor = "process"; };
  # the daemon's own memory limit: 1G by default with the systemd supervisor, none with
  # the process supervisor (runners may share its cgroup), or what memoryMax says
  module-unit-memory-max = map (c: (moduleUnitWith c.top c.vms).serviceConfig.MemoryMax) [
    { top = { }; vms = { }; }
    { top = { }; vms = { supervisor = "process"; }; }
    { top = { memoryMax = "512M"; }; vms = { }; }
    { top = { memoryMax = "2G"; }; vms = { supervisor = "process"; }; }
  ];

  # the metrics endpoint: off by default in the firewall and in a local Prometheus; on, its
  # TCP port opens, a local Prometheus scrapes it on loopback (a wildcard listen) with the
  # rules loaded, and Grafana gets the dashboard; "off" with Prometheus asked is an error
  module-metrics = map (m: (moduleUnitWith { metrics = moduleCfg.metrics // m; } { }).metrics) [
    { }
    { listen = "0.0.0.0:9390"; openFirewall = true; prometheus.enable = true; grafana.enable = true; }
    { listen = "off"; openFirewall = true; prometheus.enable = true; }
  ];
  # [metrics] listen, and the ports the daemon must have reserved
  daemon-config-metrics = mkDaemonConfig (full // { metrics.listen = "off"; });
  daemon-ports-metrics = map daemonPorts [
    { }
    { metrics.listen = "off"; }
    { listen = "0.0.0.0:7000"; metrics.listen = "10.0.0.1:9390"; }
  ];

  # [telemetry] otlp_endpoint, from the option (as the module renders it) or left to the
  # daemon's environment when unset
  daemon-config-telemetry = mkDaemonConfig (full // { telemetry.otlpEndpoint = "http://127.0.0.1:4318"; });
  module-telemetry = map (t: (moduleDaemonConfig (moduleCfg // { telemetry = t; })).telemetry or null) [
    { otlpEndpoint = null; }
    { otlpEndpoint = "http://collector.internal:4318"; }
  ];
  # a trace endpoint the daemon cannot use is refused by check-config
  sample-invalid-telemetry = mkDaemonConfig (full // { telemetry.otlpEndpoint = "https://collector:4318"; });

  # the polkit rule (security.polkit.extraConfig); scripts/nix-check.sh also runs it in
  # node against a stub polkit
  polkit-rule = polkitRule;

  # vms.supervisor and vms.unit_properties as moduleDaemonConfig renders them
  # - the systemd supervisor: the module's VM sandbox (state dir outside dataDir, limits
  #   from tuning.highDensity), then the option's entries
  module-daemon-config-unit-properties = moduleDaemonConfig (moduleCfg // {
    vms = moduleCfg.vms // { stateDir = "/srv/blixard-vms"; unitProperties = [ "CPUWeight=50" "Environment=A=b c" ]; };
    tuning.highDensity = { enable = true; nofile = 1048576; nproc = 524288; };
  });
  # - the process supervisor: no module entries (the daemon ignores the list then)
  module-daemon-config-process = moduleDaemonConfig (moduleCfg // {
    vms = moduleCfg.vms // { supervisor = "process"; unitProperties = [ "CPUWeight=50" ]; };
  });
  # - settings win: a supervisor set there decides (no module entries for "process"), and
  #   settings.vms.unit_properties replaces the whole list
  module-unit-properties-settings = map (settings: (moduleDaemonConfig (moduleCfg // { inherit settings; })).vms) [
    { vms.supervisor = "process"; }
    { vms.unit_properties = [ "Nice=5" ]; }
  ];
  # unit properties the daemon would refuse (no `=`, a newline) fail in Nix too
  check-vms-config-unit-properties = failedAssertions (checkVmsConfig {
    node = "n";
    config = mkDaemonConfig (full // { vms = vmsDefaults // { unitProperties = [ "Nice=5" "Nice" "A=b\nExecStartPre=/bin/sh" ]; }; });
  });

  # declared VMs -> the list the daemon reads (vms.declared_file), exact keys
  declared-vms = mkDeclaredVms {
    web = { runner = "/nix/store/00000000000000000000000000000000-microvm-web"; vcpus = 2; memory = 1024; tenant = "acme"; labels = { app = "web"; }; constraints = { zone = "a"; }; restart = "always"; placement = "cluster"; readyMarker = null; };
    # `config` VMs reach mkDeclaredVms with the runner the module built
    db = { runner = "/nix/store/11111111111111111111111111111111-microvm-db"; config = { }; vcpus = 4; memory = 4096; tenant = null; labels = { }; constraints = { }; restart = "on-failure"; placement = "cluster"; readyMarker = null; };
  };
  # a local VM with a ready marker; fed to `blixard node check-config` by scripts/nix-check.sh
  declared-vms-local = mkDeclaredVms declaredLocal;
  # what an entry holds when only the runner is given (the options' defaults)
  declared-vms-defaults = mkDeclaredVms { tiny = { runner = "/nix/store/22222222222222222222222222222222-microvm-tiny"; }; };
  # a VM without a runner cannot be rendered (the module builds `config` ones first)
  declared-vms-no-runner = (builtins.tryEval (builtins.deepSeq (mkDeclaredVms { db = { config = { }; }; }) true)).success;
  # bad declared files for check-config (scripts/nix-check.sh): the daemon must refuse
  # them (exit 8) naming the VM. Neither can come from the module (attribute names are
  # unique; restart is an enum and asserted), so they are made from a good list.
  declared-vms-bad-duplicate = let l = mkDeclaredVms declaredLocal; in l ++ [ (builtins.elemAt l 1) ];
  declared-vms-bad-restart = map (v: if v.name == "web" then v // { restart = "no"; } else v) (mkDeclaredVms declaredLocal);

  # checkVms: the daemon's limits at their boundaries pass
  vms-ok = failedAssertions (checkVms (declaredLocal // {
    "a-b-c-1" = { runner = "/nix/store/x"; vcpus = 256; memory = 16; tenant = "acme-2"; readyMarker = "login:"; };
    "b12345678901234567890123456789012345678901234567890123456789012" = { runner = "/nix/store/y"; vcpus = 1; memory = 4194304; };
    "0web" = { runner = "/nix/store/y"; vcpus = null; memory = null; };
    built = { config = { }; };
  }));
  # every rule the daemon has for a declared VM, broken once; each message names the VM
  vms-bad = failedAssertions (checkVms {
    both = { runner = "/nix/store/x"; config = { }; vcpus = 1; memory = 512; };
    neither = { };
    relative = { runner = "result/bin"; };
    tiny = { runner = "/nix/store/y"; vcpus = 0; memory = 15; };
    huge = { runner = "/nix/store/y"; vcpus = 257; memory = 4194305; };
    Web = { runner = "/nix/store/y"; };
    "-web" = { runner = "/nix/store/y"; };
    # names a host name cannot have: a guest built from `config` is named after its VM
    "web.prod" = { runner = "/nix/store/y"; };
    "web_1" = { runner = "/nix/store/y"; };
    "web-" = { runner = "/nix/store/y"; };
    "b123456789012345678901234567890123456789012345678901234567890123" = { runner = "/nix/store/y"; };
    "a1234567890123456789012345678901234567890123456789012345678901234" = { runner = "/nix/store/y"; };
    policy = { runner = "/nix/store/y"; restart = "no"; placement = "spread"; };
    owner = { runner = "/nix/store/y"; tenant = "Acme"; };
    reserved = { runner = "/nix/store/y"; labels."blixard.declared-by" = "n1"; constraints."blixard.node" = "n2"; };
    marker-empty = { runner = "/nix/store/y"; readyMarker = ""; };
    marker-lines = { runner = "/nix/store/y"; readyMarker = "ready\nnow"; };
  });

  # vms.declared_file: always set by moduleDaemonConfig (the file may be an empty list); settings win
  module-daemon-config-no-vms = moduleDaemonConfig (moduleCfg // { vms = moduleCfg.vms // { declared = { }; }; });
  declared-file-settings = (moduleDaemonConfig (moduleCfg // { settings.vms.declared_file = "/srv/blixard/vms.json"; })).vms;
  # what modules/default.nix writes to /etc/blixard/vms.json for moduleCfg (scripts/nix-check.sh
  # feeds it, with module-daemon-config, to check-config)
  module-declared-vms = mkDeclaredVms moduleCfg.vms.declared;
  declared-vms-none = mkDeclaredVms { };
  # declared membership: the daemon is pointed at /etc/blixard/members.json (only when set)
  members-file = map (m: (moduleDaemonConfig (moduleCfg // { members = m; })).expected_members or null) [ { } goodMembers ];

  # flake.lock matches shared pins (shape of a version 7 lock, one nixpkgs node).
  flake-lock =
    let l = builtins.fromJSON (builtins.readFile ../../flake.lock); in {
      inherit (l) version root;
      nodes = builtins.attrNames l.nodes;
      root-inputs = l.nodes.root.inputs;
      microvm-inputs = l.nodes.microvm.inputs;
      revs = builtins.mapAttrs (_: n: n.locked.rev) (removeAttrs l.nodes [ "root" ]);
      nars = builtins.mapAttrs (_: n: n.locked.narHash) (removeAttrs l.nodes [ "root" ]);
      spectrum-flake = l.nodes.spectrum.flake;
    };

  # Samples fed to `blixard node check-config` by scripts/nix-check.sh.
  sample-valid = mkDaemonConfig full;
  sample-invalid = mkDaemonConfig (full // { settings = { raft.election_ticks = 1; }; });
  # the [vms] timing boundary: the daemon agrees with checkVmsConfig (check-vms-config-boundary)
  sample-valid-vms-boundary = mkDaemonConfig (vmsTiming 27001);
  sample-invalid-vms-timing = mkDaemonConfig (vmsTiming 27000);
  # the daemon wants an absolute vms.declared_file (checkVmsConfig asserts it too)
  sample-invalid-declared-file = mkDaemonConfig (full // { settings.vms.declared_file = "vms.json"; });
  # a unit property without `=` (checkVmsConfig refuses it too: check-vms-config-unit-properties)
  sample-invalid-unit-properties = mkDaemonConfig (full // { vms = vmsDefaults // { unitProperties = [ "CPUWeight=50" "Nice" ]; }; });
}
