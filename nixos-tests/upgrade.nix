# NixOS test "upgrade": day-2 updates of declared VMs by switching generations, as
# `nixos-rebuild switch` does. One node declares `web` and `db` (stand-in runners: scripts
# that print which generation built them and sleep; the daemon only needs
# bin/microvm-run) and has two specialisations:
#   v2: web's runner changes (a new closure), db's does not;
#   v3: web is no longer declared.
# Switching to each (switch-to-configuration test) reloads blixard.service (the declared
# VMs changed, its config did not): web runs the new closure, then is deleted; db keeps
# running untouched, and so does a VM made with `blixard vm create`.
# Needs nixpkgs and KVM: `nix build .#checks.x86_64-linux.upgrade`. Not run in this
# repository's CI; its node is evaluated (eval-test-upgrade-node1) and its script checked
# against the test driver's API (nix/tests/driver).
{ self }:
{
  name = "blixard-upgrade";

  nodes.node1 = { config, lib, pkgs, ... }:
    let
      runner = label: pkgs.writeShellScriptBin "microvm-run" ''
        echo "${label}: ready"
        exec ${pkgs.coreutils}/bin/sleep infinity
      '';
      generation = config.blixardTest.generation;
    in
    {
      imports = [ self.nixosModules.default ];
      options.blixardTest.generation = lib.mkOption {
        type = lib.types.int;
        default = 1;
        description = "Which generation of the declared VMs this system has.";
      };
      config = {
        virtualisation.memorySize = 1024;
        environment.systemPackages = [ pkgs.jq ];
        services.blixard = {
          enable = true;
          init = true;
          listen = "${config.networking.primaryIPAddress}:7000";
          vms.declared = {
            db = { runner = runner "db"; memory = 64; placement = "local"; readyMarker = "db: ready"; };
          } // lib.optionalAttrs (generation < 3) {
            web = {
              runner = runner "web gen${toString generation}";
              memory = 64;
              placement = "local";
              readyMarker = "web gen${toString generation}: ready";
            };
          };
        };
        specialisation = {
          v2.configuration.blixardTest.generation = lib.mkForce 2;
          v3.configuration.blixardTest.generation = lib.mkForce 3;
        };
        # An imperative VM's image.
        environment.etc."blixard-test/manual".source = runner "manual";
      };
    };

  testScript = { nodes, ... }:
    let
      toplevel = nodes.node1.system.build.toplevel;
    in
    ''
      import json

      def phase(vm: str) -> str:
          return json.loads(node1.succeed(f"blixard -o json vm show {vm}"))["phase"]

      def unit_pid(vm: str) -> str:
          return node1.succeed(f"systemctl show -P MainPID 'blixard-vm-default\\x40{vm}.service'").strip()

      def booted(vm: str) -> str:
          return node1.succeed(f"cat /var/lib/blixard/vms/default@{vm}/booted/bin/microvm-run")

      def switch(to: str) -> None:
          node1.succeed("${toplevel}/specialisation/" + to + "/bin/switch-to-configuration test")

      node1.start()
      node1.wait_for_unit("blixard.service")

      with subtest("generation 1: both declared VMs run"):
          node1.wait_until_succeeds("test \"$(blixard -o json vm show web | jq -r .phase)\" = ready", timeout=120)
          node1.wait_until_succeeds("test \"$(blixard -o json vm show db | jq -r .phase)\" = ready", timeout=120)
          assert "web gen1" in booted("web")
          node1.succeed("blixard image import $(readlink -f /etc/blixard-test/manual) --name manual")
          node1.succeed("blixard vm create manual --image manual --memory 64 --wait running")
          db, manual = unit_pid("db"), unit_pid("manual")
          daemon = node1.succeed("systemctl show -P MainPID blixard.service").strip()

      with subtest("generation 2: web runs its new closure; the rest is untouched"):
          switch("v2")
          node1.wait_until_succeeds("grep -q 'web gen2' /var/lib/blixard/vms/default@web/booted/bin/microvm-run", timeout=120)
          node1.wait_until_succeeds("test \"$(blixard -o json vm show web | jq -r .phase)\" = ready", timeout=120)
          assert unit_pid("db") == db and unit_pid("manual") == manual
          # only the declared VMs changed: the daemon was reloaded, not restarted
          assert node1.succeed("systemctl show -P MainPID blixard.service").strip() == daemon
          node1.succeed("journalctl -u blixard.service | grep -q 'reloaded the declared VMs'")

      with subtest("generation 3: web is deleted; the rest is untouched"):
          switch("v3")
          node1.wait_until_succeeds("! blixard vm show web", timeout=120)
          node1.fail("systemctl is-active 'blixard-vm-default\\x40web.service'")
          assert unit_pid("db") == db and unit_pid("manual") == manual
          assert phase("db") == "ready" and phase("manual") in ("running", "ready")
    '';
}
