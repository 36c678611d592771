//! The cluster and its members: bootstrap, metadata, join tokens and joins, roles,
//! removal, addresses, admin credentials, and hosts drained or down.

use std::net::SocketAddr;

use super::{Applied, ApplyError, State};
use crate::command::{CommandOutput, JoinRequest, NewMember};
use crate::ids::{ClusterId, EndpointKey, NodeId};
use crate::member::{AdminCredential, ClusterMeta, JoinToken, Member, MemberRole, MemberStatus};
use crate::vm::{Phase, RestartPolicy};

/// The longest metadata key and value accepted.
const MAX_META_KEY: usize = 128;
const MAX_META_VALUE: usize = 4096;

impl State {
    pub(super) fn bootstrap(
        &mut self,
        cluster_id: ClusterId,
        name: &str,
        member: &NewMember,
        admin: EndpointKey,
        now_ms: u64,
    ) -> Applied {
        if self.cluster().is_some() {
            return Err(ApplyError::AlreadyBootstrapped);
        }
        let first = NodeId(1);
        self.meta.insert(
            0,
            ClusterMeta {
                cluster_id,
                name: name.to_string(),
                created_at_ms: now_ms,
                next_node_id: 2,
            },
        );
        self.members
            .insert(first, new_member(first, member, MemberRole::Voter, now_ms));
        self.admins.insert(
            admin,
            AdminCredential {
                node: first,
                created_at_ms: now_ms,
            },
        );
        Ok(CommandOutput::Joined { node: first })
    }

    pub(super) fn set_meta(&mut self, key: &str, value: Option<&str>) -> Applied {
        if key.is_empty() || key.len() > MAX_META_KEY || key.chars().any(char::is_control) {
            return Err(ApplyError::InvalidMeta(format!(
                "keys are 1 to {MAX_META_KEY} printable characters"
            )));
        }
        match value {
            Some(v) if v.len() > MAX_META_VALUE => Err(ApplyError::InvalidMeta(format!(
                "values are at most {MAX_META_VALUE} bytes"
            ))),
            Some(v) => {
                self.kv.insert(key.to_string(), v.to_string());
                Ok(CommandOutput::Done)
            }
            None => {
                self.kv.remove(&key.to_string());
                Ok(CommandOutput::Done)
            }
        }
    }

    pub(super) fn create_join_token(
        &mut self,
        token_hash: &[u8; 32],
        now_ms: u64,
        expires_at_ms: u64,
    ) -> Applied {
        if self.tokens.contains(token_hash) {
            return Err(ApplyError::TokenExists);
        }
        self.tokens.insert(
            *token_hash,
            JoinToken {
                created_at_ms: now_ms,
                expires_at_ms,
                used_by: None,
            },
        );
        Ok(CommandOutput::Done)
    }

    pub(super) fn revoke_join_token(&mut self, token_hash: &[u8; 32]) -> Applied {
        match self.tokens.get(token_hash) {
            None => Err(ApplyError::TokenUnknown),
            Some(JoinToken {
                used_by: Some(node),
                ..
            }) => Err(ApplyError::TokenUsed(*node)),
            Some(_) => {
                self.tokens.remove(token_hash);
                self.learner_tokens.remove(token_hash);
                Ok(CommandOutput::Done)
            }
        }
    }

    /// The join tokens, by the hash of their secret.
    pub fn join_tokens(&self) -> impl Iterator<Item = (&[u8; 32], &JoinToken)> {
        self.tokens.iter()
    }

    pub(super) fn join(&mut self, request: &JoinRequest) -> Applied {
        let token = self
            .tokens
            .get(&request.token_hash)
            .ok_or(ApplyError::TokenUnknown)?;
        if let Some(node) = token.used_by {
            return Err(ApplyError::TokenUsed(node));
        }
        if request.now_ms >= token.expires_at_ms {
            return Err(ApplyError::TokenExpired);
        }
        if let Some(existing) = self.member_by_endpoint(&request.member.endpoint) {
            return Err(ApplyError::EndpointInUse(
                request.member.endpoint,
                existing.id,
            ));
        }
        let Some(mut meta) = self.cluster().cloned() else {
            return Err(ApplyError::NotBootstrapped);
        };
        let node = NodeId(meta.next_node_id);
        if request.node != node {
            return Err(ApplyError::StaleNodeId(request.node));
        }
        meta.next_node_id += 1;
        self.meta.insert(0, meta);
        self.tokens
            .update(&request.token_hash, |t| t.used_by = Some(node));
        let mut member = new_member(node, &request.member, MemberRole::Learner, request.now_ms);
        member.status = MemberStatus::Joining;
        self.members.insert(node, member);
        if self.learner_tokens.contains(&request.token_hash) {
            self.kept_learners.insert(node, true);
        }
        self.admins.insert(
            request.admin,
            AdminCredential {
                node,
                created_at_ms: request.now_ms,
            },
        );
        Ok(CommandOutput::Joined { node })
    }

    pub(super) fn set_role(&mut self, node: NodeId, role: MemberRole) -> Applied {
        self.check_not_removed(node)?;
        if self.members.update(&node, |m| {
            // `SetRole { Learner }` marks a kept learner active; it may come after the
            // member was promoted (proposed before, or again by a new leader), and then
            // must not take the role back: only `ChangeRole` demotes.
            if role == MemberRole::Voter || m.status == MemberStatus::Joining {
                m.role = role;
            }
            m.status = MemberStatus::Active;
        }) {
            // A voter is kept a learner no longer (e.g. a learner that forced a new
            // cluster, or was restored from a backup, is its only voter).
            if role == MemberRole::Voter {
                self.kept_learners.remove(&node);
            }
            Ok(CommandOutput::Done)
        } else {
            Err(ApplyError::UnknownMember(node))
        }
    }

    /// `cluster promote` / `cluster demote`, applied with the configuration change that
    /// makes the raft role match.
    pub(super) fn change_role(&mut self, node: NodeId, role: MemberRole) -> Applied {
        self.check_not_removed(node)?;
        let Some(member) = self.members.get(&node) else {
            return Err(ApplyError::UnknownMember(node));
        };
        if member.role == role {
            return Err(ApplyError::SameRole(node, role));
        }
        if role == MemberRole::Learner && self.voters() <= 1 {
            return Err(ApplyError::OnlyVoter(node));
        }
        self.members.update(&node, |m| {
            m.role = role;
            m.status = MemberStatus::Active;
        });
        match role {
            MemberRole::Learner => self.kept_learners.insert(node, true),
            MemberRole::Voter => {
                self.kept_learners.remove(&node);
            }
        }
        Ok(CommandOutput::Done)
    }

    fn voters(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.role == MemberRole::Voter)
            .count()
    }

    /// Whether the operator keeps `node` a learner (it joined with a learner token, or
    /// was demoted): the leader does not promote it.
    pub fn is_kept_learner(&self, node: NodeId) -> bool {
        self.kept_learners.contains(&node)
    }

    /// Whether the join token with this hash makes its node a learner that stays one.
    pub fn is_learner_token(&self, token_hash: &[u8; 32]) -> bool {
        self.learner_tokens.contains(token_hash)
    }

    pub(super) fn remove_member(&mut self, node: NodeId, now_ms: u64) -> Applied {
        self.check_not_removed(node)?;
        let voters = self.voters();
        match self.members.get(&node) {
            None => return Err(ApplyError::UnknownMember(node)),
            Some(m) if m.role == MemberRole::Voter && voters <= 1 => {
                return Err(ApplyError::LastVoter(node))
            }
            Some(_) => {}
        }
        self.members.remove(&node);
        self.removed.insert(node, now_ms);
        self.kept_learners.remove(&node);
        self.remove_admins_of(node);
        self.drop_holder(node);
        self.drained.remove(&node);
        self.down.remove(&node);
        self.unplace_from(
            node,
            &format!("node {node} left the cluster"),
            now_ms,
            |_| true,
        );
        Ok(CommandOutput::Done)
    }

    pub(super) fn update_addrs(&mut self, node: NodeId, addrs: &[SocketAddr]) -> Applied {
        self.check_not_removed(node)?;
        if self.members.update(&node, |m| m.addrs = addrs.to_vec()) {
            Ok(CommandOutput::Done)
        } else {
            Err(ApplyError::UnknownMember(node))
        }
    }

    pub(super) fn set_admin_key(
        &mut self,
        node: NodeId,
        key: &EndpointKey,
        now_ms: u64,
    ) -> Applied {
        self.check_not_removed(node)?;
        if self.members.get(&node).is_none() {
            return Err(ApplyError::UnknownMember(node));
        }
        if let Some(holder) = self.key_holder(key) {
            return Err(ApplyError::KeyInUse(*key, holder));
        }
        self.remove_admins_of(node);
        self.admins.insert(
            *key,
            AdminCredential {
                node,
                created_at_ms: now_ms,
            },
        );
        Ok(CommandOutput::Done)
    }

    pub(super) fn set_drained(&mut self, node: NodeId, drained: bool, now_ms: u64) -> Applied {
        if self.members.get(&node).is_none() {
            return Err(ApplyError::UnknownMember(node));
        }
        if drained {
            self.drained.insert(node, true);
            // Every VM moves: stopped here, placed and started elsewhere.
            self.unplace_from(
                node,
                &format!("moved off drained node {node}"),
                now_ms,
                |_| true,
            );
        } else {
            self.drained.remove(&node);
        }
        Ok(CommandOutput::Done)
    }

    pub(super) fn set_node_down(&mut self, node: NodeId, down: bool, now_ms: u64) -> Applied {
        if self.members.get(&node).is_none() {
            return Err(ApplyError::UnknownMember(node));
        }
        if !down {
            self.down.remove(&node);
            return Ok(CommandOutput::Done);
        }
        if self.down.contains(&node) {
            return Ok(CommandOutput::Done);
        }
        self.down.insert(node, now_ms);
        // VMs that should come back run elsewhere; the rest wait for their host.
        let why = format!("node {node} is down");
        self.unplace_from(node, &why, now_ms, |v| {
            v.spec.restart != RestartPolicy::Never
        });
        let stuck: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, v)| v.node == Some(node))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stuck {
            let why = why.clone();
            self.vms
                .update(&key, |v| v.transition(Phase::Failed, Some(why), now_ms));
        }
        Ok(CommandOutput::Done)
    }

    /// Drops every admin credential of `node`.
    fn remove_admins_of(&mut self, node: NodeId) {
        let creds: Vec<EndpointKey> = self
            .admins
            .iter()
            .filter(|(_, c)| c.node == node)
            .map(|(k, _)| *k)
            .collect();
        for key in creds {
            self.admins.remove(&key);
        }
    }

    pub(super) fn check_not_removed(&self, node: NodeId) -> Result<(), ApplyError> {
        if self.removed.contains(&node) {
            Err(ApplyError::MemberRemoved(node))
        } else {
            Ok(())
        }
    }

    /// The id the next joining node will get.
    pub fn next_node_id(&self) -> Option<NodeId> {
        self.cluster().map(|m| NodeId(m.next_node_id))
    }

    pub fn cluster(&self) -> Option<&ClusterMeta> {
        self.meta.get(&0)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn member(&self, node: NodeId) -> Option<&Member> {
        self.members.get(&node)
    }

    pub fn member_by_endpoint(&self, endpoint: &EndpointKey) -> Option<&Member> {
        self.members.values().find(|m| &m.endpoint == endpoint)
    }

    pub fn is_removed(&self, node: NodeId) -> bool {
        self.removed.contains(&node)
    }

    pub fn admin(&self, key: &EndpointKey) -> Option<&AdminCredential> {
        self.admins.get(key)
    }

    pub fn meta_get(&self, key: &str) -> Option<&String> {
        self.kv.get(&key.to_string())
    }

    pub fn meta_entries(&self) -> impl Iterator<Item = (&String, &String)> {
        self.kv.iter()
    }

    pub fn is_drained(&self, node: NodeId) -> bool {
        self.drained.contains(&node)
    }

    /// Since when the leader has had `node` marked down, if it is.
    pub fn down_since(&self, node: NodeId) -> Option<u64> {
        self.down.get(&node).copied()
    }
}

fn new_member(id: NodeId, m: &NewMember, role: MemberRole, now_ms: u64) -> Member {
    Member {
        id,
        name: m.name.clone(),
        endpoint: m.endpoint,
        addrs: m.addrs.clone(),
        labels: m.labels.clone(),
        capacity: m.capacity,
        role,
        status: MemberStatus::Active,
        joined_at_ms: now_ms,
    }
}
