//! Start-up phase 2: the data dir, its store and this node's record in it, the node's
//! key, and the Iroh endpoint bound to `listen`.

use std::net::SocketAddr;
use std::path::Path;

use blixard_net::{endpoint, keys, API_ALPN, RAFT_ALPN};
use blixard_store::{NodeRecord, Store};

use super::{data_err, store_err};
use crate::config::Config;
use crate::datadir;
use crate::exit::{self, Failure};

/// What phase 2 opened.
pub(super) struct Opened {
    pub store: Store,
    /// This node's place in its cluster, if the data dir holds one.
    pub record: Option<NodeRecord>,
    pub ep: iroh::Endpoint,
    /// The addresses other members reach this node at.
    pub advertise: Vec<SocketAddr>,
}

pub(super) async fn open(data_dir: &Path, config: &Config) -> Result<Opened, Failure> {
    datadir::ensure(data_dir).map_err(|e| {
        data_err(format!(
            "cannot create data dir {}: {e}",
            data_dir.display()
        ))
    })?;
    let store = Store::open(&datadir::db(data_dir)).map_err(store_err)?;
    // raft-rs asserts what the file says (a commit index past the log panics it): check
    // it all first, and refuse a file that does not hold together.
    let check = store.check().map_err(store_err)?;
    tracing::debug!(?check, "data file checked");
    let record = store.node_record().map_err(store_err)?;
    if let Some(r) = record.as_ref().filter(|r| r.removed) {
        return Err(data_err(format!(
            "node {} was removed from cluster {}; this data dir cannot rejoin (start with an empty data dir and a new join ticket)",
            r.node_id, r.cluster_id
        )));
    }
    let listen = config
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7000)));
    let relay = match &config.relay_url {
        Some(u) => Some(
            u.parse()
                .map_err(|e| Failure::new(exit::CONFIG, format!("relay_url: {e}")))?,
        ),
        None => None,
    };
    // A node that is already a member must keep its identity: a lost key is an error,
    // never a fresh identity the cluster would not recognise.
    let key_path = datadir::node_key(data_dir);
    let secret = if record.is_some() {
        keys::load(&key_path).map_err(|e| {
            data_err(format!(
                "{e}; this node's identity is gone, so it cannot rejoin as itself (remove it with `cluster leave` and join again with an empty data dir)"
            ))
        })?
    } else {
        keys::load_or_create(&key_path).map_err(data_err)?
    };
    let ep = endpoint::bind(
        secret,
        listen,
        relay,
        vec![
            RAFT_ALPN.to_vec(),
            API_ALPN.to_vec(),
            iroh_blobs::ALPN.to_vec(),
        ],
    )
    .await
    .map_err(|e| Failure::new(exit::CONFIG, e))?;
    let advertise = if listen.ip().is_unspecified() {
        ep.bound_sockets()
    } else {
        vec![listen]
    };
    Ok(Opened {
        store,
        record,
        ep,
        advertise,
    })
}
