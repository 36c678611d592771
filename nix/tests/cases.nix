# Evaluation tests for nix/lib.nix. Each attribute is compared with expected/NAME.json by
# scripts/nix-check.sh. Pure: no nixpkgs.
let
  lib = import ../lib.nix;
  inherit (lib) mkDaemonConfig mkRunArgs checkCluster checkNodes checkThinPool checkVms failedAssertions mkDeclaredVms;

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
    settings = { };
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

  # mkRunArgs
  run-args-init = mkRunArgs { dataDir = "/var/lib/blixard"; configFile = "/etc/blixard/blixard.toml"; init = true; joinTicketFile = null; };
  run-args-join = mkRunArgs { dataDir = "/var/lib/blixard"; configFile = "/etc/blixard/blixard.toml"; init = false; joinTicketFile = "/run/keys/blixard-ticket"; };
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

  # declared VMs
  declared-vms = mkDeclaredVms {
    web = { runner = "/nix/store/00000000000000000000000000000000-microvm-web"; vcpus = 2; memory = 1024; tenant = "acme"; labels = { app = "web"; }; constraints = { zone = "a"; }; restart = "always"; placement = "spread"; };
    db = { config = { }; vcpus = 4; memory = 4096; tenant = null; labels = { }; constraints = { }; restart = "on-failure"; placement = "pack"; };
  };
  vms-bad = failedAssertions (checkVms {
    both = { runner = "/nix/store/x"; config = { }; vcpus = 1; memory = 512; };
    tiny = { runner = "/nix/store/y"; vcpus = 0; memory = 16; };
  });

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
}
