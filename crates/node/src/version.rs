//! The versions a node speaks, and the cluster version it keeps raising.
//!
//! | what | where | compatible across |
//! |---|---|---|
//! | release | `CARGO_PKG_VERSION` | shown only |
//! | log version | [`blixard_core::LOG_VERSION`]: the commands this build applies | raised cluster-wide once every member has it |
//! | API | `blixard/api/1` frames, [`blixard_net::api::API_VERSION`] | new request kinds appended; an older node refuses one it does not know by name |
//! | raft | `blixard/raft/1`, its hello | fields appended, read as absent by older nodes |
//! | data file | `blixard.redb`'s `format` ([`blixard_store::DATA_FORMAT`]) | older migrated at open after a copy; newer refused |
//!
//! The cluster version is the lowest log version among the members; a command newer than
//! it is refused before it is proposed (and by `apply`), so a member that could not
//! decode it never meets it. The leader raises it ([`raise`]) once every member has said,
//! in its raft hello, that it applies a newer one.

use blixard_core::{Command, MemberStatus, LOG_VERSION};

use crate::cluster::ClusterHandle;
use crate::gate::Gate;

/// The release, as `blixard --version` prints it.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// Makes the node apply (and say it applies) an older log version, as an older release
/// would: for the upgrade tests, which cannot build old releases. Not for production.
pub const TEST_LOG_VERSION_ENV: &str = "BLIXARD_TEST_LOG_VERSION";

/// The log version this node applies: [`LOG_VERSION`], or lower under
/// [`TEST_LOG_VERSION_ENV`].
pub fn log_version() -> Result<u32, String> {
    match std::env::var(TEST_LOG_VERSION_ENV) {
        Err(_) => Ok(LOG_VERSION),
        Ok(v) => match v.parse::<u32>() {
            Ok(n) if (1..=LOG_VERSION).contains(&n) => Ok(n),
            _ => Err(format!(
                "{TEST_LOG_VERSION_ENV}={v:?}: expected a log version from 1 to {LOG_VERSION}"
            )),
        },
    }
}

/// The cluster version the members allow now: the lowest log version among the active
/// members, this node's own included. A member whose hello said nothing of it (a release
/// before the cluster version) or that has not been heard from counts as 1.
pub fn allowed(cluster: &ClusterHandle) -> u32 {
    let me = cluster.me();
    let state = cluster.state();
    state
        .members()
        .filter(|m| m.status == MemberStatus::Active)
        .map(|m| {
            if m.id == me {
                cluster.log_version
            } else {
                cluster.versions.log_version(m.id).unwrap_or(1)
            }
        })
        .min()
        .unwrap_or(cluster.log_version)
}

/// On the leader: raises the cluster version to what every member allows, if that is
/// higher than it is (as this host, through the gate: `cluster:check`).
pub async fn raise(gate: &Gate) -> Result<(), String> {
    let cluster = &gate.cluster;
    let now = cluster.state().cluster_version();
    let allowed = allowed(cluster);
    if allowed <= now {
        return Ok(());
    }
    gate.propose_as_host(Command::SetClusterVersion { version: allowed })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        from = now,
        to = allowed,
        "cluster version raised: every member applies log version {allowed}"
    );
    Ok(())
}
