//! The host side of a VM: the microvm.nix runner contract, and supervising the runner's
//! process.
//!
//! The contract (what a runner directory holds → what the host does):
//!
//! | file in the runner | what the host does |
//! |---|---|
//! | `bin/microvm-run` | runs it (required) in the VM's state dir, in its own process group, console to `console.log` |
//! | `bin/microvm-shutdown` | runs it to stop the VM; without it: SIGTERM, then SIGKILL after a timeout |
//! | `share/microvm/tap-interfaces` | (not yet) creates the listed tap interfaces before start |
//!
//! Per VM the supervisor keeps a state dir, as microvm.nix's host module does: `current`
//! (a link to the runner it should run), `booted` (the runner it started), `pid` (the
//! process and its start time, for re-adoption after a daemon restart), and `console.log`.
//!
//! **Boundary:** knows nothing of Raft, the API or images; callers say which runner to run.

mod process;
mod runner;

pub use process::{ProcessSupervisor, VmState};
pub use runner::Runner;

use std::path::PathBuf;

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
}
