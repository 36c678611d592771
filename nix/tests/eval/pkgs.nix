# Stand-in for the parts of nixpkgs' package set that the Blixard module, its hosts and
# its tests use. Packages are real derivations (builtins.derivation), so they have store
# paths, drvPaths and string context like real ones, but they are never built: the
# harness only evaluates. `formats.toml` has nixpkgs' value type (pkgs-lib/formats.nix);
# its `generate` keeps the value readable (`.value`) instead of running remarshal.
{ lib }:
let
  system = "x86_64-linux";

  # A derivation that is never built; `attrs` become its environment (so different
  # contents give different store paths) and `extra` is added on top (meta, passthru).
  stub = name: attrs: extra:
    (builtins.derivation ({
      inherit name system;
      builder = "/bin/sh";
      args = [ "-c" "echo 'blixard eval harness: not buildable' >&2; exit 1" ];
    } // attrs)) // extra;

  package = pname: version: stub "${pname}-${version}" { } {
    inherit pname version;
    meta.mainProgram = pname;
  };

  tomlValue =
    let
      valueType = lib.types.oneOf [
        lib.types.bool
        lib.types.int
        lib.types.float
        lib.types.str
        lib.types.path
        (lib.types.attrsOf valueType)
        (lib.types.listOf valueType)
      ] // { description = "TOML value"; };
    in
    valueType;

  writeText = name: text: stub name { inherit text; } { inherit text; };
  writeTextFile = { name, text, executable ? false, destination ? "", ... }:
    stub name { inherit text destination; executable = if executable then "1" else ""; } { inherit text; };
  writeShellScript = name: text: writeTextFile { inherit name text; executable = true; };
  writeShellScriptBin = name: text:
    writeTextFile { inherit name text; executable = true; destination = "/bin/${name}"; }
    // { meta.mainProgram = name; };

  runCommand = name: env: script: stub name (env // { inherit script; }) { };

  self = {
    inherit lib system runCommand writeText writeTextFile writeShellScript writeShellScriptBin;
    # `pkgs.path + "/nixos/lib/eval-config.nix"`: the harness' own (guests).
    path = ./nixpkgs;
    stdenv.hostPlatform = { inherit system; isLinux = true; isx86_64 = true; };
    formats.toml = { }: {
      type = tomlValue;
      generate = name: value: stub name { json = builtins.toJSON value; } { inherit value; };
    };
    # The Blixard package the module defaults to (nix/package.nix, not built here).
    callPackage = fn: args:
      if fn == ../../package.nix then self.blixard
      else throw "eval harness: callPackage of ${toString fn} is not stood in";
    blixard = package "blixard" "0.1.0";
    nix = package "nix" "2.31.2";
    systemd = package "systemd" "258.3";
    util-linux = package "util-linux" "2.41";
    iproute2 = package "iproute2" "6.16.0";
    coreutils = package "coreutils" "9.7";
    lvm2 = package "lvm2" "2.03.34";
    thin-provisioning-tools = package "thin-provisioning-tools" "1.1.0";
    jq = package "jq" "1.8.1";
    shadow = package "shadow" "4.18.0";
  };
in
self
