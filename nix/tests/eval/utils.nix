# Stand-in for the NixOS module argument `utils` (nixpkgs' nixos/lib/utils.nix): the
# functions the Blixard module calls, with nixpkgs' semantics (NIXOS-OPTIONS.md, "utils.nix")
# written anew.
{ lib }:
let
  inherit (builtins) isPath isString isInt isFloat toJSON replaceStrings filter
    concatStringsSep stringLength substring genList;

  # One argument of an Exec*= line: quoted (JSON), with `%` (specifiers) and `$`
  # (variables) doubled, so systemd passes it through verbatim.
  escapeSystemdExecArg = arg:
    let
      s =
        if isPath arg then "${arg}"
        else if isString arg then arg
        else if isInt arg || isFloat arg || lib.isDerivation arg then toString arg
        else throw "escapeSystemdExecArg only allows strings, paths, numbers and derivations";
    in
    replaceStrings [ "%" "$" ] [ "%%" "$$" ] (toJSON s);

  # The unit name systemd gives a path (`systemd-escape --path`): the path normalised,
  # then `/` between components as `-`, and other special characters (and a leading `.`)
  # as \xNN.
  escapeSystemdPath = path:
    let
      parts = filter (p: p != "" && p != ".") (lib.splitString "/" path);
      normal =
        if lib.any (p: p == "..") parts then throw "escapeSystemdPath: ${path} is not a normalized path"
        else parts;
      special = lib.stringToCharacters "!\"#$%&'()*+,;<=>?@[\\]^`{|}~- ";
      hex = c: "\\x${lib.toLower (lib.toHexString (lib.strings.charToInt c))}";
      escapeChar = c: if lib.elem c special then hex c else c;
      escapePart = p:
        let chars = lib.stringToCharacters p; in
        concatStringsSep "" (genList (i:
          let c = builtins.elemAt chars i; in
          if i == 0 && c == "." then hex c else escapeChar c) (builtins.length chars));
    in
    if normal == [ ] then "-" else concatStringsSep "-" (map escapePart normal);
in
{
  inherit escapeSystemdExecArg escapeSystemdPath;
  escapeSystemdExecArgs = args: concatStringsSep " " (map escapeSystemdExecArg args);
}
