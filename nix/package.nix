# The blixard binary (daemon + CLI). Used by the flake and as the module's default package.
{ lib, stdenv, rustPlatform, installShellFiles }:
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
  nativeBuildInputs = [ installShellFiles ];
  # Shell completions and man pages, from the binary itself (clap_complete, clap_mangen).
  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installShellCompletion --cmd blixard \
      --bash <($out/bin/blixard completions bash) \
      --zsh <($out/bin/blixard completions zsh) \
      --fish <($out/bin/blixard completions fish)
    $out/bin/blixard man --out man
    installManPage man/*.1
  '';
  meta = {
    description = "Blixard microVM cluster daemon and CLI";
    mainProgram = "blixard";
    license = with lib.licenses; [ mit asl20 ];
    platforms = lib.platforms.linux;
  };
}
