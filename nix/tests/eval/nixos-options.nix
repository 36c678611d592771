# Stand-ins for the NixOS options that modules/ and hosts/ touch, so the Blixard module
# can be evaluated with the real nixpkgs `lib` (lib.evalModules) but without the rest of
# nixpkgs. Types, defaults, apply functions and the definitions nixpkgs itself always
# adds are modelled on nixpkgs (sources and commits: NIXOS-OPTIONS.md, next to this
# file), so type errors and conflicting definitions surface as they would on NixOS.
#
# Where nixpkgs needs `pkgs`, this module cannot follow it; every such place is marked
# DIFFERS below. In short:
# - no package-typed defaults: `nix.package` and `systemd.package` have none (set them);
# - scripts (`script`, `preStart`, ...) and `environment.etc.<n>.text` turn into
#   placeholder store paths (strings, nothing is built), so that the definitions nixpkgs
#   derives from them (ExecStart=..., `source`) exist and conflict as on NixOS;
# - a service's PATH is derived from `path` only: nixpkgs' default service path
#   (coreutils, findutils, grep, sed, systemd) is not appended;
# - `restartTriggers` / `reloadTriggers` are not rendered into X-Restart-Triggers /
#   X-Reload-Triggers (nixpkgs writes them to the store);
# - too-long user/group names `throw` (nixpkgs uses `abort`), so tests can catch them.
{ config, lib, options, ... }:
let
  inherit (lib) mkOption mkDefault mkIf mkMerge types;

  top = config;

  # Placeholder for a file nixpkgs would write to the store: absolute, stable for a
  # given content, distinct for different contents. Never built.
  placeholderPath = label: content:
    "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" content)}-${label}";

  # ---------------------------------------------------------------- systemd

  # One value of a [Section]: a scalar, or a list for a directive that may repeat.
  # As nixpkgs' unitOption: when any (highest-priority) definition is a list, all of
  # them are concatenated in definition order, a scalar counting as one element; when
  # none is, they must all be equal (mergeEqualOption: equal duplicates are fine,
  # different ones are a "conflicting definition values" error).
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let
        kept = lib.filterOverrides defs;
        anyList = builtins.any (d: builtins.isList d.value) kept;
      in
      if anyList then
        builtins.concatLists (map (d: if builtins.isList d.value then d.value else [ d.value ]) kept)
      else
        lib.mergeEqualOption loc kept;
  };

  # Unit names as nixpkgs' systemd-lib accepts them (the name plus a known suffix).
  unitName = types.strMatching
    "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";
  unitList = text: mkOption {
    type = types.listOf unitName;
    default = [ ];
    description = text;
  };

  # The check nixpkgs adds to serviceConfig: Type= and Restart= must be known values.
  # Like nixpkgs it looks through one mkIf / mkOverride wrapper (an mkIf's condition is
  # ignored), and on failure it traces the reasons and fails the type check.
  serviceTypes = [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ];
  restartValues = [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "always" ];
  checkServiceSection = attrs:
    let
      unwrap = v: if builtins.elem (v._type or "") [ "override" "if" ] then v.content else v;
      section = builtins.mapAttrs (_: unwrap) attrs;
      refuse = key: allowed:
        lib.optional (section ? ${key} && !(builtins.elem section.${key} allowed))
          "[Service] ${key}=${toString section.${key}} is not one of: ${toString allowed}";
      problems = refuse "Type" serviceTypes ++ refuse "Restart" restartValues;
    in
    if problems == [ ] then true else builtins.trace (lib.concatStringsSep "\n" problems) false;

  # Where nixpkgs would put a generated job script (makeJobScript).
  jobScript = scriptName: text:
    let file = builtins.replaceStrings [ "\\" "@" ] [ "-" "_" ] scriptName;
    in "${placeholderPath "unit-script-${file}" text}/bin/${file}";

  # [Unit] keys nixpkgs derives from the list options (space-separated, as toString).
  derivedUnitKeys = {
    requires = "Requires";
    wants = "Wants";
    upholds = "Upholds";
    after = "After";
    before = "Before";
    bindsTo = "BindsTo";
    partOf = "PartOf";
    conflicts = "Conflicts";
    requisite = "Requisite";
    documentation = "Documentation";
    onFailure = "OnFailure";
    onSuccess = "OnSuccess";
  };

  serviceModule = { name, config, options, ... }: {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Unit is installed (false: masked).";
      };
      overrideStrategy = mkOption {
        type = types.enum [ "asDropinIfExists" "asDropin" ];
        default = "asDropinIfExists";
        description = "Unit file or drop-in.";
      };
      aliases = unitList "Alias names.";
      wantedBy = unitList "Reverse Wants=.";
      requiredBy = unitList "Reverse Requires=.";
      upheldBy = unitList "Reverse Upholds=.";
      description = mkOption {
        type = types.singleLineStr;
        default = "";
        description = "Description=.";
      };
      documentation = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Documentation= URIs.";
      };
      requires = unitList "Requires=.";
      wants = unitList "Wants=.";
      upholds = unitList "Upholds=.";
      after = unitList "After=.";
      before = unitList "Before=.";
      bindsTo = unitList "BindsTo=.";
      partOf = unitList "PartOf=.";
      conflicts = unitList "Conflicts=.";
      requisite = unitList "Requisite=.";
      onFailure = unitList "OnFailure=.";
      onSuccess = unitList "OnSuccess=.";
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
        description = "[Unit] section.";
      };
      startLimitBurst = mkOption {
        type = types.int;
        description = "StartLimitBurst=.";
      };
      startLimitIntervalSec = mkOption {
        type = types.int;
        description = "StartLimitIntervalSec=.";
      };
      restartTriggers = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
        description = "Restart when these change.";
      };
      reloadTriggers = mkOption {
        type = types.listOf unitOption;
        default = [ ];
        description = "Reload when these change.";
      };
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
        default = { };
        description = "Environment= of the service.";
      };
      path = mkOption {
        type = types.listOf (types.oneOf [ types.package types.str ]);
        default = [ ];
        description = "Packages on PATH.";
      };
      serviceConfig = mkOption {
        type = types.addCheck (types.attrsOf unitOption) checkServiceSection;
        default = { };
        description = "[Service] section.";
      };
      script = mkOption {
        type = types.lines;
        default = "";
        description = "Main process, as shell.";
      };
      scriptArgs = mkOption {
        type = types.str;
        default = "";
        description = "Arguments of the script.";
      };
      preStart = mkOption {
        type = types.lines;
        default = "";
        description = "Shell run before start.";
      };
      postStart = mkOption {
        type = types.lines;
        default = "";
        description = "Shell run after start.";
      };
      reload = mkOption {
        type = types.lines;
        default = "";
        description = "Shell run on reload.";
      };
      preStop = mkOption {
        type = types.lines;
        default = "";
        description = "Shell run to stop.";
      };
      postStop = mkOption {
        type = types.lines;
        default = "";
        description = "Shell run after stop.";
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
        description = "Restart on switch if changed.";
      };
      reloadIfChanged = mkOption {
        type = types.bool;
        default = false;
        description = "Reload on switch if changed.";
      };
      stopIfChanged = mkOption {
        type = types.bool;
        default = true;
        description = "Stop old, start new on switch.";
      };
      notSocketActivated = mkOption {
        type = types.bool;
        default = false;
        description = "Ignore sockets on switch.";
      };
      startAt = mkOption {
        type = types.either types.str (types.listOf types.str);
        default = [ ];
        apply = lib.toList;
        description = "OnCalendar= of a timer.";
      };
    };

    config = mkMerge [
      {
        unitConfig =
          lib.concatMapAttrs
            (opt: key: lib.optionalAttrs (config.${opt} != [ ]) { ${key} = toString config.${opt}; })
            derivedUnitKeys
          // lib.optionalAttrs (config.description != "") { Description = config.description; }
          // lib.optionalAttrs options.startLimitIntervalSec.isDefined {
            StartLimitIntervalSec = toString config.startLimitIntervalSec;
          }
          // lib.optionalAttrs options.startLimitBurst.isDefined {
            StartLimitBurst = toString config.startLimitBurst;
          };
        # DIFFERS: nixpkgs always appends its default service path to `path`, so PATH
        # is always defined there too (setting environment.PATH conflicts on NixOS as
        # here); the value here lacks those default packages.
        environment.PATH =
          "${lib.makeBinPath config.path}:${lib.makeSearchPathOutput "bin" "sbin" config.path}";
      }
      (mkIf (config.preStart != "") {
        serviceConfig.ExecStartPre = [ (jobScript "${name}-pre-start" config.preStart) ];
      })
      (mkIf (config.script != "") {
        serviceConfig.ExecStart = jobScript "${name}-start" config.script + " " + config.scriptArgs;
      })
      (mkIf (config.postStart != "") {
        serviceConfig.ExecStartPost = [ (jobScript "${name}-post-start" config.postStart) ];
      })
      (mkIf (config.reload != "") {
        serviceConfig.ExecReload = jobScript "${name}-reload" config.reload;
      })
      (mkIf (config.preStop != "") {
        serviceConfig.ExecStop = jobScript "${name}-pre-stop" config.preStop;
      })
      (mkIf (config.postStop != "") {
        serviceConfig.ExecStopPost = jobScript "${name}-post-stop" config.postStop;
      })
    ];
  };

  tmpfilesEntry = { name, ... }: {
    options = {
      type = mkOption {
        type = types.str;
        default = name;
        description = "Line type (d, f, L, ...).";
      };
      mode = mkOption {
        type = types.str;
        default = "-";
        description = "Mode.";
      };
      user = mkOption {
        type = types.str;
        default = "-";
        description = "Owner.";
      };
      group = mkOption {
        type = types.str;
        default = "-";
        description = "Group.";
      };
      age = mkOption {
        type = types.str;
        default = "-";
        description = "Cleanup age.";
      };
      argument = mkOption {
        type = types.str;
        default = "";
        description = "Type-specific argument.";
      };
    };
  };

  # ---------------------------------------------------------------- sysctl

  # nixpkgs' sysctl value: null, bool, int or string (an mkOverride-wrapped one passes
  # the check too). A key takes exactly one definition at its highest priority: two
  # definitions, even equal ones, are an error (mergeOneOption).
  sysctlValue = lib.mkOptionType {
    name = "sysctl option value";
    check = v:
      let scalar = x: x == null || builtins.isBool x || builtins.isInt x || builtins.isString x;
      in scalar v || ((v._type or "") == "override" && scalar v.content);
    merge = loc: defs: lib.mergeOneOption loc (lib.filterOverrides defs);
  };
  # For the buffer sizes nixpkgs declares: several definitions resolve to the largest.
  largestWins = types.ints.unsigned // {
    merge = _loc: defs:
      lib.foldl (acc: d: if d.value == null then null else lib.max acc d.value) 0 (lib.filterOverrides defs);
  };
  bufferSize = text: mkOption {
    type = types.nullOr largestWins;
    default = null;
    description = text;
  };

  # ---------------------------------------------------------------- users

  # gids from nixos/modules/misc/ids.nix of the groups nixpkgs always declares.
  standardGids = {
    root = 0;
    wheel = 1;
    kmem = 2;
    tty = 3;
    disk = 6;
    audio = 17;
    floppy = 18;
    uucp = 19;
    lp = 20;
    cdrom = 24;
    tape = 25;
    video = 26;
    dialout = 27;
    utmp = 29;
    adm = 55;
    keys = 96; # declared by systemd.nix; owns /run/keys
    users = 100;
    systemd-network = 152;
    systemd-resolve = 153;
    input = 174;
    kvm = 302;
    render = 303;
    sgx = 304;
    shadow = 318;
    nixbld = 30000;
    nogroup = 65534;
  };

  # DIFFERS: nixpkgs aborts; a throw can be caught by tests.
  shortName = what: x:
    if builtins.stringLength x < 32 then x
    else throw "${what} '${x}' is longer than 31 characters";

  userModule = { name, config, ... }: {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Create the account.";
      };
      name = mkOption {
        type = types.passwdEntry types.str;
        apply = shortName "User name";
        description = "Account name.";
      };
      description = mkOption {
        type = types.passwdEntry types.str;
        default = "";
        description = "GECOS field.";
      };
      uid = mkOption {
        type = types.nullOr types.int;
        default = null;
        description = "UID (null: allocated).";
      };
      isSystemUser = mkOption {
        type = types.bool;
        default = false;
        description = "System account.";
      };
      isNormalUser = mkOption {
        type = types.bool;
        default = false;
        description = "Human account.";
      };
      group = mkOption {
        type = types.str;
        default = "";
        apply = shortName "Group name";
        description = "Primary group.";
      };
      extraGroups = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Supplementary groups.";
      };
      home = mkOption {
        type = types.passwdEntry types.path;
        default = "/var/empty";
        description = "Home directory.";
      };
      homeMode = mkOption {
        type = types.strMatching "[0-7]{1,5}";
        default = "700";
        description = "Home directory mode.";
      };
      createHome = mkOption {
        type = types.bool;
        default = false;
        description = "Create the home directory.";
      };
      shell = mkOption {
        type = types.nullOr (types.either types.shellPackage (types.passwdEntry types.path));
        # DIFFERS: nixpkgs' default is pkgs.shadow (whose shell is nologin).
        default = "/run/current-system/sw/bin/nologin";
        description = "Login shell.";
      };
    };
    config = mkMerge [
      { name = mkDefault name; }
      (mkIf config.isNormalUser {
        group = mkDefault "users";
        createHome = mkDefault true;
        home = mkDefault "/home/${config.name}";
        homeMode = mkDefault "700";
        isSystemUser = mkDefault false;
      })
    ];
  };

  groupModule = { name, config, ... }: {
    options = {
      name = mkOption {
        type = types.passwdEntry types.str;
        description = "Group name.";
      };
      gid = mkOption {
        type = types.nullOr types.int;
        default = null;
        description = "GID (null: allocated).";
      };
      members = mkOption {
        type = types.listOf (types.passwdEntry types.str);
        default = [ ];
        description = "Members besides primary ones.";
      };
    };
    config = {
      name = mkDefault name;
      # As nixpkgs: every enabled user naming this group in extraGroups (a plain
      # definition, so members set elsewhere are added to it).
      members = lib.mapAttrsToList (_: u: u.name)
        (lib.filterAttrs (_: u: u.enable && builtins.elem config.name u.extraGroups) top.users.users);
    };
  };

  hasDuplicates = ids: builtins.length ids != builtins.length (lib.unique ids);
  usersWithUid = lib.filter (u: u.uid != null) (builtins.attrValues top.users.users);
  groupsWithGid = lib.filter (g: g.gid != null) (builtins.attrValues top.users.groups);
  groupNames = lib.mapAttrsToList (_: g: g.name) top.users.groups;

  userAssertions = name: u: [
    {
      assertion = builtins.match "[a-zA-Z0-9_.][a-zA-Z0-9_.-]*" u.name != null;
      message = "users.users.${name}: \"${u.name}\" is not a valid user name";
    }
    {
      assertion = u.isNormalUser && u.uid != null -> u.uid >= 1000;
      message = "users.users.${name}: a normal user (isNormalUser) needs a uid of 1000 or more, not ${toString u.uid}";
    }
    {
      # A uid below 1000 makes an account a system one unless it says isNormalUser.
      assertion =
        let system = u.isSystemUser || (u.uid != null && u.uid < 1000 && !u.isNormalUser);
        in system != u.isNormalUser;
      message = "users.users.${name}: set exactly one of isSystemUser and isNormalUser";
    }
    {
      assertion = u.group != "";
      message = "users.users.${name}: group is not set (declare one, e.g. users.groups.${name} = { })";
    }
    {
      assertion = u.group == "" || builtins.elem u.group groupNames;
      message = "users.users.${name}: its primary group \"${u.group}\" is not declared in users.groups";
    }
  ];

  # ---------------------------------------------------------------- filesystems

  nonEmpty = s: builtins.match "[ \t\n]*" s == null;
  nonEmptyStr = types.addCheck types.str nonEmpty;
  mountPointStr = types.addCheck types.str (s: nonEmpty s && builtins.match ".+/" s == null);
  specialFsTypes = [ "proc" "sysfs" "tmpfs" "ramfs" "devtmpfs" "devpts" ];
  # nixos/lib/utils.nix: mounted from the initrd.
  initrdPaths = [ "/" "/nix" "/nix/store" "/var" "/var/log" "/var/lib" "/var/lib/nixos" "/etc" "/usr" ];
  escapeFstab = builtins.replaceStrings [ " " "\t" ] [ "\\040" "\\011" ];

  fileSystemModule = { name, config, ... }: {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Mount it.";
      };
      mountPoint = mkOption {
        type = mountPointStr;
        default = name;
        description = "Where to mount.";
      };
      device = mkOption {
        type = types.nullOr nonEmptyStr;
        default = null;
        description = "What to mount.";
      };
      fsType = mkOption {
        type = nonEmptyStr;
        default = "auto";
        description = "File system type.";
      };
      options = mkOption {
        type = types.nonEmptyListOf nonEmptyStr;
        default = [ "defaults" ];
        description = "Mount options.";
      };
      depends = mkOption {
        type = types.listOf mountPointStr;
        default = [ ];
        description = "Paths to mount first.";
      };
      label = mkOption {
        type = types.nullOr nonEmptyStr;
        default = null;
        description = "Device by label.";
      };
      neededForBoot = mkOption {
        type = types.bool;
        default = false;
        description = "Mount from the initrd.";
      };
      autoFormat = mkOption {
        type = types.bool;
        default = false;
        description = "Format if empty.";
      };
      autoResize = mkOption {
        type = types.bool;
        default = false;
        description = "Grow before mounting.";
      };
      noCheck = mkOption {
        type = types.bool;
        default = false;
        description = "Skip fsck.";
      };
    };
    config =
      let inInitrd = config.neededForBoot || builtins.elem config.mountPoint initrdPaths;
      in {
        device = mkMerge [
          (mkIf (builtins.elem config.fsType specialFsTypes) (mkDefault config.fsType))
          (mkIf (config.label != null) (mkDefault "/dev/disk/by-label/${escapeFstab config.label}"))
        ];
        # As nixpkgs: these are definitions, so once any applies the ["defaults"]
        # default is gone (e.g. "/" gets [ "x-initrd.mount" ] unless options are set).
        # DIFFERS: `depends` of an initrd mount is only rendered by nixpkgs with the
        # systemd initrd, which is not modelled here (treated as scripted).
        options = mkMerge [
          (mkIf config.autoResize [ "x-systemd.growfs" ])
          (mkIf config.autoFormat [ "x-systemd.makefs" ])
          (mkIf inInitrd [ "x-initrd.mount" ])
          (mkIf (config.depends != [ ] && !inInitrd)
            (map (p: "x-systemd.requires-mounts-for=${p}") config.depends))
        ];
      };
  };

  # ---------------------------------------------------------------- environment.etc

  etcModule = { name, config, options, ... }: {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Generate this file.";
      };
      target = mkOption {
        type = types.str;
        description = "Path under /etc.";
      };
      text = mkOption {
        type = types.nullOr types.lines;
        default = null;
        description = "File contents.";
      };
      source = mkOption {
        type = types.path;
        description = "File to link or copy.";
      };
      mode = mkOption {
        type = types.str;
        default = "symlink";
        description = "symlink, or the mode of a copy.";
      };
      uid = mkOption {
        type = types.int;
        default = 0;
        description = "Owner uid of a copy.";
      };
      gid = mkOption {
        type = types.int;
        default = 0;
        description = "Group gid of a copy.";
      };
      user = mkOption {
        type = types.str;
        default = "+${toString config.uid}";
        description = "Owner of a copy.";
      };
      group = mkOption {
        type = types.str;
        default = "+${toString config.gid}";
        description = "Group of a copy.";
      };
    };
    config = {
      target = mkDefault name;
      # DIFFERS: nixpkgs writes `text` with pkgs.writeText; here `source` becomes a
      # placeholder path (nothing is built), at `text`'s priority as in nixpkgs, so
      # setting both `text` and `source` conflicts as it does on NixOS.
      source = mkIf (config.text != null) (lib.mkDerivedConfig options.text
        (t: placeholderPath "etc-${builtins.replaceStrings [ "/" ] [ "-" ] name}" t));
    };
  };

  # ---------------------------------------------------------------- nix.settings

  nixConfAtom = types.nullOr (types.oneOf [ types.bool types.int types.float types.str types.path types.package ]);
  nixStrings = text: mkOption {
    type = types.listOf types.str;
    description = text;
  };

  canonicalPorts = ports: lib.unique (builtins.sort builtins.lessThan ports);
  portList = text: mkOption {
    type = types.listOf types.port;
    default = [ ];
    apply = canonicalPorts;
    description = text;
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
      internal = true;
      description = "{ assertion; message; } records.";
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
      internal = true;
      description = "Evaluation warnings.";
    };

    networking = {
      hostName = mkOption {
        # A single DNS label (underscores tolerated), or empty for DHCP.
        type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$";
        # nixpkgs: config.system.nixos.distroId, which is "nixos".
        default = "nixos";
        description = "Host name, no domain.";
      };
      domain = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Domain name.";
      };
      firewall = {
        enable = mkOption {
          type = types.bool;
          default = true;
          description = "Stateful firewall.";
        };
        allowedTCPPorts = portList "Open TCP ports (sorted, deduplicated).";
        allowedUDPPorts = portList "Open UDP ports (sorted, deduplicated).";
      };
      primaryIPAddress = mkOption {
        type = types.str;
        default = "";
        internal = true;
        description = "Test node's address for /etc/hosts.";
      };
    };

    boot = {
      kernel.sysctl = mkOption {
        type = types.submodule {
          freeformType = types.attrsOf sysctlValue;
          options."net.core.rmem_max" = bufferSize "Largest receive buffer (largest definition wins).";
          options."net.core.wmem_max" = bufferSize "Largest send buffer (largest definition wins).";
        };
        default = { };
        description = "sysctl keys (quoted, dotted) to values.";
      };
      kernelModules = mkOption {
        # A list, or an attrset of name = bool; names set to true are loaded, sorted by
        # name (lists are turned into attrsets, so mkOrder has no effect).
        type = types.coercedTo (types.listOf types.str)
          (names: lib.genAttrs names (_: true))
          (types.attrsOf types.bool);
        default = { };
        apply = mods: builtins.attrNames (lib.filterAttrs (_: on: on) mods);
        description = "Modules loaded at boot.";
      };
      loader.grub.device = mkOption {
        type = types.str;
        default = "";
        description = "GRUB install device.";
      };
    };

    fileSystems = mkOption {
      type = types.attrsOf (types.submodule fileSystemModule);
      default = { };
      apply = lib.filterAttrs (_: fs: fs.enable);
      description = "Mounts.";
    };

    system = {
      stateVersion = mkOption {
        type = types.str;
        default = lib.trivial.release;
        apply = v:
          lib.warnIf (options.system.stateVersion.highestPrio == (lib.mkOptionDefault { }).priority)
            "system.stateVersion is unset; using ${v}"
            v;
        description = "Release the state is compatible with.";
      };
      build = mkOption {
        type = types.submoduleWith {
          modules = [ { freeformType = types.lazyAttrsOf (types.uniq types.unspecified); } ];
        };
        default = { };
        description = "Build products.";
      };
    };

    users = {
      enforceIdUniqueness = mkOption {
        type = types.bool;
        default = true;
        description = "No two users/groups share an id.";
      };
      users = mkOption {
        type = types.attrsOf (types.submodule userModule);
        default = { };
        description = "Accounts.";
      };
      groups = mkOption {
        type = types.attrsOf (types.submodule groupModule);
        default = { };
        description = "Groups.";
      };
    };

    environment = {
      systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
        description = "Packages in the system profile.";
      };
      variables = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [
          (types.listOf (types.oneOf [ types.int types.str types.path ]))
          types.int
          types.str
          types.path
        ]));
        default = { };
        # null drops a variable; lists are joined with ":"; everything becomes a string.
        apply =
          let asString = v: if builtins.isPath v then "${v}" else toString v;
          in vars: builtins.mapAttrs
            (_: v: if builtins.isList v then lib.concatMapStringsSep ":" asString v else asString v)
            (lib.filterAttrs (_: v: v != null) vars);
        description = "Shell environment variables.";
      };
      etc = mkOption {
        type = types.attrsOf (types.submodule etcModule);
        default = { };
        description = "Files in /etc.";
      };
    };

    systemd = {
      package = mkOption {
        type = types.package;
        description = "systemd (no default here: set it).";
      };
      services = mkOption {
        type = types.attrsOf (types.submodule serviceModule);
        default = { };
        description = "Service units.";
      };
      tmpfiles = {
        rules = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "tmpfiles.d lines.";
        };
        settings = mkOption {
          # file name -> path -> line type -> entry
          type = types.attrsOf (types.attrsOf (types.attrsOf (types.submodule tmpfilesEntry)));
          default = { };
          description = "Structured tmpfiles.d entries.";
        };
      };
      settings.Manager = mkOption {
        type = types.submodule { freeformType = types.attrsOf unitOption; };
        default = { };
        description = "[Manager] of system.conf.";
      };
    };

    security = {
      polkit = {
        enable = mkOption {
          type = types.bool;
          default = false;
          description = "polkit.";
        };
        extraConfig = mkOption {
          type = types.lines;
          default = "";
          description = "Extra rules (JavaScript).";
        };
      };
      pam.loginLimits = mkOption {
        type = types.listOf (types.submodule {
          options = {
            domain = mkOption {
              type = types.str;
              description = "User, @group or wildcard.";
            };
            type = mkOption {
              type = types.enum [ "-" "hard" "soft" ];
              default = "-";
              description = "Limit type.";
            };
            item = mkOption {
              type = types.enum [
                "core" "data" "fsize" "memlock" "nofile" "rss" "stack" "cpu" "nproc" "as"
                "maxlogins" "maxsyslogins" "priority" "locks" "sigpending" "msgqueue" "nice" "rtprio"
              ];
              description = "Limited resource.";
            };
            value = mkOption {
              type = types.oneOf [ types.str types.int ];
              description = "Limit.";
            };
          };
        });
        default = [ ];
        description = "limits.conf entries.";
      };
    };

    # nixos/modules/services/monitoring/prometheus/default.nix and
    # nixos/modules/services/monitoring/grafana.nix: only what the Blixard module sets.
    # DIFFERS: scrape configs and dashboard providers are free-form attribute sets here
    # (nixpkgs: submodules with the Prometheus and Grafana keys typed).
    services.prometheus = {
      enable = mkOption { type = types.bool; default = false; description = "Prometheus."; };
      scrapeConfigs = mkOption {
        type = types.listOf (types.attrsOf types.anything);
        default = [ ];
        description = "Scrape configurations.";
      };
      ruleFiles = mkOption {
        type = types.listOf types.path;
        default = [ ];
        description = "Rule files to load.";
      };
    };
    services.grafana = {
      enable = mkOption { type = types.bool; default = false; description = "Grafana."; };
      provision.enable = mkOption { type = types.bool; default = false; description = "Provisioning."; };
      provision.dashboards.settings.providers = mkOption {
        type = types.listOf (types.attrsOf types.anything);
        default = [ ];
        description = "Dashboard providers.";
      };
    };

    nix = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Nix daemon and nix.conf.";
      };
      # nixos/modules/services/misc/nix-optimise.nix (read by microvm.nix's guest asserts)
      optimise.automatic = mkOption {
        type = types.bool;
        default = false;
        description = "Periodic store optimisation.";
      };
      package = mkOption {
        type = types.package;
        description = "Nix (no default here: set it).";
      };
      settings = mkOption {
        type = types.submodule {
          freeformType = types.attrsOf (types.either nixConfAtom (types.listOf nixConfAtom));
          options = {
            max-jobs = mkOption {
              type = types.either types.int (types.enum [ "auto" ]);
              default = "auto";
              description = "Parallel builds.";
            };
            auto-optimise-store = mkOption {
              type = types.bool;
              default = false;
              description = "Hard-link identical files.";
            };
            cores = mkOption {
              type = types.int;
              default = 0;
              description = "Cores per build.";
            };
            sandbox = mkOption {
              type = types.either types.bool (types.enum [ "relaxed" ]);
              default = true;
              description = "Build sandbox.";
            };
            extra-sandbox-paths = mkOption {
              type = types.listOf types.str;
              default = [ ];
              description = "Host paths in the sandbox.";
            };
            substituters = nixStrings "Binary caches.";
            trusted-substituters = mkOption {
              type = types.listOf types.str;
              default = [ ];
              description = "Caches users may add.";
            };
            require-sigs = mkOption {
              type = types.bool;
              default = true;
              description = "Require signatures.";
            };
            trusted-public-keys = nixStrings "Cache signing keys.";
            trusted-users = nixStrings "Users (or @groups) the daemon trusts.";
            system-features = nixStrings "Features of this machine.";
            allowed-users = mkOption {
              type = types.listOf types.str;
              default = [ "*" ];
              description = "Users (or @groups) allowed to connect.";
            };
          };
        };
        default = { };
        description = "nix.conf settings.";
      };
    };

    virtualisation.memorySize = mkOption {
      type = types.ints.positive;
      default = 1024;
      description = "Test VM memory, MiB.";
    };
  };

  config = {
    # -------- what nixpkgs always defines for these options

    users.groups = builtins.mapAttrs (_: gid: { inherit gid; }) standardGids // {
      # users-groups.nix declares it; its gid is not in the ids.nix read (see the report).
      clock = { };
    };
    users.users = {
      root = {
        uid = 0;
        description = "System administrator";
        home = "/root";
        group = "root";
      };
      nobody = {
        uid = 65534;
        isSystemUser = true;
        description = "Unprivileged account (don't use!)";
        group = "nogroup";
      };
      systemd-network = {
        uid = 152;
        group = "systemd-network";
      };
      systemd-resolve = {
        uid = 153;
        group = "systemd-resolve";
      };
    };

    boot.kernel.sysctl = {
      "kernel.kptr_restrict" = mkDefault 1; # sysctl.nix
      "vm.max_map_count" = mkDefault 1048576; # sysctl.nix
      "kernel.pid_max" = mkDefault 4194304; # systemd.nix, 64-bit hosts only
      "kernel.printk" = mkDefault 4; # kernel.nix (boot.consoleLogLevel)
      "net.ipv4.ping_group_range" = mkDefault "0 2147483647"; # network-interfaces.nix
      "net.ipv6.conf.all.disable_ipv6" = mkDefault false; # network-interfaces.nix
      "net.ipv6.conf.default.disable_ipv6" = mkDefault false; # network-interfaces.nix
    };
    boot.kernelModules = [ "loop" "atkbd" ]; # kernel.nix

    systemd.settings.Manager = {
      DefaultIOAccounting = mkDefault true;
      DefaultIPAccounting = mkDefault true;
    };

    nix.settings = mkIf config.nix.enable {
      trusted-public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      trusted-users = [ "root" ];
      substituters = lib.mkAfter [ "https://cache.nixos.org/" ];
      # nixpkgs adds gccarch-* features on platforms that have them.
      system-features = mkDefault [ "nixos-test" "benchmark" "big-parallel" "kvm" ];
    };

    # -------- checks nixpkgs makes on these options (own messages)

    assertions =
      lib.optionals config.users.enforceIdUniqueness [
        {
          assertion = !hasDuplicates (map (u: u.uid) usersWithUid);
          message = "users.users: two users share a uid";
        }
        {
          assertion = !hasDuplicates (map (g: g.gid) groupsWithGid);
          message = "users.groups: two groups share a gid";
        }
      ]
      ++ lib.concatLists (lib.mapAttrsToList userAssertions config.users.users)
      ++ lib.mapAttrsToList (name: fs: {
        assertion = fs.label != null -> fs.device == "/dev/disk/by-label/${escapeFstab fs.label}";
        message = "fileSystems.\"${name}\": label and device disagree; set only one";
      }) config.fileSystems
      ++ lib.concatLists (lib.mapAttrsToList (name: s: lib.optional
        (builtins.elem "network-interfaces.target" (s.after ++ s.wants))
        {
          assertion = false;
          message = "systemd.services.${name}: network-interfaces.target no longer exists (use network.target)";
        }) config.systemd.services);

    warnings = lib.concatLists (lib.mapAttrsToList (name: s:
      let
        type = s.serviceConfig.Type or "";
        restart = s.serviceConfig.Restart or "no";
        online = "network-online.target";
      in
      lib.optional (type == "oneshot" && builtins.elem restart [ "always" "on-success" ])
        "${name}.service: Type=oneshot cannot have Restart=${restart}"
      ++ lib.optional (s.serviceConfig ? StartLimitInterval)
        "${name}.service: StartLimitInterval in [Service] is deprecated"
      ++ lib.optional (s.reloadIfChanged && s.reloadTriggers != [ ])
        "${name}.service: reloadIfChanged and reloadTriggers are both set"
      ++ lib.optional
        (builtins.elem online s.after && !(builtins.elem online (s.wants ++ s.requires ++ s.bindsTo)))
        "${name}.service is ordered after ${online} but does not depend on it"
    ) config.systemd.services);
  };
}
