//! One `blixard node run` process, driven through the real CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{binary, descendant_with_inner_pid, free_port, wait_for};

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
    /// The network namespace the daemon runs in (`nsenter --net`, which execs: `child`
    /// is the daemon itself). The CLI runs where the test's thread is.
    pub netns: Option<String>,
    /// The address `--listen` binds (the port is `port`).
    pub listen_ip: String,
    /// Environment variables the daemon gets besides the test's own.
    pub env: Vec<(String, String)>,
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
            netns: None,
            listen_ip: "127.0.0.1".into(),
            env: Vec::new(),
        }
    }

    /// `blixard`, or the wrapper running it.
    fn command(&self) -> Command {
        if let Some(ns) = &self.netns {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(binary());
            return cmd;
        }
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
    /// sets them itself: the binary cache and the metrics endpoint on ephemeral ports, a
    /// store dir of its own.
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
        if !given("--metrics-listen") {
            out.extend(["--metrics-listen".to_string(), "127.0.0.1:0".to_string()]);
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
        if let Err((status, log)) = self.try_start(args) {
            panic!("{} exited with {status:?}: {log}", self.name);
        }
    }

    /// Starts the daemon like [`Self::start`], or returns its exit code and log if it
    /// exits before it serves.
    pub fn try_start(&mut self, args: &[&str]) -> Result<(), (Option<i32>, String)> {
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
            .arg(format!("{}:{}", self.listen_ip, self.port))
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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
                return Ok(Err((status.code(), log)));
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
        match started {
            Ok(pid) => {
                self.wrapped_pid = pid;
                Ok(())
            }
            Err(e) => {
                self.child = None;
                Err(e)
            }
        }
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
            .arg(format!("{}:{}", self.listen_ip, self.port))
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
        let log_path = self.log_path();
        let child = self.child.as_mut().expect("not running");
        let code = wait_for(&format!("{name} to exit"), timeout, || {
            match child.try_wait() {
                Ok(Some(status)) => Ok(status.code().unwrap_or(-1)),
                // The log's end says where a shutdown is stuck.
                Ok(None) => Err(format!(
                    "still running; its log ends:\n{}",
                    tail(&std::fs::read_to_string(&log_path).unwrap_or_default(), 30)
                )),
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

    /// An address the running daemon serves on, from its `node.json`: `metrics` or
    /// `cache`.
    pub fn served_at(&self, key: &str) -> std::net::SocketAddr {
        self.info().unwrap()[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {}'s node.json", self.name))
            .parse()
            .unwrap()
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
        // Under scripts/coverage.sh a daemon writes its profile only when it exits: ask it
        // to stop first (bounded), so what it ran counts.
        if std::env::var_os("LLVM_PROFILE_FILE").is_some() {
            self.term_within(Duration::from_secs(10));
        }
        self.kill9();
    }
}

impl Node {
    /// SIGTERM, then wait up to `timeout` for the exit; never panics (used in `drop`).
    fn term_within(&mut self, timeout: Duration) {
        let Some(pid) = self.pid() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(Some(_))) {
                self.child = None;
                self.wrapped_pid = None;
                return;
            }
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
