# The module's case table: NixOS configurations using services.blixard, and what must
# land in the generated units, files and sysctls (or which error must stop them).
# Evaluated two ways by ./run-cases.nix: with the pinned nixpkgs (flake checks
# `eval-case-*`, `nix flake check --no-build`) and with the real nixpkgs lib over option
# stand-ins (./default.nix, `scripts/nix-eval.sh`). So a case only looks at what is the
# same in both: option values, with store paths written as <store>/NAME (see `unstore`).
#
# A case is { modules; and one of:
#   expect = { config, options, extend }: [ { what; got; want; } ... ];
#            `extend modules` evaluates the same system with more modules;
#   failsAssertion = TEXT;  a failing assertion's message contains TEXT;
#   failsEval = TEXT;       evaluation fails (a type error, a conflict); the harness also
#                           checks that TEXT is in the error, the flake check only that it
#                           fails (builtins.tryEval has no message) }
{ lib }:
let
  inherit (lib) hasInfix hasSuffix;

  # Store paths as <store>/NAME, so that values compare across package sets.
  unstore = s:
    lib.concatMapStrings (p: if builtins.isList p then "<store>/" else p)
      (builtins.split "${builtins.storeDir}/[0-9a-z]{32}-" s);

  # A stand-in package named blixard (only its path is looked at).
  stubPackage = { pkgs, ... }: {
    services.blixard.package = pkgs.writeShellScriptBin "blixard" "exit 1";
  };
  node = extra: [ stubPackage { services.blixard = { enable = true; } // extra; } ];
  runner = name: { pkgs, ... }: {
    services.blixard.vms.declared.${name}.runner = pkgs.writeShellScriptBin "microvm-run" "exit 1";
  };

  unit = config: config.systemd.services.blixard;
  sc = config: (unit config).serviceConfig;
  asList = x: if builtins.isList x then x else [ x ];
  declared = config: builtins.fromJSON (builtins.unsafeDiscardStringContext config.environment.etc."blixard/vms.json".text);
  vm = config: name: lib.findFirst (v: v.name == name) null (declared config);
  unitProps = config: config.services.blixard.daemonConfig.vms.unit_properties or [ ];

  # Can the daemon's process read the join ticket? Secret managers make root-owned files
  # by default (colmena and NixOps keys 0600 root in /run/keys, itself 0750 root:keys on
  # NixOS; agenix and sops-nix 0400 root), so a daemon that opens the file itself reads
  # it only as root. Through a systemd credential, PID 1 reads it as root and hands the
  # unit's user a private copy.
  daemonReadsTicket = config: file:
    let
      s = sc config;
      viaCredential = lib.elem "join-ticket:${file}" (asList (s.LoadCredential or [ ]))
        && hasInfix "\${CREDENTIALS_DIRECTORY}/join-ticket" s.ExecStart;
      direct = (s.User or "root") == "root" && hasInfix file s.ExecStart;
    in
    viaCredential || direct;

  long = n: lib.concatStrings (lib.genList (_: "a") n);
in
{
  init-node = {
    modules = node { init = true; };
    expect = { config, extend, ... }: [
      { what = "ExecStart"; got = unstore (sc config).ExecStart; want = ''"<store>/blixard/bin/blixard" "node" "run" "--data-dir" "/var/lib/blixard" "--config" "<store>/blixard.toml" "--init"''; }
      { what = "no credential"; got = (sc config) ? LoadCredential; want = false; }
      { what = "exit codes that stay down"; got = (sc config).RestartPreventExitStatus; want = [ 5 7 8 ]; }
      { what = "reload by SIGHUP"; got = hasSuffix "/bin/kill -HUP $MAINPID" (sc config).ExecReload; want = true; }
      { what = "systemd waits the daemon's stop bound and 5 s"; got = (sc config).TimeoutStopSec; want = "10s"; }
      { what = "a longer stop bound in settings"; got = (sc (extend [ { services.blixard.settings.shutdown_timeout_ms = 20500; } ]).config).TimeoutStopSec; want = "26s"; }
      { what = "a system user"; got = config.users.users.blixard.isSystemUser; want = true; }
      { what = "config restarts, declared VMs reload"; got = map builtins.length [ (unit config).restartTriggers (unit config).reloadTriggers ]; want = [ 1 1 ]; }
    ];
  };

  # The join ticket reaches the daemon as a systemd credential that exists even when the
  # file does not (after a reboot /run/keys is empty).
  joining-node = {
    modules = node { joinTicketFile = "/run/keys/blixard-ticket"; };
    expect = { config, ... }: [
      { what = "the daemon can read the ticket"; got = daemonReadsTicket config "/run/keys/blixard-ticket"; want = true; }
      { what = "LoadCredential"; got = (sc config).LoadCredential; want = "join-ticket:/run/keys/blixard-ticket"; }
      { what = "fallback when the file is gone"; got = (sc config).SetCredential; want = "join-ticket:"; }
      { what = "ExecStart"; got = unstore (sc config).ExecStart; want = ''"<store>/blixard/bin/blixard" "node" "run" "--data-dir" "/var/lib/blixard" "--config" "<store>/blixard.toml" --join-file ''${CREDENTIALS_DIRECTORY}/join-ticket''; }
      { what = "no ticket in any argument"; got = hasInfix "/run/keys" (sc config).ExecStart; want = false; }
    ];
  };
  joining-node-agenix = {
    modules = node { joinTicketFile = "/run/agenix/blixard-ticket"; };
    expect = { config, ... }: [
      { what = "the daemon can read the ticket"; got = daemonReadsTicket config "/run/agenix/blixard-ticket"; want = true; }
    ];
  };
  ticket-in-store = {
    modules = node { joinTicketFile = "${builtins.storeDir}/00000000000000000000000000000000-ticket"; };
    failsEval = "`services.blixard.joinTicketFile' is not of type `null or absolute path not in the Nix store'";
  };
  ticket-as-path = {
    modules = node { joinTicketFile = ./cases.nix; };
    failsEval = "`services.blixard.joinTicketFile' is not of type `null or absolute path not in the Nix store'";
  };
  init-and-join = {
    modules = node { init = true; joinTicketFile = "/run/keys/blixard-ticket"; };
    failsAssertion = "init and joinTicketFile";
  };

  # VM names are host names: the guest of a `config` VM is named after it.
  vm-name-with-dot = {
    modules = node { } ++ [ { services.blixard.vms.declared."web.prod".config = { }; } ];
    failsAssertion = "the name \"web.prod\" is not valid";
  };
  vm-name-trailing-dash = {
    modules = node { } ++ [ (runner "web-") ];
    failsAssertion = "the name \"web-\" is not valid";
  };
  vm-name-underscore = {
    modules = node { } ++ [ (runner "web_1") ];
    failsAssertion = "the name \"web_1\" is not valid";
  };
  vm-name-64 = {
    modules = node { } ++ [ (runner (long 64)) ];
    failsAssertion = "is not valid: VM names are host names";
  };
  vm-name-63 = {
    modules = node { } ++ [ (runner (long 63)) ];
    expect = { config, ... }: [
      { what = "declared"; got = map (v: v.name) (declared config); want = [ (long 63) ]; }
    ];
  };

  # A guest's own sizes win and are what the scheduler is told; the VM's sizes are the
  # guest's defaults; without either, microvm.nix's.
  guest-sets-sizes = {
    modules = node { } ++ [ {
      services.blixard.vms.declared.db = {
        vcpus = 2;
        config = { microvm.vcpu = 4; microvm.mem = 2048; system.stateVersion = "25.11"; };
      };
    } ];
    expect = { config, ... }: [
      { what = "db sizes"; got = { inherit (vm config "db") vcpus memory_mib; }; want = { vcpus = 4; memory_mib = 2048; }; }
      { what = "db runner"; got = unstore (vm config "db").runner; want = "<store>/microvm-qemu-db"; }
    ];
  };
  guest-takes-vm-sizes = {
    modules = node { } ++ [ {
      services.blixard.vms.declared.api = { vcpus = 2; memory = 1024; config.system.stateVersion = "25.11"; };
      services.blixard.vms.declared.tiny.config.system.stateVersion = "25.11";
    } ];
    expect = { config, ... }: [
      { what = "api sizes"; got = { inherit (vm config "api") vcpus memory_mib; }; want = { vcpus = 2; memory_mib = 1024; }; }
      { what = "tiny sizes"; got = { inherit (vm config "tiny") vcpus memory_mib; }; want = { vcpus = 1; memory_mib = 512; }; }
    ];
  };
  runner-vm-defaults = {
    modules = node { } ++ [ (runner "web") ];
    expect = { config, ... }: [
      { what = "web"; got = { inherit (vm config "web") vcpus memory_mib placement restart; }; want = { vcpus = 1; memory_mib = 512; placement = "cluster"; restart = "on-failure"; }; }
    ];
  };

  # Changing only the declared VMs reloads the daemon (it replaces the changed VMs);
  # changing its config restarts it.
  declared-change-reloads = {
    modules = node { } ++ [ (runner "web") ];
    expect = { config, extend, ... }:
      let
        changed = (extend [ { services.blixard.vms.declared.web.memory = 1024; } ]).config;
        reconfigured = (extend [ { services.blixard.labels.zone = "b"; } ]).config;
        triggers = c: { restart = map toString (unit c).restartTriggers; reload = (unit c).reloadTriggers; };
      in
      [
        { what = "a VM change: same restart triggers"; got = (triggers changed).restart == (triggers config).restart; want = true; }
        { what = "a VM change: new reload triggers"; got = (triggers changed).reload == (triggers config).reload; want = false; }
        { what = "a config change: new restart triggers"; got = (triggers reconfigured).restart == (triggers config).restart; want = false; }
        { what = "the new generation's file"; got = (vm changed "web").memory_mib; want = 1024; }
      ];
  };

  thin-pool-off = {
    modules = node { };
    expect = { config, ... }: [
      { what = "no pool unit"; got = config.systemd.services ? blixard-thinpool; want = false; }
      { what = "VM units not ordered after it"; got = lib.any (hasInfix "blixard-thinpool") (unitProps config); want = false; }
    ];
  };
  thin-pool-file = {
    modules = node { thinPool = { enable = true; backingFile = "/var/lib/blixard-pool/data.img"; }; };
    expect = { config, ... }: [
      { what = "the daemon does not need the pool"; got = lib.any (hasInfix "thinpool") ((unit config).requires ++ (unit config).after ++ (unit config).bindsTo); want = false; }
      { what = "a switch does not tear it down"; got = { inherit (config.systemd.services.blixard-thinpool) restartIfChanged stopIfChanged; }; want = { restartIfChanged = false; stopIfChanged = false; }; }
      { what = "VM units start after it"; got = lib.filter (hasInfix "blixard-thinpool") (unitProps config); want = [ "After=blixard-thinpool.service" "Wants=blixard-thinpool.service" ]; }
      { what = "no device to wait for"; got = config.systemd.services.blixard-thinpool.bindsTo; want = [ ]; }
    ];
  };
  thin-pool-device = {
    modules = node { thinPool = { enable = true; device = "/dev/disk/by-id/nvme-pool_1"; }; };
    expect = { config, ... }: [
      { what = "waits for its device"; got = config.systemd.services.blixard-thinpool.bindsTo; want = [ "dev-disk-by\\x2did-nvme\\x2dpool_1.device" ]; }
      { what = "after its device"; got = lib.elem "dev-disk-by\\x2did-nvme\\x2dpool_1.device" config.systemd.services.blixard-thinpool.after; want = true; }
    ];
  };
  thin-pool-both = {
    modules = node { thinPool = { enable = true; device = "/dev/sdb"; backingFile = "/var/lib/p.img"; }; };
    failsAssertion = "set exactly one of backingFile";
  };

  firewall-custom-listen = {
    modules = node { openFirewall = true; settings.listen = "0.0.0.0:7100"; };
    expect = { config, ... }: [
      { what = "the port opened is the one bound"; got = config.networking.firewall.allowedUDPPorts; want = [ 7100 ]; }
      { what = "rendered"; got = config.services.blixard.daemonConfig.listen; want = "0.0.0.0:7100"; }
    ];
  };
  firewall-off = {
    modules = node { listen = "10.0.0.1:7200"; };
    expect = { config, ... }: [
      { what = "nothing opened"; got = lib.elem 7200 config.networking.firewall.allowedUDPPorts; want = false; }
    ];
  };
  listen-invalid-in-settings = {
    modules = node { settings.listen = "localhost:7000"; };
    failsAssertion = "listen = \"localhost:7000\" is not IP:PORT";
  };
  raft-invalid-in-settings = {
    modules = node { settings.raft = { election_ticks = 2; heartbeat_ticks = 2; }; };
    failsAssertion = "raft.electionTicks (2) must be greater than raft.heartbeatTicks (2)";
  };

  high-density = {
    modules = node {
      tuning.highDensity.enable = true;
      settings = { listen = "0.0.0.0:7100"; images.cache_listen = "127.0.0.1:7390"; };
    };
    expect = { config, ... }: [
      { what = "port range"; got = config.boot.kernel.sysctl."net.ipv4.ip_local_port_range"; want = "1024 65535"; }
      { what = "the daemon's ports are reserved"; got = config.boot.kernel.sysctl."net.ipv4.ip_local_reserved_ports"; want = "7100,7390"; }
      { what = "pid_max"; got = config.boot.kernel.sysctl."kernel.pid_max"; want = 4194303; }
      { what = "nofile limit"; got = (sc config).LimitNOFILE; want = 1048576; }
      { what = "PAM limits"; got = map (l: l.item) config.security.pam.loginLimits; want = [ "nofile" "nproc" ]; }
      { what = "VM units' limits"; got = lib.filter (lib.hasPrefix "Limit") (unitProps config); want = [ "LimitMEMLOCK=infinity" "LimitNOFILE=1048576" "LimitNPROC=1048576" ]; }
    ];
  };
  # The metrics endpoint with a local Prometheus and Grafana: the TCP port opens, the
  # node is a scrape target on loopback (it listens on a wildcard), the rules load, and
  # Grafana is given the dashboard's folder (its content is not read in eval mode).
  monitoring = {
    modules = node { metrics = { listen = "0.0.0.0:7390"; openFirewall = true; prometheus.enable = true; grafana.enable = true; }; };
    expect = { config, ... }: [
      { what = "config"; got = config.services.blixard.daemonConfig.metrics; want = { listen = "0.0.0.0:7390"; }; }
      { what = "firewall"; got = config.networking.firewall.allowedTCPPorts; want = [ 7390 ]; }
      { what = "scrape target"; got = map (s: [ s.job_name (map (c: c.targets) s.static_configs) ]) config.services.prometheus.scrapeConfigs; want = [ [ "blixard" [ [ "127.0.0.1:7390" ] ] ] ]; }
      { what = "rules"; got = map baseNameOf config.services.prometheus.ruleFiles; want = [ "rules.yml" ]; }
      { what = "dashboard folder"; got = builtins.substring 44 100 (toString (builtins.head config.services.grafana.provision.dashboards.settings.providers).options.path); want = "blixard-dashboards"; }
    ];
  };
  telemetry = {
    modules = node { telemetry.otlpEndpoint = "http://127.0.0.1:4318"; };
    expect = { config, ... }: [
      { what = "config"; got = config.services.blixard.daemonConfig.telemetry; want = { otlp_endpoint = "http://127.0.0.1:4318"; }; }
    ];
  };
  high-density-default-ports = {
    modules = node { tuning.highDensity.enable = true; };
    expect = { config, ... }: [
      { what = "reserved"; got = config.boot.kernel.sysctl."net.ipv4.ip_local_reserved_ports"; want = "7000,7380,7390"; }
    ];
  };

  # Imported twice (e.g. through nixosModules.default and .blixard): the same system as
  # once; list options do not get every entry twice, sysctls are not defined twice.
  imported-twice = {
    modules = node { tuning.highDensity.enable = true; openFirewall = true; } ++ [ ({ blixard, ... }: { imports = [ blixard ]; }) ];
    expect = { config, ... }: [
      { what = "PAM limits once"; got = builtins.length config.security.pam.loginLimits; want = 2; }
      { what = "the package once"; got = builtins.length (lib.filter (p: (p.name or "") == "blixard") config.environment.systemPackages); want = 1; }
      { what = "the polkit rule once"; got = builtins.length (lib.filter (l: hasInfix "polkit.addRule" l) (lib.splitString "\n" config.security.polkit.extraConfig)); want = 1; }
      { what = "sysctl"; got = config.boot.kernel.sysctl."kernel.threads-max"; want = 999999999; }
    ];
  };

  # ExecStart is escaped for systemd: `%` (a specifier) and `$` (a variable) pass through.
  exec-escaping = {
    modules = node { init = true; dataDir = "/srv/blixard 100%$HOME"; };
    expect = { config, ... }: [
      { what = "data dir argument"; got = hasInfix ''"--data-dir" "/srv/blixard 100%%$$HOME"'' (sc config).ExecStart; want = true; }
      { what = "made by tmpfiles"; got = config.systemd.tmpfiles.settings."10-blixard" ? "/srv/blixard 100%$HOME"; want = true; }
    ];
  };
  data-dir-relative = {
    modules = node { dataDir = "var/lib/blixard"; };
    failsEval = "`services.blixard.dataDir' is not of type `absolute path not in the Nix store'";
  };

  # Errors name the module's file, not <unknown-file>.
  error-locations = {
    modules = node { openFirewall = true; };
    expect = { options, ... }: [
      { what = "the module's file is named"; got = lib.any (f: hasSuffix "modules/default.nix" (toString f)) options.networking.firewall.allowedUDPPorts.files; want = true; }
      { what = "no unknown file"; got = lib.elem "<unknown-file>" (map toString options.networking.firewall.allowedUDPPorts.files); want = false; }
    ];
  };
}
