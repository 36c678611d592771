# Checks that ./nixos-options.nix merges and refuses definitions as NixOS does.
# Every attribute is true when the behaviour matches NixOS:
#   nix-instantiate --eval --strict -E \
#     'import ./nix/tests/eval/nixos-options-selftest.nix { lib = import <nixpkgs-lib>; }'
{ lib }:
let
  eval = modules: (lib.evalModules { modules = [ ./nixos-options.nix ] ++ modules; }).config;
  forced = x: builtins.tryEval (builtins.deepSeq x x);
  works = x: (forced x).success;
  fails = x: !(forced x).success;
  valueIs = expected: x: let r = forced x; in r.success && r.value == expected;

  service = defs: (eval (map (d: { systemd.services.a = d; }) defs)).systemd.services.a;
  sc = defs: (service (map (d: { serviceConfig = d; }) defs)).serviceConfig;

  users = modules: eval modules;
  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  noFailedAssertions = config: valueIs [ ] (failedAssertions config);
  someFailedAssertion = config: let r = forced (failedAssertions config); in r.success && r.value != [ ];
in
{
  # --- serviceConfig (unitOption)
  # (1) two different scalars for one key conflict
  scalarConflict = fails (sc [ { User = "x"; } { User = "y"; } ]);
  # equal scalars are accepted (mergeEqualOption)
  equalScalarsMerge = valueIs "x" (sc [ { User = "x"; } { User = "x"; } ]).User;
  # (2) lists concatenate, in definition order
  listsConcatenate = valueIs [ "kvm" "disk" ] (sc [ { SupplementaryGroups = [ "kvm" ]; } { SupplementaryGroups = [ "disk" ]; } ]).SupplementaryGroups;
  # a scalar next to a list becomes one element of it
  scalarJoinsList = valueIs [ "a" "b" ] (sc [ { ExecStartPre = "a"; } { ExecStartPre = [ "b" ]; } ]).ExecStartPre;
  # mkForce still wins over other definitions
  forcedScalarWins = valueIs "y" (sc [ { User = "x"; } { User = lib.mkForce "y"; } ]).User;
  # Type= / Restart= are checked
  badTypeRefused = fails (sc [ { Type = "bogus"; } ]);
  goodTypeAccepted = valueIs "notify" (sc [ { Type = "notify"; } ]).Type;

  # --- unit options
  # (4) mkForce [ ] empties wantedBy
  wantedByForcedEmpty = valueIs [ ] (service [ { wantedBy = [ "multi-user.target" ]; } { wantedBy = lib.mkForce [ ]; } ]).wantedBy;
  wantedByMerges = valueIs [ "a.target" "b.target" ] (service [ { wantedBy = [ "a.target" ]; } { wantedBy = [ "b.target" ]; } ]).wantedBy;
  unitNameChecked = fails (service [ { wants = [ "no-suffix" ]; } ]).wants;
  # after= is rendered into [Unit] After=, so a different After= conflicts
  afterRendered = valueIs "x.service y.target" (service [ { after = [ "x.service" "y.target" ]; } ]).unitConfig.After;
  afterConflictsWithUnitConfig = fails (service [ { after = [ "x.service" ]; } { unitConfig.After = "z.service"; } ]).unitConfig;
  # script gives ExecStart=, so an explicit ExecStart= conflicts
  scriptConflictsWithExecStart = fails (service [ { script = "true"; } { serviceConfig.ExecStart = "/bin/x"; } ]).serviceConfig;
  startAtIsList = valueIs [ "daily" ] (service [ { startAt = "daily"; } ]).startAt;

  # --- networking
  # (3) a host name with a dot is refused
  hostNameWithDotRefused = fails (eval [ { networking.hostName = "a.example"; } ]).networking.hostName;
  hostNameDefault = valueIs "nixos" (eval [ ]).networking.hostName;
  portsCanonical = valueIs [ 22 53 ] (eval [ { networking.firewall.allowedUDPPorts = [ 53 22 ]; } { networking.firewall.allowedUDPPorts = [ 53 ]; } ]).networking.firewall.allowedUDPPorts;
  portRangeChecked = fails (eval [ { networking.firewall.allowedTCPPorts = [ 70000 ]; } ]).networking.firewall.allowedTCPPorts;

  # --- sysctl
  sysctlOverridesDefault = valueIs 5 (eval [ { boot.kernel.sysctl."kernel.pid_max" = 5; } ]).boot.kernel.sysctl."kernel.pid_max";
  # even equal plain definitions of one key are an error (mergeOneOption)
  sysctlTwiceRefused = fails (eval [ { boot.kernel.sysctl."a.b" = 1; } { boot.kernel.sysctl."a.b" = 1; } ]).boot.kernel.sysctl."a.b";
  sysctlFloatRefused = fails (eval [ { boot.kernel.sysctl."a.b" = 1.5; } ]).boot.kernel.sysctl."a.b";
  sysctlLargestBuffer = valueIs 300 (eval [ { boot.kernel.sysctl."net.core.rmem_max" = 300; } { boot.kernel.sysctl."net.core.rmem_max" = 100; } ]).boot.kernel.sysctl."net.core.rmem_max";

  # --- kernel modules (attrset of bools, coerced from lists)
  kernelModules = valueIs [ "atkbd" "dm-thin-pool" "loop" ] (eval [ { boot.kernelModules = [ "dm-thin-pool" "loop" ]; } ]).boot.kernelModules;

  # --- users and groups
  systemUserOk = noFailedAssertions (users [ { users.users.x = { isSystemUser = true; group = "x"; }; users.groups.x = { }; } ]);
  neitherKindFails = someFailedAssertion (users [ { users.users.x.group = "x"; users.groups.x = { }; } ]);
  bothKindsFail = someFailedAssertion (users [ { users.users.x = { isSystemUser = true; isNormalUser = true; group = "x"; }; users.groups.x = { }; } ]);
  groupUnsetFails = someFailedAssertion (users [ { users.users.x.isSystemUser = true; } ]);
  groupUndeclaredFails = someFailedAssertion (users [ { users.users.x = { isSystemUser = true; group = "x"; }; } ]);
  normalUserDefaults = valueIs { group = "users"; home = "/home/al"; } (lib.getAttrs [ "group" "home" ] (users [ { users.users.al.isNormalUser = true; } ]).users.users.al);
  kvmKeepsGid = valueIs 302 (users [ { users.groups.kvm = { }; } ]).users.groups.kvm.gid;
  keysGid = valueIs 96 (users [ ]).users.groups.keys.gid;
  membersFromExtraGroups = valueIs [ "x" ] (users [ { users.users.x = { isSystemUser = true; group = "x"; extraGroups = [ "kvm" ]; }; users.groups.x = { }; } ]).users.groups.kvm.members;
  duplicateGidFails = someFailedAssertion (users [ { users.groups.g.gid = 302; } ]);

  # --- environment
  etcTextGivesSource = works (eval [ { environment.etc."a/b".text = "x"; } ]).environment.etc."a/b".source;
  etcTextAndSourceConflict = fails (eval [ { environment.etc.a = { text = "x"; source = "/x"; }; } ]).environment.etc.a.source;
  variablesJoined = valueIs { A = "1:b"; } (eval [ { environment.variables = { A = [ 1 "b" ]; B = null; }; } ]).environment.variables;

  # --- nix.settings
  trustedUsersMerge = valueIs [ "blixard" "root" ] (lib.sort lib.lessThan (eval [ { nix.settings.trusted-users = [ "blixard" ]; } ]).nix.settings.trusted-users);

  # --- systemd.settings.Manager
  managerSetting = valueIs "50%" (eval [ { systemd.settings.Manager.DefaultTasksMax = "50%"; } ]).systemd.settings.Manager.DefaultTasksMax;

  # --- pam
  loginLimitItemChecked = fails (eval [ { security.pam.loginLimits = [ { domain = "*"; item = "files"; value = 1; } ]; } ]).security.pam.loginLimits;
}
