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
in
rec {
  inherit dropNulls recursiveMerge isSocketAddr portOf duplicates;

  # The daemon's defaults for the values the module checks (crates/blixard/src/config.rs).
  daemonDefaults = {
    raft = { tick_ms = 100; election_ticks = 10; };
    vms = { down_timeout_ms = 30000; fence_timeout_ms = 15000; stop_timeout_ms = 10000; };
  };

  # Module option values -> the daemon's config (crates/blixard/src/config.rs), exact keys.
  #   { listen, name, relayUrl, labels, capacity = { vcpus, memoryMib };
  #     raft = { tickMs, electionTicks, heartbeatTicks, snapshotThreshold };
  #     images = { storeDir, cacheListen, cacheSizeMib, materialise, nixStore, importPaths };
  #     vms = { stateDir, consoleMaxMib, downTimeoutMs, fenceTimeoutMs, stopTimeoutMs,
  #             strategy, cpuOvercommitPct, memoryOvercommitPct, hooks, hookTimeoutMs };
  #     requestTimeoutMs, settings }
  # Every field may be missing or null; nulls are dropped so the daemon's defaults apply
  # (`vms.hooks = [ ]` too: the daemon's default is no hooks). Hooks are left as given, so
  # a Nix path literal is copied to the store when the config is rendered.
  # `settings` is merged last (freeform; it uses the daemon's own snake_case names).
  mkDaemonConfig = cfg:
    let
      cap = cfg.capacity or { };
      raft = cfg.raft or { };
      img = cfg.images or { };
      vms = cfg.vms or { };
      hooks = get vms "hooks";
      typed = dropNulls {
        listen = get cfg "listen";
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
        };
      };
    in
    recursiveMerge typed (dropNulls (cfg.settings or { }));

  # The module's `services.blixard` values -> mkDaemonConfig's argument (used by both
  # modules/default.nix and modules/asserts.nix, so the checked config is the rendered one).
  moduleDaemonConfig = cfg: mkDaemonConfig {
    inherit (cfg) listen name relayUrl labels requestTimeoutMs settings;
    capacity = { inherit (cfg.capacity) vcpus memoryMib; };
    raft = { inherit (cfg.raft) tickMs electionTicks heartbeatTicks snapshotThreshold; };
    images = { inherit (cfg.images) storeDir cacheListen cacheSizeMib materialise nixStore importPaths; };
    vms = {
      inherit (cfg.vms) stateDir consoleMaxMib downTimeoutMs fenceTimeoutMs stopTimeoutMs
        strategy cpuOvercommitPct memoryOvercommitPct hooks hookTimeoutMs;
    };
  };

  # Checks of a rendered daemon config's `[vms]` section (after `settings`; the daemon's
  # defaults where a value is unset), as NixOS `assertions` entries. The timing rule is the
  # daemon's own (Config::validate): a host cut off from the quorum must have stopped its
  # VMs before the leader, having marked it down, starts them elsewhere.
  #   { node ? "services.blixard", config = mkDaemonConfig's result }
  checkVmsConfig = { node ? "services.blixard", config }:
    let
      r = daemonDefaults.raft // (config.raft or { });
      v = daemonDefaults.vms // (config.vms or { });
      # raft-rs randomises the election timeout up to twice the configured one.
      electionMs = 2 * r.tick_ms * r.election_ticks;
      sum = v.fence_timeout_ms + v.stop_timeout_ms + electionMs;
      stateDir = v.state_dir or null;
      hooks = v.hooks or [ ];
      badHooks = filter (h: match "/.*" (toString h) == null) hooks;
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
        assertion = badHooks == [ ];
        message = "${node}: vms.hooks must be absolute paths: ${showList (map toString badHooks)}";
      }
    ];

  # The argument list after `blixard node run`.
  #   { dataDir, configFile, init ? false, joinTicketFile ? null }
  mkRunArgs = cfg:
    [ "--data-dir" (toString cfg.dataDir) ]
    ++ (if (cfg.configFile or null) != null then [ "--config" (toString cfg.configFile) ] else [ ])
    ++ (if cfg.init or false then [ "--init" ] else [ ])
    ++ (if (cfg.joinTicketFile or null) != null then [ "--join-file" (toString cfg.joinTicketFile) ] else [ ]);

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

  # Declared VMs (`services.blixard.vms.declared`) -> a JSON-able list sorted by name. The
  # daemon does NOT read this (VMs are created through its API, `blixard vm create`); the
  # module writes it to /etc/blixard/vms.json.
  #   { NAME = { runner ? null (store path string), config ? null, vcpus, memory (MiB),
  #              tenant, labels, constraints, restart, placement }; }
  mkDeclaredVms = vms:
    map (n:
      let v = vms.${n}; in {
        name = n;
        runner = if (v.runner or null) == null then null else toString v.runner;
        vcpus = v.vcpus or 1;
        memory_mib = v.memory or 512;
        tenant = v.tenant or null;
        labels = v.labels or { };
        constraints = v.constraints or { };
        restart = v.restart or "on-failure";
        placement = v.placement or "spread";
      }) (sort (a: b: a < b) (attrNames vms));

  checkVms = vms:
    concatLists (map (n:
      let v = vms.${n}; hasR = (v.runner or null) != null; hasC = (v.config or null) != null; in [
        {
          assertion = hasR != hasC;
          message = "services.blixard.vms.declared.${n}: set exactly one of runner and config";
        }
        {
          assertion = (v.vcpus or 1) >= 1;
          message = "services.blixard.vms.declared.${n}: vcpus = ${toJSON (v.vcpus or null)} must be at least 1";
        }
        {
          assertion = (v.memory or 512) >= 64;
          message = "services.blixard.vms.declared.${n}: memory = ${toJSON (v.memory or null)} MiB must be at least 64";
        }
      ]) (attrNames vms));
}
