# Pure functions behind the Blixard NixOS module. Only builtins: no nixpkgs, no pkgs.
# They are evaluated directly by nix/tests (nix-instantiate --eval --strict --json), so
# what the module renders is tested without nixpkgs.
let
  inherit (builtins)
    attrNames attrValues concatLists concatStringsSep elem filter foldl' genList
    head isAttrs length listToAttrs map match sort toJSON tail tryEval;

  # Drop null values, recursively; also drop attrsets that end up empty.
  dropNulls = a:
    listToAttrs (concatLists (map (k:
      let v = a.${k}; v' = if isAttrs v then dropNulls v else v;
      in if v == null || (isAttrs v' && v' == { }) then [ ] else [{ name = k; value = v'; }])
      (attrNames a)));

  # Recursive merge, right wins (settings override typed options).
  recursiveMerge = l: r:
    l // listToAttrs (map (k: {
      name = k;
      value = if isAttrs (l.${k} or null) && isAttrs r.${k} then recursiveMerge l.${k} r.${k} else r.${k};
    }) (attrNames r));

  get = a: k: a.${k} or null;

  toInt = s: builtins.fromJSON s;

  # Is `s` a socket address the daemon accepts (Rust SocketAddr: an IP, not a host name)?
  isSocketAddr = s:
    let
      v4 = match "([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3}):([0-9]{1,5})" s;
      v6 = match "[[]([0-9a-fA-F:.]+)[]]:([0-9]{1,5})" s;
      portOk = p: toInt p <= 65535;
      octOk = o: toInt o <= 255 && (o == "0" || match "0.*" o == null);
    in
    builtins.isString s && (
      (v4 != null && builtins.all octOk (genList (i: builtins.elemAt v4 i) 4) && portOk (builtins.elemAt v4 4))
      || (v6 != null && match ".*:.*" (head v6) != null && portOk (builtins.elemAt v6 1)));

  portOf = s:
    let m = match ".*:([0-9]+)" s; in if m == null then null else toInt (head m);

  # Values that occur more than once in a list of strings, sorted.
  duplicates = xs:
    let
      counts = foldl' (acc: x: acc // { ${x} = (acc.${x} or 0) + 1; }) { } xs;
    in
    filter (x: counts.${x} > 1) (attrNames counts);

  showList = xs: concatStringsSep ", " (map toJSON xs);

  orDefault = v: d: if v == null then d else v;
in
rec {
  inherit dropNulls recursiveMerge isSocketAddr portOf duplicates;

  # The daemon's defaults for the values the module checks (crates/node/src/config.rs).
  daemonDefaults = {
    shutdown_timeout_ms = 5000;
    raft = { tick_ms = 100; election_ticks = 10; };
    vms = { down_timeout_ms = 30000; fence_timeout_ms = 15000; stop_timeout_ms = 10000; supervisor = "process"; };
  };

  # Module option values -> the daemon's config (crates/node/src/config.rs), exact keys.
  #   { listen, name, relayUrl, labels, capacity = { vcpus, memoryMib };
  #     raft = { tickMs, electionTicks, heartbeatTicks, snapshotThreshold };
  #     images = { storeDir, cacheListen, cacheSizeMib, materialise, nixStore, importPaths };
  #     vms = { stateDir, consoleMaxMib, downTimeoutMs, fenceTimeoutMs, stopTimeoutMs,
  #             strategy, cpuOvercommitPct, memoryOvercommitPct, hooks, hookTimeoutMs,
  #             declaredFile, supervisor, unitProperties };
  #     metrics = { listen }; telemetry = { otlpEndpoint };
  #     requestTimeoutMs, expectedMembers, settings }
  # Every field may be missing or null; nulls are dropped so the daemon's defaults apply
  # (`vms.hooks = [ ]` and `vms.unitProperties = [ ]` too: the daemon's defaults are empty
  # lists). Hooks are left as given, so a Nix path literal is copied to the store when the
  # config is rendered.
  # `settings` is merged last (freeform; it uses the daemon's own snake_case names).
  mkDaemonConfig = cfg:
    let
      cap = cfg.capacity or { };
      raft = cfg.raft or { };
      img = cfg.images or { };
      vms = cfg.vms or { };
      met = cfg.metrics or { };
      tel = cfg.telemetry or { };
      hooks = get vms "hooks";
      unitProperties = get vms "unitProperties";
      typed = dropNulls {
        listen = get cfg "listen";
        expected_members = get cfg "expectedMembers";
        name = get cfg "name";
        relay_url = get cfg "relayUrl";
        labels = cfg.labels or { };
        capacity = {
          vcpus = get cap "vcpus";
          memory_mib = get cap "memoryMib";
        };
        raft = {
          tick_ms = get raft "tickMs";
          election_ticks = get raft "electionTicks";
          heartbeat_ticks = get raft "heartbeatTicks";
          snapshot_threshold = get raft "snapshotThreshold";
        };
        request_timeout_ms = get cfg "requestTimeoutMs";
        metrics = {
          listen = get met "listen";
        };
        telemetry = {
          otlp_endpoint = get tel "otlpEndpoint";
        };
        images = {
          store_dir = get img "storeDir";
          cache_listen = get img "cacheListen";
          cache_size_mib = get img "cacheSizeMib";
          materialise = get img "materialise";
          nix_store = get img "nixStore";
          import_paths = get img "importPaths";
        };
        vms = {
          state_dir = get vms "stateDir";
          console_max_mib = get vms "consoleMaxMib";
          down_timeout_ms = get vms "downTimeoutMs";
          fence_timeout_ms = get vms "fenceTimeoutMs";
          stop_timeout_ms = get vms "stopTimeoutMs";
          strategy = get vms "strategy";
          cpu_overcommit_pct = get vms "cpuOvercommitPct";
          memory_overcommit_pct = get vms "memoryOvercommitPct";
          hooks = if hooks == [ ] then null else hooks;
          hook_timeout_ms = get vms "hookTimeoutMs";
          declared_file = get vms "declaredFile";
          supervisor = get vms "supervisor";
          unit_properties = if unitProperties == [ ] then null else unitProperties;
        };
      };
    in
    recursiveMerge typed (dropNulls (cfg.settings or { }));

  # Where the module writes the declared VMs (modules/default.nix, environment.etc).
  declaredVmsFile = "/etc/blixard/vms.json";

  # The module's `services.blixard` values -> mkDaemonConfig's argument (used by both
  # modules/default.nix and modules/asserts.nix, so the checked config is the rendered one).
  # `vms.declared_file` is always set: the module always writes the file (an empty list when
  # nothing is declared), so removing the last declared VM deletes it too. `vms.supervisor`
  # is always written (the option's default, "systemd", is not the daemon's). With the
  # systemd supervisor (as rendered, `settings` included), `vms.unit_properties` is
  # vmUnitProperties (the exceptions and sandbox of a VM's unit) followed by the option's
  # entries; `settings.vms.unit_properties` replaces the whole list.
  moduleDaemonConfig = cfg:
    let
      args = vmsExtra: {
        inherit (cfg) listen name relayUrl labels requestTimeoutMs settings;
        capacity = { inherit (cfg.capacity) vcpus memoryMib; };
        raft = { inherit (cfg.raft) tickMs electionTicks heartbeatTicks snapshotThreshold; };
        images = { inherit (cfg.images) storeDir cacheListen cacheSizeMib materialise nixStore importPaths; };
        metrics = { listen = (cfg.metrics or { }).listen or null; };
        telemetry = { otlpEndpoint = (cfg.telemetry or { }).otlpEndpoint or null; };
        vms = {
          inherit (cfg.vms) stateDir consoleMaxMib downTimeoutMs fenceTimeoutMs stopTimeoutMs
            strategy cpuOvercommitPct memoryOvercommitPct hooks hookTimeoutMs supervisor;
          declaredFile = declaredVmsFile;
        } // vmsExtra;
        # Declared membership: the daemon refuses joins from keys not listed.
        expectedMembers = if (cfg.members or { }) != { } then membersFile else null;
      };
      # Rendered without unit properties: the supervisor and state dir that take effect.
      first = mkDaemonConfig (args { });
      hd = (cfg.tuning or { }).highDensity or { };
      baseline =
        if (first.vms.supervisor or daemonDefaults.vms.supervisor) == "systemd"
        then vmUnitProperties {
          stateDir = vmsStateDir { inherit (cfg) dataDir; config = first; };
          nofile = if hd.enable or false then hd.nofile else null;
          nproc = if hd.enable or false then hd.nproc else null;
          thinPool = ((cfg.thinPool or { }).enable or false);
        }
        else [ ];
    in
    mkDaemonConfig (args { unitProperties = baseline ++ (cfg.vms.unitProperties or [ ]); });

  # Where the daemon keeps the VM state dirs: `vms.state_dir`, else DATA_DIR/vms.
  #   { dataDir, config = mkDaemonConfig's result }
  vmsStateDir = { dataDir, config }:
    let s = (config.vms or { }).state_dir or null; in
    if s != null then s else "${toString dataDir}/vms";

  # The daemon's user (modules/default.nix) and the prefix of its VM units
  # (crates/host/src/systemd.rs: blixard-vm-<tenant>\x40<name>.service).
  daemonUser = "blixard";
  vmUnitPrefix = "blixard-vm-";

  # The properties the module gives every VM unit (`vms.supervisor = "systemd"`), after the
  # daemon's own (description, MemoryMax, CPUQuota, ExecStop, TimeoutStopSec, KillMode,
  # console) and before the operator's `vms.unitProperties`. A VM unit is not a child of
  # blixard.service and inherits none of its sandbox, so this is the VM's sandbox, with only
  # the exceptions a hypervisor needs: the `kvm` group, /dev/kvm, /dev/net/tun and the
  # vhost devices (net, vsock), unlimited locked memory, and write access to the VM state
  # dirs (disk images, sockets: the runner runs in its state dir). No capabilities: the
  # daemon makes the tap interfaces before it starts the unit, without an owner, so the
  # runner attaches to them without CAP_NET_ADMIN. Before=blixard.service: at shutdown the
  # daemon stops first (it does not restart VMs as they stop), then each VM gets its
  # `bin/microvm-shutdown` (systemd orders stop jobs the reverse of Before=/After=).
  # With the thin pool (services.blixard.thinPool), a VM unit starts after it is set up
  # (After=, Wants=): runners whose volumes live on the pool find it there.
  #   { stateDir, nofile ? null, nproc ? null, thinPool ? false }  (limits from tuning.highDensity)
  vmUnitProperties = { stateDir, nofile ? null, nproc ? null, thinPool ? false }:
    [
      "User=${daemonUser}"
      "Group=${daemonUser}"
      "SupplementaryGroups=kvm"
      "DevicePolicy=closed"
      "DeviceAllow=/dev/kvm rw"
      "DeviceAllow=/dev/net/tun rw"
      "DeviceAllow=/dev/vhost-net rw"
      "DeviceAllow=/dev/vhost-vsock rw"
      "LimitMEMLOCK=infinity"
      "ProtectSystem=strict"
      "ReadWritePaths=${stateDir}"
      "ProtectHome=yes"
      "PrivateTmp=yes"
      "NoNewPrivileges=yes"
      "ProtectKernelModules=yes"
      "ProtectKernelLogs=yes"
      "ProtectControlGroups=yes"
      "RestrictRealtime=yes"
      "LockPersonality=yes"
      "SystemCallArchitectures=native"
      "Before=blixard.service"
    ]
    ++ (if nofile != null then [ "LimitNOFILE=${toString nofile}" ] else [ ])
    ++ (if nproc != null then [ "LimitNPROC=${toString nproc}" ] else [ ])
    ++ (if thinPool then [ "After=${thinPoolUnit}" "Wants=${thinPoolUnit}" ] else [ ]);

  # The unit that sets up services.blixard.thinPool (modules/default.nix).
  thinPoolUnit = "blixard-thinpool.service";

  # The polkit rule (security.polkit.extraConfig) that lets the daemon's user manage its
  # VM units and no other unit: the verbs the systemd supervisor uses (`systemd-run`, i.e.
  # StartTransientUnit: start; `systemctl stop`, `reset-failed`, `set-property`) on units
  # whose name starts with `blixard-vm-`. systemd passes the `unit` and `verb` details for
  # StartTransientUnit only from version 257 on (asserted by the module); earlier ones pass
  # none, so the rule would not match and every VM start would be refused.
  polkitRule = ''
    // Blixard (services.blixard.vms.supervisor = "systemd"): the daemon runs as user
    // "${daemonUser}", not root, and runs each VM as a transient systemd unit,
    // ${vmUnitPrefix}<tenant>\x40<name>.service, which it creates with systemd-run and
    // stops, resets and adjusts with systemctl. This allows exactly that: the action
    // org.freedesktop.systemd1.manage-units on units named ${vmUnitPrefix}*, with the
    // verbs start (StartTransientUnit), stop, reset-failed and set-property. Other
    // requests of "${daemonUser}" fall through to polkit's defaults (an administrator's
    // password: refused for a service). A user who may create transient units can run
    // any command as any user (User= is theirs to set), so "${daemonUser}" is as
    // trusted as root on this host.
    polkit.addRule(function (action, subject) {
      if (action.id != "org.freedesktop.systemd1.manage-units" || subject.user != "${daemonUser}") {
        return polkit.Result.NOT_HANDLED;
      }
      var unit = action.lookup("unit");
      var verb = action.lookup("verb");
      var verbs = ["start", "stop", "reset-failed", "set-property"];
      if (typeof unit == "string" && unit.indexOf("${vmUnitPrefix}") == 0 && verbs.indexOf(verb) >= 0) {
        return polkit.Result.YES;
      }
      return polkit.Result.NOT_HANDLED;
    });
  '';

  # Where the module writes the expected members (modules/default.nix, environment.etc).
  membersFile = "/etc/blixard/members.json";

  # Checks of a rendered daemon config's `[vms]` section (after `settings`; the daemon's
  # defaults where a value is unset), as NixOS `assertions` entries: the timing rule,
  # absolute paths, unit properties as one-line `Key=value`s. Each is the daemon's own
  # (Config::validate). The timing rule: a host cut off from the quorum must have stopped
  # its VMs before the leader, having marked it down, starts them elsewhere.
  #   { node ? "services.blixard", config = mkDaemonConfig's result }
  checkVmsConfig = { node ? "services.blixard", config }:
    let
      r = daemonDefaults.raft // (config.raft or { });
      v = daemonDefaults.vms // (config.vms or { });
      # raft-rs randomises the election timeout up to twice the configured one.
      electionMs = 2 * r.tick_ms * r.election_ticks;
      sum = v.fence_timeout_ms + v.stop_timeout_ms + electionMs;
      stateDir = v.state_dir or null;
      declaredFile = v.declared_file or null;
      hooks = v.hooks or [ ];
      badHooks = filter (h: match "/.*" (toString h) == null) hooks;
      # One `Key=value` each, as `systemd-run --property` takes it (the daemon's rule).
      badProps = filter (p: !(builtins.isString p) || match "[^\n]*=[^\n]*" p == null) (v.unit_properties or [ ]);
    in
    [
      {
        assertion = sum < v.down_timeout_ms;
        message = "${node}: vms.fenceTimeoutMs (${toJSON v.fence_timeout_ms}) + vms.stopTimeoutMs (${toJSON v.stop_timeout_ms}) + the longest election timeout (2 × raft.tickMs ${toJSON r.tick_ms} × raft.electionTicks ${toJSON r.election_ticks} = ${toJSON electionMs}) = ${toJSON sum} ms must be less than vms.downTimeoutMs (${toJSON v.down_timeout_ms}): a host cut off from the quorum must have stopped its VMs before the leader starts them elsewhere (the daemon refuses this config)";
      }
      {
        assertion = stateDir == null || match "/.*" stateDir != null;
        message = "${node}: vms.stateDir = ${toJSON stateDir} is not an absolute path";
      }
      {
        assertion = declaredFile == null || match "/.*" declaredFile != null;
        message = "${node}: vms.declared_file = ${toJSON declaredFile} is not an absolute path";
      }
      {
        assertion = badHooks == [ ];
        message = "${node}: vms.hooks must be absolute paths: ${showList (map toString badHooks)}";
      }
      {
        assertion = badProps == [ ];
        message = "${node}: vms.unitProperties (vms.unit_properties) entries must be one line of Key=value: ${showList badProps}";
      }
    ];

  # The argument list after `blixard node run`, to be escaped for systemd
  # (utils.escapeSystemdExecArgs). The join ticket is not among them: see joinTicket.
  #   { dataDir, configFile, init ? false }
  mkRunArgs = cfg:
    [ "--data-dir" (toString cfg.dataDir) ]
    ++ (if (cfg.configFile or null) != null then [ "--config" (toString cfg.configFile) ] else [ ])
    ++ (if cfg.init or false then [ "--init" ] else [ ]);

  # How `joinTicketFile` reaches the daemon: as the systemd credential `join-ticket`.
  # systemd (PID 1, as root) copies the file into the unit's private credentials dir when
  # the unit starts, so the ticket may be readable by root alone (/run/keys is 0750
  # root:keys on NixOS; agenix and sops-nix make root-owned 0400 files by default), it
  # never enters the Nix store, and only the unit's user can read the copy. LoadCredential=
  # alone would fail the unit when the file is missing (after a reboot /run/keys is
  # empty); the empty SetCredential= of the same name is systemd's documented fallback,
  # so the daemon then finds an empty ticket, which a node that has joined ignores.
  # `arg` goes on the command line unescaped: systemd expands ${CREDENTIALS_DIRECTORY}.
  #   file: an absolute path outside the store
  joinTicket = file: {
    serviceConfig = {
      LoadCredential = "${joinCredential}:${file}";
      SetCredential = "${joinCredential}:";
    };
    args = [ "--join-file" "\${CREDENTIALS_DIRECTORY}/${joinCredential}" ];
  };
  joinCredential = "join-ticket";

  # The local ports the daemon listens on (its UDP `listen`, the binary cache's TCP
  # `images.cache_listen`, the metrics endpoint's TCP `metrics.listen`), from a rendered config: what `net.ipv4.ip_local_reserved_ports`
  # must hold when the ephemeral port range is widened, so that no outgoing connection
  # takes one of them before the daemon binds it.
  # systemd's TimeoutStopSec for a rendered config: the daemon's stop bound, in whole
  # seconds, plus 5.
  # Where a rendered config serves /metrics (the daemon's default when unset), or null
  # when it is "off".
  metricsListen = config:
    let l = (config.metrics or { }).listen or "127.0.0.1:7390";
    in if l == "off" then null else l;

  stopTimeoutSec = config:
    let ms = orDefault (config.shutdown_timeout_ms or null) daemonDefaults.shutdown_timeout_ms;
    in (ms + 999) / 1000 + 5;

  daemonPorts = config:
    let
      cache = (config.images or { }).cache_listen or "127.0.0.1:7380";
      metrics = metricsListen config;
      ports = filter (p: p != null && p != 0) ([ (portOf (config.listen or "0.0.0.0:7000")) (portOf cache) ]
        ++ (if metrics == null then [ ] else [ (portOf metrics) ]));
    in
    sort (a: b: a < b) (attrNames (listToAttrs (map (p: { name = toString p; value = p; }) ports)));

  # Assertions for one node, as NixOS `assertions` entries.
  #   { node ? "services.blixard", init, joinTicketFile, listen, members, relayUrl, raft }
  checkCluster = cfg:
    let
      node = cfg.node or "services.blixard";
      members = cfg.members or { };
      ms = map (k: {
        key = k;
        name = members.${k}.name or k;
        endpointId = members.${k}.endpointId or null;
        addresses = members.${k}.addresses or [ ];
      }) (attrNames members);
      dupNames = duplicates (map (m: m.name) ms);
      ids = filter (x: x != null) (map (m: m.endpointId) ms);
      dupIds = duplicates ids;
      badIds = filter (m: m.endpointId != null && match "[0-9a-f]{64}" m.endpointId == null) ms;
      badAddrs = concatLists (map (m: map (a: "${m.key}: ${a}") (filter (a: !isSocketAddr a) m.addresses)) ms);
      listen = cfg.listen or null;
      raft = cfg.raft or { };
      hb = raft.heartbeatTicks or null;
      el = raft.electionTicks or null;
      tick = raft.tickMs or null;
      relay = cfg.relayUrl or null;
    in
    [
      {
        assertion = !((cfg.init or false) && (cfg.joinTicketFile or null) != null);
        message = "${node}: init and joinTicketFile (${toJSON (cfg.joinTicketFile or null)}) are both set; a node either starts a cluster or joins one";
      }
      {
        assertion = listen == null || isSocketAddr listen;
        message = "${node}: listen = ${toJSON listen} is not IP:PORT (the daemon binds exactly this UDP socket address, e.g. \"0.0.0.0:7000\" or \"[::]:7000\")";
      }
      {
        assertion = dupNames == [ ];
        message = "${node}: members have duplicate names: ${showList dupNames}";
      }
      {
        assertion = dupIds == [ ];
        message = "${node}: members have duplicate endpointId: ${showList dupIds}";
      }
      {
        assertion = badIds == [ ];
        message = "${node}: members ${showList (map (m: m.key) badIds)} have an endpointId that is not 64 lowercase hex characters";
      }
      {
        assertion = badAddrs == [ ];
        message = "${node}: member addresses are not IP:PORT: ${showList badAddrs}";
      }
      {
        assertion = tick == null || (tick >= 1 && tick <= 10000);
        message = "${node}: raft.tickMs = ${toJSON tick} must be between 1 and 10000";
      }
      {
        assertion = hb == null || el == null || (hb >= 1 && el > hb);
        message = "${node}: raft.electionTicks (${toJSON el}) must be greater than raft.heartbeatTicks (${toJSON hb}), which must be at least 1";
      }
      {
        assertion = relay == null || match "(https?)://[^/ ]+.*" relay != null;
        message = "${node}: relayUrl = ${toJSON relay} is not an http(s) URL";
      }
    ];

  # Assertions across the hosts of one cluster: { NODE = cfg; ... } (cfg as for checkCluster).
  checkNodes = nodes:
    let
      names = attrNames nodes;
      inits = filter (n: nodes.${n}.init or false) names;
      orphans = filter (n: !(nodes.${n}.init or false) && (nodes.${n}.joinTicketFile or null) == null) names;
    in
    concatLists (map (n: checkCluster (nodes.${n} // { node = n; })) names)
    ++ [
      {
        assertion = length inits <= 1;
        message = "cluster: more than one node has init = true: ${showList inits}";
      }
      {
        assertion = inits != [ ] || names == [ ];
        message = "cluster: no node has init = true (one node must start the cluster)";
      }
    ];

  # The messages of failing assertions (what NixOS would print).
  failedAssertions = asserts: map (a: a.message) (filter (a: !a.assertion) asserts);

  # Thin-pool checks: { enable, backingFile, device, dataSize, metadataSize, blockSize } (sizes in MiB,
  # blockSize in 512-byte sectors as dm-thin takes it).
  checkThinPool = tp:
    let
      en = tp.enable or false;
      bs = tp.blockSize or 128;
      data = tp.dataSize or 0;
      meta = tp.metadataSize or 0;
      hasBacking = (tp.backingFile or null) != null;
      hasDevice = (tp.device or null) != null;
    in
    if !en then [ ] else [
      {
        assertion = hasBacking != hasDevice;
        message = "services.blixard.thinPool: set exactly one of backingFile (${toJSON (tp.backingFile or null)}) and device (${toJSON (tp.device or null)})";
      }
      {
        assertion = bs >= 128 && bs <= 2097152 && (bs / 128) * 128 == bs;
        message = "services.blixard.thinPool.blockSize = ${toJSON bs} sectors: dm-thin needs a multiple of 128 (64 KiB) between 128 and 2097152";
      }
      {
        assertion = meta >= 2 && meta <= 16384;
        message = "services.blixard.thinPool.metadataSize = ${toJSON meta} MiB: must be between 2 and 16384 MiB (dm-thin's limit is about 16 GiB)";
      }
      {
        assertion = data > meta;
        message = "services.blixard.thinPool.dataSize = ${toJSON data} MiB must be larger than metadataSize = ${toJSON meta} MiB";
      }
    ];

  # The daemon's VM limits (crates/core/src/vm.rs).
  vmLimits = { minMemoryMib = 16; maxMemoryMib = 4194304; maxVcpus = 256; };

  # The daemon's rule for names (crates/core/src/ids.rs, valid_name): 1 to 64 of
  # a-z 0-9 . _ -, starting with a letter or digit.
  validName = n: builtins.isString n && builtins.stringLength n <= 64 && match "[a-z0-9][a-z0-9._-]*" n != null;

  # The daemon's rule for new VM names (crates/core/src/vm.rs, valid_vm_name): a host name,
  # as NixOS' networking.hostName takes it and a guest built from `config` is named after
  # its VM: 1 to 63 of a-z 0-9 -, starting and ending with a letter or digit.
  validVmName = n: builtins.isString n && builtins.stringLength n <= 63
    && match "[a-z0-9]([a-z0-9-]*[a-z0-9])?" n != null;

  # Declared VMs (`services.blixard.vms.declared`) -> the list the daemon reads from
  # `vms.declared_file` (/etc/blixard/vms.json), sorted by name, with exactly the daemon's
  # keys. Runners must be resolved (modules/default.nix builds those given as `config`).
  #   { NAME = { runner (store path or package), vcpus, memory (MiB), tenant, labels,
  #              constraints, restart, placement, readyMarker }; }
  # vcpus and memory may be null: 1 and 512 (a `runner` VM whose sizes were not given); the
  # module passes a `config` VM's sizes as its guest configuration has them.
  mkDeclaredVms = vms:
    map (n:
      let v = vms.${n}; in {
        name = n;
        runner =
          if (v.runner or null) == null
          then throw "services.blixard.vms.declared.${n}: no runner (set runner, or config with the module from the Blixard flake)"
          else toString v.runner;
        vcpus = orDefault (v.vcpus or null) 1;
        memory_mib = orDefault (v.memory or null) 512;
        tenant = v.tenant or null;
        labels = v.labels or { };
        constraints = v.constraints or { };
        restart = v.restart or "on-failure";
        placement = v.placement or "cluster";
        ready_marker = v.readyMarker or null;
      }) (sort (a: b: a < b) (attrNames vms));

  # Assertions for declared VMs; each message names the VM. What the daemon would refuse
  # in the declared file (exit 8) fails here instead.
  checkVms = vms:
    concatLists (map (n:
      let
        v = vms.${n};
        # as Nix writes the attribute: quoted unless it is a plain identifier
        at = "services.blixard.vms.declared.${if match "[A-Za-z_][A-Za-z0-9_'-]*" n != null then n else toJSON n}";
        hasR = (v.runner or null) != null;
        hasC = (v.config or null) != null;
        vcpus = orDefault (v.vcpus or null) 1;
        mem = orDefault (v.memory or null) 512;
        restart = v.restart or "on-failure";
        placement = v.placement or "cluster";
        marker = v.readyMarker or null;
        runner = if hasR then toString v.runner else null;
        tenant = v.tenant or null;
        # Keys the daemon sets on a declared VM's spec; it refuses them in the file.
        reserved =
          (if (v.labels or { }) ? "blixard.declared-by" then [ "labels.\"blixard.declared-by\"" ] else [ ])
          ++ (if (v.constraints or { }) ? "blixard.node" then [ "constraints.\"blixard.node\"" ] else [ ]);
      in [
        {
          assertion = validVmName n;
          message = "${at}: the name ${toJSON n} is not valid: VM names are host names (the guest takes its VM's name): 1 to 63 of a-z 0-9 -, starting and ending with a letter or digit";
        }
        {
          assertion = hasR != hasC;
          message = "${at}: set exactly one of runner and config";
        }
        {
          assertion = runner == null || match "/.*" runner != null;
          message = "${at}: runner = ${toJSON runner} is not an absolute path";
        }
        {
          assertion = vcpus >= 1 && vcpus <= vmLimits.maxVcpus;
          message = "${at}: vcpus = ${toJSON vcpus} must be 1 to ${toJSON vmLimits.maxVcpus}";
        }
        {
          assertion = mem >= vmLimits.minMemoryMib && mem <= vmLimits.maxMemoryMib;
          message = "${at}: memory = ${toJSON mem} MiB must be ${toJSON vmLimits.minMemoryMib} to ${toJSON vmLimits.maxMemoryMib} MiB";
        }
        {
          assertion = elem restart [ "always" "on-failure" "never" ];
          message = "${at}: restart = ${toJSON restart} must be \"always\", \"on-failure\" or \"never\"";
        }
        {
          assertion = elem placement [ "cluster" "local" ];
          message = "${at}: placement = ${toJSON placement} must be \"cluster\" or \"local\"";
        }
        {
          assertion = tenant == null || validName tenant;
          message = "${at}: tenant = ${toJSON tenant} is not a valid tenant name (1 to 64 of a-z 0-9 . _ -, starting with a letter or digit)";
        }
        {
          assertion = reserved == [ ];
          message = "${at}: ${concatStringsSep " and " reserved}: set by the daemon, not in a declaration (placement = \"local\" pins a VM to this node)";
        }
        {
          assertion = marker == null || (marker != "" && match "[^\n]*" marker != null);
          message = "${at}: readyMarker = ${toJSON marker} must be a non-empty line (no newline)";
        }
      ]) (attrNames vms));
}
