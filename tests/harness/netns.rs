//! Network namespaces for the stability suite: every daemon in a namespace of its own,
//! joined by a bridge in a hub namespace (where the test process talks from) or kept
//! behind a NAT router, with iptables rules for partitions.
//!
//! Needs root, `ip` (iproute2), `nsenter` (util-linux) and `iptables`. Anything missing
//! fails the test loudly: CI runs as root, so a skip would hide a broken suite.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use crate::alive;

/// The hub's address: the test process, the proxy and the relay live there.
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The port every daemon listens on, each in its own namespace.
pub const NODE_PORT: u16 = 7000;
/// Where the relay listens, in the hub.
pub const RELAY_PORT: u16 = 3340;
/// Namespaces this suite makes start with this, then the owner's pid.
const PREFIX: &str = "bxs";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// How the nodes reach each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One bridge: every node and the hub on 10.77.0.0/24.
    Bridge,
    /// The bridge, with each node's packets to another node sent to the hub's UDP
    /// proxy instead (DNAT), which forwards them with latency and loss.
    Proxied,
    /// Each node alone behind a NAT router (MASQUERADE) whose only way out is TCP to the
    /// relay in the hub: nodes reach each other through the relay alone. The hub reaches
    /// every node (an operator's management network); nodes never reach each other.
    Nat,
}

/// One node's place in the network.
#[derive(Clone, Debug)]
pub struct Place {
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The NAT router in front of it ([`Topology::Nat`]).
    pub router: Option<String>,
}

impl Place {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, NODE_PORT))
    }
}

/// A set of namespaces, deleted (with every process left in them) when dropped.
pub struct Net {
    pub topology: Topology,
    pub hub: String,
    pub nodes: Vec<Place>,
    owned: Vec<String>,
}

/// The proxy port that node `from`'s packets to node `to` are sent to (0-based indexes).
pub fn proxy_port(from: usize, to: usize) -> u16 {
    20000 + 100 * from as u16 + to as u16
}

/// Runs a command, failing the test with its output when it fails.
pub fn run(program: &str, args: &[&str]) {
    if let Err(e) = try_run(program, args) {
        panic!("{e}");
    }
}

/// Runs a command; an `Err` carries what it said.
pub fn try_run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `iptables ARGS` inside namespace `ns`.
pub fn iptables(ns: &str, args: &[&str]) -> Result<String, String> {
    let net = format!("--net=/run/netns/{ns}");
    let mut all = vec![net.as_str(), "--", "iptables", "-w"];
    all.extend_from_slice(args);
    try_run("nsenter", &all)
}

/// Fails the test, loudly, where namespaces cannot be made (not root, no iproute2).
pub fn require() {
    let root = rustix::process::geteuid().is_root();
    assert!(
        root,
        "the stability suite needs root (network namespaces, iptables); CI runs as root. \
         Run it as root (scripts/stability.sh), not without it"
    );
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("iptables", "iptables"),
    ] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        assert!(
            found,
            "the stability suite needs `{tool}` (apt-get install {package}; scripts/test.sh does)"
        );
    }
}

/// Deletes namespaces left by suites whose process died without cleaning up.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !alive(pid) {
            kill_all_in(&name);
            let _ = try_run("ip", &["netns", "del", &name]);
        }
    }
}

/// SIGKILLs every process in namespace `ns` (only processes this suite started live there).
fn kill_all_in(ns: &str) {
    if let Ok(pids) = try_run("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

impl Net {
    /// Makes the hub and one namespace per node (plus a router each behind a NAT).
    pub fn new(topology: Topology, nodes: usize) -> Net {
        require();
        sweep_stale();
        let id = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}x{id}", std::process::id());
        let hub = format!("{prefix}h");
        let mut net = Net {
            topology,
            hub: hub.clone(),
            nodes: Vec::new(),
            owned: Vec::new(),
        };
        net.add_ns(&hub);
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        run(
            "ip",
            &[
                "-n",
                &hub,
                "addr",
                "add",
                &format!("{HUB_IP}/24"),
                "dev",
                "br0",
            ],
        );
        run("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        for i in 0..nodes {
            let ns = format!("{prefix}n{}", i + 1);
            net.add_ns(&ns);
            let place = match topology {
                Topology::Bridge | Topology::Proxied => {
                    let ip = Ipv4Addr::new(10, 77, 0, 11 + i as u8);
                    net.plug(&ns, &format!("v{i}"), "eth0", ip);
                    Place {
                        ns,
                        ip,
                        router: None,
                    }
                }
                Topology::Nat => net.behind_nat(&prefix, i, ns),
            };
            net.nodes.push(place);
        }
        if topology == Topology::Proxied {
            net.proxy_rules();
        }
        net
    }

    fn add_ns(&mut self, ns: &str) {
        run("ip", &["netns", "add", ns]);
        self.owned.push(ns.to_string());
        run("ip", &["-n", ns, "link", "set", "lo", "up"]);
    }

    /// A veth from the hub's bridge (`hub_end`) to `inner` in `ns`, addressed `ip/24`.
    fn plug(&self, ns: &str, hub_end: &str, inner: &str, ip: Ipv4Addr) {
        let hub = self.hub.as_str();
        run(
            "ip",
            &[
                "-n", hub, "link", "add", hub_end, "type", "veth", "peer", "name", inner, "netns",
                ns,
            ],
        );
        run(
            "ip",
            &["-n", hub, "link", "set", hub_end, "master", "br0", "up"],
        );
        run(
            "ip",
            &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", inner],
        );
        run("ip", &["-n", ns, "link", "set", inner, "up"]);
    }

    /// Node `i` on 10.78.<i+1>.2 behind router 10.77.0.<11+i> (MASQUERADE). The router
    /// forwards only TCP to the relay out, and the hub's connections in.
    fn behind_nat(&mut self, prefix: &str, i: usize, ns: String) -> Place {
        let router = format!("{prefix}r{}", i + 1);
        self.add_ns(&router);
        let wan = Ipv4Addr::new(10, 77, 0, 11 + i as u8);
        self.plug(&router, &format!("v{i}"), "wan", wan);
        let lan_net = i as u8 + 1;
        let gw = Ipv4Addr::new(10, 78, lan_net, 1);
        let ip = Ipv4Addr::new(10, 78, lan_net, 2);
        run(
            "ip",
            &[
                "-n", &router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                "lan",
            ],
        );
        run("ip", &["-n", &router, "link", "set", "lan", "up"]);
        run(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        run(
            "ip",
            &["-n", &ns, "route", "add", "default", "via", &gw.to_string()],
        );
        // The hub reaches the node's LAN through its router (management access only:
        // the hub does not forward, so no node reaches another this way).
        run(
            "ip",
            &[
                "-n",
                &self.hub,
                "route",
                "add",
                &format!("10.78.{lan_net}.0/24"),
                "via",
                &wan.to_string(),
            ],
        );
        run(
            "nsenter",
            &[
                &format!("--net=/run/netns/{router}"),
                "--",
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        let hub_ip = HUB_IP.to_string();
        let relay_port = RELAY_PORT.to_string();
        let rules: [&[&str]; 5] = [
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ],
            &[
                "-A", "FORWARD", "-i", "wan", "-o", "lan", "-s", &hub_ip, "-j", "ACCEPT",
            ],
            &[
                "-A",
                "FORWARD",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
            &[
                "-A",
                "FORWARD",
                "-i",
                "lan",
                "-o",
                "wan",
                "-p",
                "tcp",
                "-d",
                &hub_ip,
                "--dport",
                &relay_port,
                "-j",
                "ACCEPT",
            ],
            &["-A", "FORWARD", "-j", "DROP"],
        ];
        for rule in rules {
            iptables(&router, rule).unwrap_or_else(|e| panic!("{e}"));
        }
        Place {
            ns,
            ip,
            router: Some(router),
        }
    }

    /// Sends each node's packets for another node to the hub's proxy port for that pair.
    fn proxy_rules(&self) {
        for (i, from) in self.nodes.iter().enumerate() {
            for (j, to) in self.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                let dest = format!("{HUB_IP}:{}", proxy_port(i, j));
                let rule = [
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "udp",
                    "-d",
                    &to.ip.to_string(),
                    "--dport",
                    &NODE_PORT.to_string(),
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &dest,
                ];
                iptables(&from.ns, &rule).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    /// Moves the calling thread into the hub until the guard is dropped. Sockets the
    /// thread opens, threads it starts and processes it spawns stay in the hub.
    pub fn enter_hub(&self) -> NsGuard {
        enter(&self.hub)
    }

    /// Drops every packet node `from` sends to node `to` (0-based) until healed.
    pub fn cut(&self, from: usize, to: usize) -> Cut {
        let mut cut = Cut { rules: Vec::new() };
        cut.add(&self.nodes[from].ns, &self.nodes[to].ip);
        cut
    }

    /// Drops every packet between `node` and every other node, both ways.
    pub fn isolate(&self, node: usize) -> Cut {
        let mut cut = Cut { rules: Vec::new() };
        for other in (0..self.nodes.len()).filter(|o| *o != node) {
            cut.add(&self.nodes[node].ns, &self.nodes[other].ip);
            cut.add(&self.nodes[other].ns, &self.nodes[node].ip);
        }
        cut
    }

    /// Packets the NAT routers refused to forward (direct attempts between nodes).
    pub fn nat_drops(&self) -> u64 {
        self.nodes
            .iter()
            .filter_map(|p| p.router.as_ref())
            .filter_map(|r| iptables(r, &["-L", "FORWARD", "-v", "-n", "-x"]).ok())
            .flat_map(|text| {
                text.lines()
                    .filter(|l| l.split_whitespace().nth(2) == Some("DROP"))
                    .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.owned.iter().rev() {
            kill_all_in(ns);
            let _ = try_run("ip", &["netns", "del", ns]);
        }
    }
}

/// Restores the thread's namespace when dropped.
pub struct NsGuard {
    previous: File,
}

/// Moves the calling thread into namespace `ns`.
pub fn enter(ns: &str) -> NsGuard {
    let previous = File::open("/proc/thread-self/ns/net").unwrap();
    let target =
        File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
    move_into_link_name_space(target.as_fd(), Some(LinkNameSpaceType::Network))
        .unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
    NsGuard { previous }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = move_into_link_name_space(self.previous.as_fd(), Some(LinkNameSpaceType::Network));
    }
}

/// iptables DROP rules in the senders' OUTPUT chains, removed when healed or dropped.
pub struct Cut {
    rules: Vec<(String, String)>,
}

impl Cut {
    fn add(&mut self, ns: &str, to: &Ipv4Addr) {
        let to = to.to_string();
        iptables(ns, &["-I", "OUTPUT", "-d", &to, "-j", "DROP"]).unwrap_or_else(|e| panic!("{e}"));
        self.rules.push((ns.to_string(), to));
    }

    /// Removes the rules.
    pub fn heal(self) {}
}

impl Drop for Cut {
    fn drop(&mut self) {
        for (ns, to) in self.rules.drain(..) {
            if let Err(e) = iptables(&ns, &["-D", "OUTPUT", "-d", &to, "-j", "DROP"]) {
                eprintln!("warning: healing a partition: {e}");
            }
        }
    }
}
