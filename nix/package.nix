# The blixard binary (daemon + CLI). Used by the flake and as the module's default package.
{ lib, rustPlatform }:
let
  root = ../.;
  # The workspace without build output, the fuzz crate (its own Cargo.lock; not a
  # workspace member) and the Nix files (editing the module does not rebuild the binary).
  src = lib.cleanSourceWith {
    src = lib.cleanSource root;
    filter = path: type:
      let rel = lib.removePrefix (toString root + "/") (toString path); in
      !(lib.hasPrefix "fuzz" rel
        || lib.hasPrefix "target" rel
        || lib.hasPrefix "nix" rel
        || lib.hasPrefix "modules" rel
        || lib.hasPrefix "hosts" rel
        || lib.hasPrefix "nixos-tests" rel
        || lib.hasPrefix "templates" rel
        || lib.hasSuffix ".nix" rel
        || rel == "flake.lock");
  };
in
rustPlatform.buildRustPackage {
  pname = "blixard";
  version = (lib.importTOML ../Cargo.toml).workspace.package.version;
  inherit src;
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "--bin" "blixard" ];
  # The integration tests start clusters over UDP; the build sandbox has no network.
  doCheck = false;
  meta = {
    description = "Blixard microVM cluster daemon and CLI";
    mainProgram = "blixard";
    license = with lib.licenses; [ mit asl20 ];
    platforms = lib.platforms.linux;
  };
}
