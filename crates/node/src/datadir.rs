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
