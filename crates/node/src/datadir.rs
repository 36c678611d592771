//! The data dir layout.
//!
//! | file | what | mode |
//! |---|---|---|
//! | `blixard.redb` | raft log, hard state, snapshots, cluster state | 0600 |
//! | `node.key` | the node's Iroh secret key (its identity) | 0600 |
//! | `admin.key` | the admin credential the CLI uses | 0600 |
//! | `node.json` | where the running node listens, for the CLI | 0644 |
//! | `audit.log` | denials, decisions and outcomes of mutating requests, applied changes (JSON lines; `.1`–`.3` rotated) | 0600 |
//! | `blobs/` | the iroh-blobs store: image manifests and NARs | 0700 |

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blixard_core::{ClusterId, EndpointKey, NodeId};
use serde::{Deserialize, Serialize};

pub fn db(dir: &Path) -> PathBuf {
    dir.join("blixard.redb")
}

pub fn node_key(dir: &Path) -> PathBuf {
    dir.join("node.key")
}

pub fn admin_key(dir: &Path) -> PathBuf {
    dir.join("admin.key")
}

pub fn blobs(dir: &Path) -> PathBuf {
    dir.join("blobs")
}

pub fn node_info(dir: &Path) -> PathBuf {
    dir.join("node.json")
}

/// Written by the daemon when it starts serving.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub cluster_id: ClusterId,
    pub endpoint_id: EndpointKey,
    pub addrs: Vec<SocketAddr>,
    pub pid: u32,
    /// Where the binary cache is served, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<SocketAddr>,
    /// Where `GET /metrics` is served, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// The daemon's process as /proc shows it, so that the CLI can tell a node that died
    /// without removing this file from one that does not answer (see [`NodeInfo::gone`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessStamp>,
}

/// A process's pid namespace and start time (in clock ticks since boot): with its pid,
/// they name it uniquely, where the pid alone may be reused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStamp {
    pub pid_ns: String,
    pub started: u64,
}

impl ProcessStamp {
    /// Process `pid` as this process's /proc shows it; `None` when there is no such
    /// process (or /proc cannot be read).
    pub fn of(pid: u32) -> Option<Self> {
        Some(Self {
            started: Self::started(pid)?,
            pid_ns: Self::pid_ns()?,
        })
    }

    /// When process `pid` started (clock ticks since boot); `None` when there is none.
    fn started(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses; field 22,
        // starttime, is the 20th after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(19)?.parse().ok()
    }

    /// This process's pid namespace (`pid:[INODE]`).
    fn pid_ns() -> Option<String> {
        std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .map(|p| p.display().to_string())
    }
}

impl NodeInfo {
    /// Why the daemon that wrote this file is certainly gone, if it is: it ran in this
    /// process's pid namespace and its pid is gone or now another process's. `None` when
    /// it may still run (or this cannot be told: another namespace, an older daemon).
    pub fn gone(&self) -> Option<String> {
        let recorded = self.process.as_ref()?;
        if Some(&recorded.pid_ns) != ProcessStamp::pid_ns().as_ref() {
            return None;
        }
        match ProcessStamp::started(self.pid) {
            None => Some(format!("its process {} is gone", self.pid)),
            Some(started) if started != recorded.started => Some(format!(
                "its process {} is gone (the pid is another process's now)",
                self.pid
            )),
            Some(_) => None,
        }
    }
}

/// Creates the data dir (mode 0700) if needed.
pub fn ensure(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Writes a file atomically (temp file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
