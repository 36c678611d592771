//! The peer book: where the raft transport finds each member (cluster state, the members
//! a joining node was given, the addresses the configuration declares) and whom it admits.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use blixard_core::{EndpointKey, NodeId, State};
use blixard_net::raft_transport::{PeerBook, Refusal};
use blixard_net::{member_addr, EndpointAddr};
use tokio::sync::watch;

/// Members known before this node has the cluster state (from the join answer).
pub type Seeds = Vec<(NodeId, EndpointKey, Vec<SocketAddr>)>;

/// Finds peers in the cluster state (or the seeds) and decides who may speak raft.
pub struct Book {
    pub state: Arc<std::sync::RwLock<State>>,
    pub seeds: Seeds,
    /// Addresses the configuration declares for members' keys (`expected_members`), tried
    /// besides those in the cluster state: a host whose address changed is found there.
    pub declared: Vec<(EndpointKey, Vec<SocketAddr>)>,
    pub me: NodeId,
    pub removed: Mutex<Option<watch::Sender<bool>>>,
}

impl Book {
    /// The other members' raft ids, as the state knows them.
    pub fn other_members(&self) -> Vec<u64> {
        self.with_state(|s| {
            s.members()
                .map(|m| m.id)
                .filter(|id| *id != self.me)
                .map(|id| id.0)
                .collect()
        })
    }

    fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match self.state.read() {
            Ok(s) => f(&s),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }
}

impl PeerBook for Book {
    fn addr_of(&self, node: NodeId) -> Option<EndpointAddr> {
        let known = self.with_state(|s| s.member(node).map(|m| (m.endpoint, m.addrs.clone())));
        let (key, mut addrs) = known.or_else(|| {
            self.seeds
                .iter()
                .find(|(id, _, _)| *id == node)
                .map(|(_, key, addrs)| (*key, addrs.clone()))
        })?;
        for (k, declared) in &self.declared {
            if *k == key {
                for a in declared {
                    if !addrs.contains(a) {
                        addrs.push(*a);
                    }
                }
            }
        }
        member_addr(&key, &addrs)
    }

    fn admit(&self, key: &EndpointKey, from: NodeId) -> Result<(), Refusal> {
        self.with_state(|s| {
            if s.is_removed(from) {
                return Err(Refusal::Removed(from));
            }
            match s.member(from) {
                Some(m) if &m.endpoint == key => Ok(()),
                Some(_) => Err(Refusal::NotMember(from)),
                // Before this node has the state, trust the members it joined through.
                None if s.cluster().is_none()
                    && self.seeds.iter().any(|(id, k, _)| *id == from && k == key) =>
                {
                    Ok(())
                }
                None => Err(Refusal::NotMember(from)),
            }
        })
    }

    fn refused(&self, refusal: Refusal) {
        if refusal == Refusal::Removed(self.me) {
            if let Ok(guard) = self.removed.lock() {
                if let Some(tx) = guard.as_ref() {
                    tx.send_replace(true);
                }
            }
        }
    }
}
