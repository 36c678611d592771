//! Bringing a cluster back: `node restore` (a fresh data dir holding a backup's state as
//! a new one-voter cluster) and `node run --force-new-cluster` (a survivor of a lost
//! majority turns its own replica into one). Both leave a data dir that `node run`
//! resumes as usual; the state changes themselves are `State::restore` and
//! `State::force_new_cluster`.

use std::path::{Path, PathBuf};

use blixard_core::backup::{self, Backup};
use blixard_core::{ClusterId, NewMember, NodeId, Phase, Restore};
use blixard_net::{key_of, keys};
use blixard_store::{NodeRecord, Store};
use serde::Serialize;

use super::settings::{detect_capacity, host_name};
use super::{data_err, store_err, RunArgs};
use crate::cluster::now_ms;
use crate::datadir;
use crate::exit::{self, Failure};

/// `node restore`'s options (its command line).
#[derive(Clone, Debug, Default)]
pub struct RestoreArgs {
    /// Keep the backed-up cluster's id (default: a new one).
    pub keep_cluster_id: bool,
    /// The restoring node's name, config file and labels, as for `node run`.
    pub name: Option<String>,
    pub config: Option<PathBuf>,
    pub labels: Vec<(String, String)>,
}

/// What a restore made.
#[derive(Clone, Debug, Serialize)]
pub struct Restored {
    pub data_dir: PathBuf,
    pub cluster_id: ClusterId,
    pub cluster_name: String,
    /// This node's id in the restored cluster.
    pub node: NodeId,
    /// The backup's index, term and author.
    pub from_index: u64,
    pub from_term: u64,
    pub from_node: NodeId,
    pub members_removed: usize,
    /// VMs waiting to be placed again (on this node or on nodes that join).
    pub vms_to_place: usize,
    /// Images with no holder: import them again (docs/operations.md).
    pub images_to_import: Vec<String>,
}

/// Reads and checks a backup file (size first, then everything `backup::decode` checks).
pub fn read_backup(file: &Path) -> Result<Backup, Failure> {
    let bad = |e: &dyn std::fmt::Display| {
        Failure::new(exit::DATA_DIR, format!("backup {}: {e}", file.display()))
    };
    let len = std::fs::metadata(file).map_err(|e| bad(&e))?.len();
    if len > backup::MAX_BACKUP as u64 {
        return Err(bad(&backup::BackupError::TooLarge(
            usize::try_from(len).unwrap_or(usize::MAX),
        )));
    }
    let bytes = std::fs::read(file).map_err(|e| bad(&e))?;
    backup::decode(&bytes).map_err(|e| bad(&e))
}

/// `node restore FILE --data-dir DIR`: a fresh data dir holding the backup's state as a
/// new cluster whose one voter is this node (a new identity, under the next node id).
pub fn restore(data_dir: &Path, file: &Path, args: &RestoreArgs) -> Result<Restored, Failure> {
    let mut b = read_backup(file)?;
    let data_dir = &std::path::absolute(data_dir).map_err(data_err)?;
    let run = RunArgs {
        config: args.config.clone(),
        name: args.name.clone(),
        labels: args.labels.clone(),
        ..RunArgs::default()
    };
    let config = super::settings::load(data_dir, &run)?;
    datadir::ensure(data_dir).map_err(|e| {
        data_err(format!(
            "cannot create data dir {}: {e}",
            data_dir.display()
        ))
    })?;
    let store = Store::open(&datadir::db(data_dir)).map_err(store_err)?;
    if let Some(r) = store.node_record().map_err(store_err)? {
        return Err(data_err(format!(
            "data dir {} already holds node {} of cluster {}; restore into an empty data dir",
            data_dir.display(),
            r.node_id,
            r.cluster_id
        )));
    }
    let secret = keys::load_or_create(&datadir::node_key(data_dir)).map_err(data_err)?;
    let admin = keys::load_or_create(&datadir::admin_key(data_dir)).map_err(data_err)?;
    let cluster_id = if args.keep_cluster_id {
        b.header.cluster_id
    } else {
        ClusterId(rand::random())
    };
    let listen = config.listen.filter(|a| !a.ip().is_unspecified());
    let members_before = b.state.members().count();
    let node = b
        .state
        .restore(&Restore {
            cluster_id,
            member: NewMember {
                name: config.name.clone().unwrap_or_else(host_name),
                endpoint: key_of(&secret.public()),
                // The daemon records where it listens when it starts.
                addrs: listen.into_iter().collect(),
                labels: config.labels.clone(),
                capacity: detect_capacity(&config),
            },
            admin: key_of(&admin.public()),
            now_ms: now_ms(),
        })
        .map_err(|e| data_err(format!("backup {}: cannot restore it: {e}", file.display())))?;
    store.bootstrap(&b.state, &[node.0]).map_err(store_err)?;
    store
        .set_node_record(&NodeRecord {
            cluster_id,
            node_id: node,
            removed: false,
        })
        .map_err(store_err)?;
    store.sync().map_err(store_err)?;
    let state = &b.state;
    let restored = Restored {
        data_dir: data_dir.clone(),
        cluster_id,
        cluster_name: state.cluster().map(|m| m.name.clone()).unwrap_or_default(),
        node,
        from_index: b.header.index,
        from_term: b.header.term,
        from_node: b.header.node,
        members_removed: members_before,
        vms_to_place: state.vms().filter(|v| v.phase == Phase::Pending).count(),
        images_to_import: state
            .images()
            .filter(|i| i.holders.is_empty())
            .map(|i| i.name.clone())
            .collect(),
    };
    tracing::info!(?restored, "restored a backup");
    Ok(restored)
}

/// `node run --force-new-cluster`: this member's state (as of its commit index) becomes
/// the first state of a cluster with this node as its only voter, every other member
/// removed. The data dir must hold a member's replica.
pub(super) fn force_new_cluster(store: &Store, record: Option<&NodeRecord>) -> Result<(), Failure> {
    let Some(record) = record else {
        return Err(data_err(
            "--force-new-cluster needs a data dir that holds a member's replica; this one holds no cluster",
        ));
    };
    let conf = store.conf_state().map_err(store_err)?;
    if conf.voters == [record.node_id.0]
        && conf.learners.is_empty()
        && conf.voters_outgoing.is_empty()
        && conf.learners_next.is_empty()
    {
        tracing::warn!(
            "--force-new-cluster: node {} is already the only member of the configuration; nothing to do (remove the flag: on a cluster that has grown again it would remove the new members)",
            record.node_id
        );
        return Ok(());
    }
    let (mut state, commit) = store.committed_state().map_err(store_err)?;
    let removed = state
        .force_new_cluster(record.node_id, now_ms())
        .map_err(|e| data_err(format!("cannot force a new cluster: {e}")))?;
    let (index, term) = store
        .restart_as(&state, &[record.node_id.0])
        .map_err(store_err)?;
    let removed: Vec<String> = removed.iter().map(|n| format!("n{n}")).collect();
    tracing::warn!(
        node = %record.node_id,
        cluster = %record.cluster_id,
        commit,
        index,
        term,
        "FORCED A NEW CLUSTER: this node is now the only voter; removed members {}; \
         entries past index {commit} that were not committed are gone; join new nodes with new tickets",
        if removed.is_empty() { "none".to_string() } else { removed.join(", ") },
    );
    Ok(())
}
