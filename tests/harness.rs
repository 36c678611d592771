//! A harness for process tests: starts real `blixard` daemons in temp dirs on loopback
//! and drives them through the real CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `blixard` binary: `BLIXARD_BIN`, or the one next to this test's target dir.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("BLIXARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/blixard
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("blixard");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bin blixard` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A free UDP port on loopback.
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, or fails the test after `timeout` with `what` and
/// the last thing observed.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` runs (a zombie does not: in a container nobody may reap it).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// The pid namespace path of process `pid` (`pid:[inode]`), as a string.
pub fn pid_ns(pid: u32) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    Some(link.to_string_lossy().into_owned())
}

/// The `NSpid` line of `/proc/<pid>/status`: the process's pid in each pid namespace it
/// is in, outermost (the caller's) first.
pub fn proc_nspid(pid: u32) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// The parent of process `pid`.
fn proc_ppid(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// The pids of all processes, as this process sees them.
fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A descendant of `ancestor` whose pid in its own pid namespace is `inner`: a process
/// started through a wrapper such as `nsenter`, found by the pid it reports.
pub fn descendant_with_inner_pid(ancestor: u32, inner: u32) -> Option<u32> {
    all_pids().into_iter().find(|&pid| {
        pid != ancestor
            && proc_nspid(pid).is_some_and(|ns| ns.last() == Some(&inner))
            && std::iter::successors(proc_ppid(pid), |&p| proc_ppid(p))
                .take(64)
                .take_while(|&p| p != 0)
                .any(|p| p == ancestor)
    })
}

/// One `blixard node run` process and its data dir.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    pub extra: Vec<String>,
    /// A command prefix the daemon runs under (`run_expect_exit` too), e.g.
    /// `SystemdNs::wrap`'s `nsenter -t PID -a --`. The daemon then writes its pid as seen
    /// in its own pid namespace to `node.json`; `child` is the wrapper, and `pid`, `kill9`
    /// and `stop` act on the daemon's host pid.
    pub wrap: Option<Vec<String>>,
    /// A wrapped daemon's pid in this process's pid namespace, while it runs.
    wrapped_pid: Option<u32>,
}

impl Node {
    pub fn new(root: &Path, name: &str) -> Self {
        let dir = root.join(name);
        Self {
            name: name.to_string(),
            dir,
            port: free_port(),
            child: None,
            extra: Vec::new(),
            wrap: None,
            wrapped_pid: None,
        }
    }

    /// `blixard`, or the wrapper running it.
    fn command(&self) -> Command {
        match &self.wrap {
            Some(wrap) => {
                let (program, args) = wrap.split_first().expect("an empty wrap");
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary());
                cmd
            }
            None => Command::new(binary()),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where this node unpacks images.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.with_extension("store")
    }

    /// Per-node settings that must differ between nodes on one host, unless the test
    /// sets them itself: the binary cache on an ephemeral port, a store dir of its own.
    fn defaults(&self, args: &[&str]) -> Vec<String> {
        let given = |flag: &str| {
            args.iter()
                .chain(
                    self.extra
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .iter(),
                )
                .any(|a| a.starts_with(flag))
        };
        let mut out = Vec::new();
        if !given("--cache-listen") {
            out.extend(["--cache-listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        if !given("--store-dir") {
            out.extend([
                "--store-dir".to_string(),
                self.store_dir().display().to_string(),
            ]);
        }
        out
    }

    /// Starts the daemon with `args` after the common ones.
    pub fn start(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = self.command();
        cmd.arg("node")
            .arg("run")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--name")
            .arg(&self.name)
            .args(self.defaults(args))
            .args(&self.extra)
            .args(args)
            // BLIXARD_TEST_LOG (e.g. `debug`) sets the daemons' log filter for a run.
            .env(
                "BLIXARD_LOG",
                std::env::var("BLIXARD_TEST_LOG").unwrap_or_else(|_| "info,raft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = cmd.spawn().unwrap();
        // Serving once node.json names this process (wrapped: a descendant of the
        // wrapper with that pid in its own pid namespace).
        let pid = child.id();
        let wrapped = self.wrap.is_some();
        let info = self.dir.join("node.json");
        let log_path = self.log_path();
        let name = self.name.clone();
        let started = wait_for(&format!("{name} to serve"), Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Ok(Err(format!("{name} exited with {status}: {log}")));
            }
            let text = std::fs::read_to_string(&info).map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            if wrapped {
                let inner = v["pid"]
                    .as_u64()
                    .and_then(|p| u32::try_from(p).ok())
                    .ok_or(format!("no pid in {text}"))?;
                match descendant_with_inner_pid(pid, inner) {
                    Some(host) => Ok(Ok(Some(host))),
                    None => Err("node.json of an earlier run".into()),
                }
            } else if v["pid"].as_u64() == Some(u64::from(pid)) {
                Ok(Ok(None))
            } else {
                Err("node.json of an earlier run".into())
            }
        });
        self.child = Some(child);
        self.wrapped_pid = started.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs the daemon expecting it to fail; returns (exit code, output).
    pub fn run_expect_exit(&self, args: &[&str]) -> (i32, String) {
        let log = self.dir.with_extension("expect-exit.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut child = self
            .command()
            .arg("node")
            .arg("run")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "expected {} to exit, but it kept running: {}",
                    self.name,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (
            status.code().unwrap_or(-1),
            std::fs::read_to_string(&log).unwrap_or_default(),
        )
    }

    /// Waits for the daemon to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let name = self.name.clone();
        let child = self.child.as_mut().expect("not running");
        let code = wait_for(&format!("{name} to exit"), timeout, || {
            match child.try_wait() {
                Ok(Some(status)) => Ok(status.code().unwrap_or(-1)),
                Ok(None) => Err("still running".into()),
                Err(e) => Err(e.to_string()),
            }
        });
        self.child = None;
        self.wrapped_pid = None;
        code
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Some(pid) = self.wrapped_pid.take() else {
            child.kill().unwrap();
            child.wait().unwrap();
            return;
        };
        // While the wrapper runs, the daemon (its child) is alive or an unreaped zombie,
        // so its pid is not reused; the wrapper exits once the daemon has.
        if child.try_wait().unwrap().is_none() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        let pid = self.pid().expect("not running");
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        self.wait_exit(Duration::from_secs(30))
    }

    /// Runs the CLI against this node's data dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--timeout")
            .arg("10")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs the CLI and returns stdout, failing the test on a non-zero exit.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "blixard {args:?} on {} failed ({:?}): {}",
            self.name,
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like `cli`, but a failure is an `Err` with the message (for `wait_for`).
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = self.cli(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    pub fn status(&self, stale: bool) -> Result<Value, String> {
        let mut args = vec!["cluster", "status", "--output", "json"];
        if stale {
            args.push("--stale");
        }
        let out = self.try_cli(&args)?;
        serde_json::from_str(&out).map_err(|e| e.to_string())
    }

    /// The daemon's process id, while it runs (wrapped: its pid in this process's pid
    /// namespace, not the one in `node.json`).
    pub fn pid(&self) -> Option<u32> {
        match self.wrap {
            Some(_) => self.child.as_ref().and(self.wrapped_pid),
            None => self.child.as_ref().map(Child::id),
        }
    }

    /// The `node.json` the running daemon wrote (node id, endpoint id, addresses, pid).
    pub fn info(&self) -> Result<Value, String> {
        let text =
            std::fs::read_to_string(self.dir.join("node.json")).map_err(|e| e.to_string())?;
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }

    /// Waits until this node, reading linearizably, counts `n` voters.
    pub fn wait_voters(&self, n: usize) {
        wait_for(
            &format!("{} to count {n} voters", self.name),
            Duration::from_secs(60),
            || {
                let s = self.status(false)?;
                match s["raft"]["voters"].as_array().map(Vec::len) {
                    Some(v) if v == n => Ok(()),
                    _ => Err(s.to_string()),
                }
            },
        );
    }

    /// Waits until this node knows a leader (read locally).
    pub fn wait_knows_leader(&self, within: Duration) {
        wait_for(&format!("{} to know the leader", self.name), within, || {
            let s = self.status(true)?;
            s["raft"]["leader"]
                .as_u64()
                .map(|_| ())
                .ok_or(s.to_string())
        });
    }

    pub fn meta(&self, stale: bool) -> Result<Value, String> {
        let mut args = vec!["cluster", "meta", "get", "--output", "json"];
        if stale {
            args.push("--stale");
        }
        serde_json::from_str(&self.try_cli(&args)?).map_err(|e| e.to_string())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A cluster of nodes under one temp dir.
pub struct Cluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes: the first with `--init`, the others joining with fresh tokens,
    /// and waits until all are voters.
    pub fn start(n: usize, extra: &[&str]) -> Self {
        let root = tempfile::Builder::new()
            .prefix("blixard-test")
            .tempdir()
            .unwrap();
        let mut nodes: Vec<Node> = (1..=n)
            .map(|i| Node::new(root.path(), &format!("n{i}")))
            .collect();
        for node in &mut nodes {
            node.extra = extra.iter().map(|s| s.to_string()).collect();
        }
        nodes[0].start(&["--init"]);
        let mut cluster = Self { root, nodes };
        for i in 1..n {
            let ticket = cluster.token();
            cluster.nodes[i].start(&["--join", &ticket]);
        }
        cluster.wait_voters(n);
        cluster
    }

    pub fn token(&self) -> String {
        self.nodes[0]
            .cli_ok(&["cluster", "token", "create", "--ttl", "5m"])
            .trim()
            .to_string()
    }

    /// Waits until `n` members are voters, as seen (linearizably) from the first node.
    pub fn wait_voters(&self, n: usize) {
        let node = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        wait_for(&format!("{n} voters"), Duration::from_secs(60), || {
            let s = node.status(false)?;
            let voters = s["raft"]["voters"].as_array().map(|v| v.len()).unwrap_or(0);
            let members = s["members"].as_array().map(|m| m.len()).unwrap_or(0);
            if voters == n && members == n {
                Ok(())
            } else {
                Err(format!("{voters} voters, {members} members: {s}"))
            }
        });
    }

    /// The current leader's index in `nodes`, agreed by every running node.
    pub fn leader(&self) -> usize {
        wait_for("a leader", Duration::from_secs(60), || {
            let mut leader = None;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let s = node.status(true)?;
                let l = s["raft"]["leader"]
                    .as_u64()
                    .ok_or(format!("{} sees no leader", node.name))?;
                if leader.is_some_and(|x| x != l) {
                    return Err(format!("nodes disagree on the leader: {leader:?} vs {l}"));
                }
                leader = Some(l);
            }
            let l = leader.ok_or("no node running")?;
            let idx = (l - 1) as usize;
            if self.nodes.get(idx).is_some_and(|n| n.child.is_some()) {
                Ok(idx)
            } else {
                Err(format!("leader n{l} is not running"))
            }
        })
    }
}

/// A `kB` field (`VmRSS`, `VmHWM`, ...) of `/proc/<pid>/status`, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// User plus system CPU time a process has used, in clock ticks (`/proc/<pid>/stat`).
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = text
        .get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU time, in clock ticks, the processes `pids` have used (those still running).
pub fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| proc_cpu_ticks(*p)).sum()
}

/// The kernel's clock ticks per second, the unit of [`proc_cpu_ticks`].
pub fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// What benchmarks print about the machine they ran on.
pub mod bench {
    use std::path::{Path, PathBuf};
    use std::time::SystemTime;

    pub fn read_first_line_with(path: &str, prefix: &str) -> Option<String> {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    }

    /// The mount (device, mount point, fs type) holding `path`: the longest matching prefix.
    pub fn mount_of(path: &Path) -> Option<(String, String, String)> {
        let path = path.canonicalize().ok()?;
        let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
        mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((
                    f.first()?.to_string(),
                    f.get(1)?.to_string(),
                    f.get(2)?.to_string(),
                ))
            })
            .filter(|(_, mnt, _)| path.starts_with(mnt))
            .max_by_key(|(_, mnt, _)| mnt.len())
    }

    /// What kind of disk a block device is, as far as sysfs tells.
    pub fn disk_kind(device: &str) -> String {
        let Some(name) = device.strip_prefix("/dev/") else {
            return "not a block device".into();
        };
        // vda1 -> vda, nvme0n1p1 -> nvme0n1, sda1 -> sda.
        let base = if Path::new(&format!("/sys/block/{name}")).exists() {
            name.to_string()
        } else if name.starts_with("nvme") {
            name.rsplit_once('p').map_or(name, |(b, _)| b).to_string()
        } else {
            name.trim_end_matches(|c: char| c.is_ascii_digit())
                .to_string()
        };
        let rotational = std::fs::read_to_string(format!("/sys/block/{base}/queue/rotational"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        let bus = if base.starts_with("vd") {
            "virtio-blk (virtual; rotational flag not meaningful)"
        } else if base.starts_with("nvme") {
            "NVMe"
        } else if base.starts_with("sd") {
            "SCSI/SATA"
        } else {
            "unknown bus"
        };
        format!("{bus}, rotational={rotational}")
    }

    pub fn machine(data_root: &Path) -> String {
        let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
        let model =
            read_first_line_with("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into());
        let mem_gib = proc_meminfo_kib("MemTotal").map_or(f64::NAN, |k| k as f64 / 1024.0 / 1024.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        let disk = match mount_of(data_root) {
            Some((dev, mnt, fs)) => {
                format!("data dirs on {dev} ({fs} at {mnt}; {})", disk_kind(&dev))
            }
            None => "data dirs on an unknown mount".into(),
        };
        format!("{nproc} CPUs ({model}), {mem_gib:.1} GiB RAM, Linux {kernel}, {disk}")
    }

    pub fn proc_meminfo_kib(field: &str) -> Option<u64> {
        read_first_line_with("/proc/meminfo", field)?
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// Warns when the daemon binary is older than the sources it is built from.
    pub fn check_binary_fresh(bin: &Path) {
        if std::env::var_os("BLIXARD_BIN").is_some() {
            return;
        }
        let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
            return;
        };
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut newest: Option<(SystemTime, PathBuf)> = None;
        let mut stack = vec![root.join("crates")];
        for f in ["Cargo.toml", "Cargo.lock"] {
            stack.push(root.join(f));
        }
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
                }
            } else if let Ok(m) = std::fs::metadata(&p).and_then(|m| m.modified()) {
                if newest.as_ref().is_none_or(|(t, _)| m > *t) {
                    newest = Some((m, p));
                }
            }
        }
        if let Some((t, p)) = newest {
            if t > built {
                eprintln!(
                    "warning: {} is newer than {}; run `cargo build --release --bin blixard`",
                    p.display(),
                    bin.display()
                );
            }
        }
    }
}

/// Runners for the VM tests and benchmarks.
pub mod runners {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    /// The test guest's kernel (`vmlinuz`) and initramfs (`initrd`), built once per
    /// machine by `tests/fixtures/guest/build.sh` (in BLIXARD_GUEST_DIR, default
    /// $TMPDIR/blixard-guest; needs apt-get, busybox-static, cpio).
    pub fn guest_dir() -> PathBuf {
        let guest = std::env::var("BLIXARD_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir().join("blixard-guest"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/guest/build.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(&guest)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building the test guest failed (needs apt-get, busybox-static, cpio): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        guest
    }

    /// Writes `dir/bin/microvm-run` running `script` (sh).
    pub fn write_runner(dir: &Path, script: &str) {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let run = dir.join("bin/microvm-run");
        std::fs::write(&run, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A runner the way microvm.nix writes one for QEMU, carrying its kernel and initrd (a
    /// plain directory image, self-contained). The accelerator comes from
    /// BLIXARD_TEST_ACCEL: tcg here, where KVM guests hang; kvm:tcg on real hosts.
    pub fn guest_runner(dir: &Path) {
        let guest = guest_dir();
        std::fs::create_dir_all(dir.join("share")).unwrap();
        for f in ["vmlinuz", "initrd"] {
            std::fs::copy(guest.join(f), dir.join("share").join(f)).unwrap();
        }
        write_runner(
            dir,
            "d=$(dirname \"$0\")/../share\n\
             exec qemu-system-x86_64 -machine pc,accel=${BLIXARD_TEST_ACCEL:-kvm:tcg} -m 128 \
             -display none -nodefaults -serial stdio -no-reboot \
             -kernel \"$d/vmlinuz\" -initrd \"$d/initrd\" -append 'console=ttyS0 quiet panic=-1'",
        );
    }
}

/// A real systemd as PID 1 of private pid, mount, cgroup, uts and ipc namespaces
/// (`tests/systemd-ns.sh`), for tests of the systemd VM supervisor on hosts without
/// systemd. The network namespace and /tmp are shared with the host. Needs root and
/// cgroup v1 (or hybrid).
pub mod systemd {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::process::{Command, Output, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::{pid_ns, proc_nspid};

    /// One namespace and its systemd; dropping it kills everything inside and removes
    /// its cgroups.
    pub struct SystemdNs {
        /// The namespace's PID 1 (systemd), as the host sees it.
        pub pid: u32,
        /// Unique per instance; its cgroups are `sdns-<name>` under the test's own.
        pub name: String,
    }

    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd-ns.sh")
    }

    impl SystemdNs {
        /// Starts one and waits until `systemctl is-system-running` says running;
        /// panics with the script's output if it does not.
        pub fn start() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "t{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let out = Command::new("bash")
                .arg(script())
                .arg("start")
                .arg(&name)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "starting systemd in namespaces ({}) failed ({}): {}",
                script().display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let pid = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{}: no pid printed: {e}", script().display()));
            Self { pid, name }
        }

        /// The command prefix that runs a command inside: `nsenter -t PID -a --`.
        pub fn wrap(&self) -> Vec<String> {
            ["nsenter", "-t", &self.pid.to_string(), "-a", "--"]
                .map(String::from)
                .to_vec()
        }

        /// Runs `args` inside the namespaces.
        pub fn exec(&self, args: &[&str]) -> Output {
            let wrap = self.wrap();
            Command::new(&wrap[0])
                .args(&wrap[1..])
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }

        /// `systemctl args` inside; its stdout, trimmed, whatever the exit status
        /// (`is-active` and friends answer with it).
        pub fn systemctl(&self, args: &[&str]) -> String {
            let mut a = vec!["systemctl"];
            a.extend(args);
            let out = self.exec(&a);
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }

        /// `systemctl show -p <props> <unit>` as a map.
        pub fn show(&self, unit: &str, props: &[&str]) -> HashMap<String, String> {
            let joined = props.join(",");
            self.systemctl(&["show", "-p", &joined, "--", unit])
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }

        /// The host pid of the process that has pid `ns_pid` inside.
        pub fn host_pid(&self, ns_pid: u32) -> Option<u32> {
            let ns = pid_ns(self.pid)?;
            crate::all_pids().into_iter().find(|&pid| {
                proc_nspid(pid).is_some_and(|p| p.len() > 1 && p.last() == Some(&ns_pid))
                    && pid_ns(pid).as_ref() == Some(&ns)
            })
        }
    }

    impl Drop for SystemdNs {
        fn drop(&mut self) {
            let out = Command::new("bash")
                .arg(script())
                .arg("stop")
                .arg(self.pid.to_string())
                .arg(&self.name)
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "stopping systemd namespace {} failed: {}",
                    self.name,
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("stopping systemd namespace {}: {e}", self.name),
            }
        }
    }

    /// A file of process `pid`'s cgroup (host pid) in the v1 hierarchy of `controller`,
    /// e.g. `("memory", "memory.limit_in_bytes")`, trimmed.
    pub fn cgroup_v1_file(pid: u32, controller: &str, file: &str) -> Option<String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then_some(path)
        })?;
        let full = format!("/sys/fs/cgroup/{controller}{path}/{file}");
        Some(std::fs::read_to_string(full).ok()?.trim().to_string())
    }
}
