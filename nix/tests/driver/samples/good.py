# Uses the driver API correctly: check.py must accept it (nodes node1,node2,node3).
import json

start_all()
node1.wait_for_unit("multi-user.target")
for m in [node2, node3]:
    m.wait_for_open_port(7000, timeout=60)
with subtest("status"):
    status = json.loads(node1.succeed("blixard -o json cluster status"))
    rc, out = node2.execute("true", check_return=True, timeout=None)
    assert rc == 0, out
    node3.wait_until_succeeds("true", timeout=10)
node3.crash()
node2.reboot()
node1.copy_from_host("/etc/hostname", "/tmp/hostname")
t.assertEqual(node1.get_unit_property("blixard.service", "ActiveState"), "active")
vlan1.stop()
