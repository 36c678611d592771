//! The node's side of the choke point: the policies in force (one authorizer per policy
//! text, rebuilt when cluster state's policies change), the audit log it records
//! decisions in, and the way the node's own machinery changes cluster state. Requests
//! reach handlers only through `blixard_net::server::call`; a change the node makes for
//! itself outside a request (a placement, a report, a holding, its addresses) goes
//! through [`Gate::propose_as_host`]: authorized as this host, audited, then proposed.

use std::sync::{Arc, Mutex};

use blixard_authz::{Authorizer, DecisionCounts};
use blixard_core::{Command, CommandOutput, NodeId, User};
use blixard_net::api::ApiError;
use blixard_net::authz::{Lookup, Principal};

use crate::audit::AuditLog;
use crate::cluster::ClusterHandle;

/// The policies and the audit log, for requests and for the node's own changes.
pub struct Gate {
    pub cluster: Arc<ClusterHandle>,
    pub audit: Arc<AuditLog>,
    /// The authorizer for the policy text it was built from (`None` = the defaults).
    policies: Mutex<(Option<String>, Arc<Authorizer>)>,
    /// Every authorizer's decisions, counted across policy changes.
    pub decisions: Arc<DecisionCounts>,
}

impl Gate {
    pub fn new(
        cluster: Arc<ClusterHandle>,
        audit: Arc<AuditLog>,
    ) -> Result<Self, blixard_authz::AuthzError> {
        let decisions = Arc::new(DecisionCounts::default());
        let defaults = Authorizer::with_defaults()?.counting(decisions.clone());
        Ok(Self {
            cluster,
            audit,
            policies: Mutex::new((None, Arc::new(defaults))),
            decisions,
        })
    }

    /// The authorizer for the policies in force now.
    pub fn authorizer(&self) -> Arc<Authorizer> {
        let current = self.cluster.state().policies().cloned();
        let mut cache = match self.policies.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if cache.0 != current {
            match current
                .as_deref()
                .map(Authorizer::new)
                .unwrap_or_else(Authorizer::with_defaults)
            {
                Ok(a) => *cache = (current, Arc::new(a.counting(self.decisions.clone()))),
                Err(e) => tracing::error!(
                    "stored policies do not validate with this version ({e}); keeping the previous ones"
                ),
            }
        }
        cache.1.clone()
    }

    /// This host acting for itself: its configuration (declared VMs) and its machinery.
    pub fn host(&self) -> Principal {
        let key = blixard_net::key_of(&self.cluster.client.endpoint().id());
        Principal::Host(self.cluster.me(), key)
    }

    /// Proposes a change this node makes for itself: authorized as this host (the
    /// command's Cedar action, e.g. `vm:report`), audited with its outcome, then proposed.
    pub async fn propose_as_host(&self, command: Command) -> Result<CommandOutput, ApiError> {
        blixard_net::server::command(
            &self.authorizer(),
            self,
            &*self.audit,
            &self.host(),
            command,
            |c| self.cluster.propose(c),
        )
        .await
    }
}

impl Lookup for Gate {
    fn user(&self, name: &str) -> Option<User> {
        self.cluster.state().user(name).cloned()
    }
    fn image(&self, name: &str) -> Option<blixard_core::Image> {
        self.cluster.state().image(name).cloned()
    }
    fn vm(&self, key: &str) -> Option<blixard_core::Vm> {
        self.cluster.state().vm(key).cloned()
    }
    fn node_labels(&self, node: NodeId) -> Option<std::collections::BTreeMap<String, String>> {
        self.cluster.state().member(node).map(|m| m.labels.clone())
    }
}

/// The leader's periodic state check, every `interval`: proposes `Command::CheckState`
/// with this node's digest at the last check it applied, so every member compares its
/// own (`RaftCore::check_state`; a member that differs raises its alarm). Idle on
/// followers.
pub async fn check_states(gate: Arc<Gate>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Ok(status) = gate.cluster.node.status().await else {
            return;
        };
        if status.leader != Some(gate.cluster.me().0) {
            continue;
        }
        let previous = status.state_check;
        if let Err(e) = gate.propose_as_host(Command::CheckState { previous }).await {
            tracing::debug!("state check: {e}");
        }
    }
}
