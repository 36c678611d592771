//! The host side of a VM: the microvm.nix runner contract, and supervising the runner's
//! process.
//!
//! The contract (what a runner directory holds → what the host does):
//!
//! | file in the runner | what the host does |
//! |---|---|
//! | `bin/microvm-run` | runs it (required) in the VM's state dir, in its own process group, console to `console.log` |
//! | `bin/microvm-shutdown` | runs it to stop the VM; without it: SIGTERM, then SIGKILL after a timeout |
//! | `share/microvm/tap-interfaces` | before start: checks the names (1–15 bytes, no `/`, `:`, `%` or whitespace; a bad one refuses the start), makes each missing tap with `ip tuntap add name X mode tap` (a tap of that name is reused) and sets it up; after `stop`, deletes them |
//! | `share/microvm/tap-flags` | `vnet_hdr` / `multi_queue` are passed to `ip tuntap add`; an existing tap must match the queue mode |
//!
//! A VM started with `Limits` (`ProcessSupervisor::start_with`) runs, where cgroup v2 allows,
//! in the cgroup `<parent>/vm-<name>` (parent by default `/sys/fs/cgroup/blixard.slice`) with
//! `memory.max` = guest RAM + 25 % + 64 MiB and `cpu.max` = one CPU per vCPU; the state
//! dir's `cgroup` file names it, and it is removed after `stop`. Where cgroup v2 or one of its
//! memory and cpu controllers is missing, the VM runs without that limit and a warning says why.
//!
//! Per VM there is one state dir, [`VmDir`], as microvm.nix's host module keeps one: the
//! runner links (`current`, `booted`), the console, what the host last did, and the
//! supervisors' own files; `VmDir` is the only code that builds paths inside it.
//!
//! The host agent (`agent`) keeps what runs here in line with cluster state, over a
//! `Cluster` trait the node implements and the [`Supervisor`].
//!
//! **Boundary:** knows the domain's VM and image types (`blixard-core`), nothing of Raft,
//! the API, Cedar or how images move; the node says which runner an image is.

pub mod agent;
mod cgroup;
mod hooks;
mod process;
pub mod reconcile;
mod runner;
mod systemd;
mod taps;
mod vmdir;

pub use cgroup::Limits;
pub use hooks::{ExecHook, HookChain, HookEvent, HookFuture, HookVm, Veto, VmLifecycleHook};
pub use process::{ProcessSupervisor, VmState};
pub use runner::Runner;
pub use systemd::SystemdSupervisor;
pub use vmdir::{VmDir, MAX_CONSOLE_READ};

use std::path::PathBuf;
use std::time::Duration;

/// Runs and watches VM runners on this host. Two implementations: [`ProcessSupervisor`]
/// (plain processes, for hosts without systemd and the tests) and [`SystemdSupervisor`]
/// (one transient systemd unit per VM). Either way a VM outlives the daemon, and a new
/// daemon finds it running again.
pub trait Supervisor: Send + Sync + std::fmt::Debug {
    /// The VM's state dir; the name is checked.
    fn dir(&self, name: &str) -> Result<VmDir, HostError>;

    /// Starts `runner` as VM `name` (taps first, within `limits` where the host can
    /// enforce them); if it already runs, returns its pid and changes nothing.
    fn start_with(
        &self,
        name: &str,
        runner: &Runner,
        limits: Option<&Limits>,
    ) -> Result<u32, HostError>;

    /// What the VM's runner is doing now.
    fn state(&self, name: &str) -> Result<VmState, HostError>;

    /// The VMs whose runners run, by name.
    fn running(&self) -> Vec<(String, u32)>;

    /// The VMs that have a state dir here, by name.
    fn local_dirs(&self) -> Vec<String>;

    /// Stops the VM (its `bin/microvm-shutdown`, else SIGTERM; SIGKILL after `timeout`),
    /// then gives back its taps and cgroup.
    fn stop(&self, name: &str, timeout: Duration) -> Result<VmState, HostError>;

    /// The last `lines` lines of the VM's console.
    fn console_tail(&self, name: &str, lines: usize) -> Result<Vec<String>, HostError> {
        self.dir(name)?.console_tail(lines)
    }

    /// Keeps the console log near its cap.
    fn trim_console(&self, name: &str) -> Result<(), HostError>;
}

/// Errors of the host side; each names the VM or runner involved.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("runner {0}: {1}")]
    Runner(PathBuf, String),
    #[error("VM {vm}: {what}: {source}")]
    Io {
        vm: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {0} is not running")]
    NotRunning(String),
    #[error("invalid VM name {0:?}")]
    BadName(String),
    #[error("VM {vm}: systemd: {detail}")]
    Systemd { vm: String, detail: String },
    #[error("a supervisor task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
}
