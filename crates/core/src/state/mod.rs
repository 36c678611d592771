//! The replicated cluster state and its deterministic `apply`.
//!
//! [`State`] is a set of [`Table`]s, listed once in the `tables!` invocation below.
//! [`State::apply`] hands each command to one method, kept with its family: `members.rs`
//! (the cluster, its metadata, members, join tokens, admin credentials, drained and down
//! hosts), `users.rs` (users and policies), `images.rs` (images and the binary-cache key),
//! `vms.rs` (tenants, quotas and VMs), `requests.rs` (commands applied once per client
//! request id). `rows.rs` turns the tables into rows and back.

mod error;
mod images;
mod members;
mod recover;
mod requests;
mod rows;
mod users;
mod vms;

#[cfg(test)]
mod tests;

pub use error::ApplyError;
pub use recover::Restore;
pub use requests::Outcome;
pub use rows::LoadError;

use crate::command::{Command, CommandOutput};
use crate::ids::{EndpointKey, NodeId, RequestId};
use crate::image::Image;
use crate::member::{AdminCredential, ClusterMeta, JoinToken, Member};
use crate::scheduler::Placement;
use crate::table::{AnyTable, Table};
use crate::user::User;
use crate::vm::{Tenant, Vm};

/// What the methods that apply one command return.
type Applied = Result<CommandOutput, ApplyError>;

/// Declares [`State`] from one list of tables: the struct, `new`, and `tables` /
/// `tables_mut`, which list every table in declaration order. That order is the order of
/// rows in `drain_changes` and `all_rows`, and so it is part of `digest`: append new
/// tables at the end.
macro_rules! tables {
    ($( $(#[$doc:meta])* $field:ident: $table:ty = $name:literal, )+) => {
        /// The whole replicated state: one [`Table`] per field.
        #[derive(Clone, Debug)]
        pub struct State {
            $( $(#[$doc])* $field: $table, )+
        }

        /// How many tables the state has.
        const TABLES: usize = <[&str]>::len(&[$( $name ),+]);

        impl State {
            /// An empty state: every table empty.
            pub fn new() -> Self {
                Self {
                    $( $field: Table::new($name), )+
                }
            }

            /// Every table, in declaration order.
            fn tables(&self) -> [&dyn AnyTable; TABLES] {
                [$( &self.$field ),+]
            }

            /// Every table, mutably, in declaration order.
            fn tables_mut(&mut self) -> [&mut dyn AnyTable; TABLES] {
                [$( &mut self.$field ),+]
            }
        }
    };
}

tables! {
    /// The cluster's identity, under key 0.
    meta: Table<u8, ClusterMeta> = "meta",
    members: Table<NodeId, Member> = "members",
    /// Removed members, and when they were removed.
    removed: Table<NodeId, u64> = "removed",
    admins: Table<EndpointKey, AdminCredential> = "admins",
    /// Join tokens by the hash of their secret.
    tokens: Table<[u8; 32], JoinToken> = "join_tokens",
    /// Cluster metadata set with `SetMeta`.
    kv: Table<String, String> = "kv",
    users: Table<String, User> = "users",
    /// The authorization policies, under key 0.
    policies: Table<u8, String> = "policies",
    images: Table<String, Image> = "images",
    /// The binary-cache signing key, under key 0.
    cache_key: Table<u8, String> = "cache_key",
    tenants: Table<String, Tenant> = "tenants",
    /// VMs by `tenant/name`.
    vms: Table<String, Vm> = "vms",
    drained: Table<NodeId, bool> = "drained",
    /// Hosts marked down by the leader, and since when.
    down: Table<NodeId, u64> = "down",
    /// The results of commands applied under a client request id (`Command::Once`).
    requests: Table<RequestId, requests::Done> = "requests",
    /// The same ids in the order they were applied, for expiry.
    request_order: Table<u64, RequestId> = "request_order",
    /// The cluster version (see [`crate::LOG_VERSION`]), under key 0; absent means 1.
    version: Table<u8, u32> = "cluster_version",
    /// The join tokens (by hash) whose node joins as a learner and stays one.
    learner_tokens: Table<[u8; 32], bool> = "learner_tokens",
    /// Members kept learners by the operator (`--learner`, `cluster demote`): the leader
    /// does not promote them once they catch up.
    kept_learners: Table<NodeId, bool> = "kept_learners",
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    /// Applies one command. Deterministic: the same state and command give the same
    /// result and the same changed rows on every node.
    pub fn apply(&mut self, command: &Command) -> Result<CommandOutput, ApplyError> {
        if !matches!(command, Command::Bootstrap { .. }) && self.cluster().is_none() {
            return Err(ApplyError::NotBootstrapped);
        }
        self.admits_version(command)?;
        match command {
            Command::Noop => Ok(CommandOutput::Done),
            // The cluster and its members (members.rs).
            Command::Bootstrap {
                cluster_id,
                name,
                member,
                admin,
                now_ms,
            } => self.bootstrap(*cluster_id, name, member, *admin, *now_ms),
            Command::SetMeta { key, value } => self.set_meta(key, value.as_deref()),
            Command::CreateJoinToken {
                token_hash,
                now_ms,
                expires_at_ms,
            } => self.create_join_token(token_hash, *now_ms, *expires_at_ms),
            Command::CreateLearnerToken {
                token_hash,
                now_ms,
                expires_at_ms,
            } => {
                self.create_join_token(token_hash, *now_ms, *expires_at_ms)?;
                self.learner_tokens.insert(*token_hash, true);
                Ok(CommandOutput::Done)
            }
            Command::Join(request) => self.join(request),
            Command::ChangeRole { node, role } => self.change_role(*node, *role),
            Command::SetRole { node, role } => self.set_role(*node, *role),
            Command::RemoveMember { node, now_ms } => self.remove_member(*node, *now_ms),
            Command::UpdateAddrs { node, addrs } => self.update_addrs(*node, addrs),
            Command::SetAdminKey { node, key, now_ms } => self.set_admin_key(*node, key, *now_ms),
            Command::SetDrained {
                node,
                drained,
                now_ms,
            } => self.set_drained(*node, *drained, *now_ms),
            Command::SetNodeDown { node, down, now_ms } => {
                self.set_node_down(*node, *down, *now_ms)
            }
            // Users and policies (users.rs).
            Command::AddUser(user) => self.add_user(user),
            Command::RemoveUser { name } => self.remove_user(name),
            Command::SetUserKey { name, key } => self.set_user_key(name, key),
            Command::SetPolicies { text } => self.set_policies(text),
            // Images (images.rs).
            Command::AddImage(image) => self.add_image(image),
            Command::SetImageHolder {
                name,
                manifest,
                node,
                held,
            } => self.set_image_holder(name, manifest, *node, *held),
            Command::PinImage { name, pinned } => self.pin_image(name, *pinned),
            Command::RemoveImage { name } => self.remove_image(name),
            Command::SetCacheKey { secret } => self.set_cache_key(secret),
            // Tenants and VMs (vms.rs).
            Command::CreateTenant { name, now_ms } => self.create_tenant(name, *now_ms),
            Command::SetQuota { tenant, quota } => self.set_quota(tenant, *quota),
            Command::RemoveTenant { name } => self.remove_tenant(name),
            Command::RevokeJoinToken { token_hash } => self.revoke_join_token(token_hash),
            Command::CreateVm {
                spec,
                start,
                now_ms,
                placement,
            } => self.create_vm(spec, *start, *now_ms, placement.as_ref()),
            Command::PlaceVm {
                key,
                generation,
                node,
                reason,
                cpu_overcommit_pct,
                memory_overcommit_pct,
                now_ms,
            } => {
                let placement = node.map(|node| Placement {
                    node,
                    cpu_overcommit_pct: *cpu_overcommit_pct,
                    memory_overcommit_pct: *memory_overcommit_pct,
                });
                self.place_vm(key, *generation, placement, reason, *now_ms)
            }
            Command::DeleteVm { key } => self.delete_vm(key),
            Command::SetVmDesired {
                key,
                desired,
                restart,
                now_ms,
            } => self.set_vm_desired(key, *desired, *restart, *now_ms),
            Command::ReportVm {
                key,
                node,
                generation,
                phase,
                reason,
                now_ms,
            } => self.report_vm(key, *node, *generation, *phase, reason, *now_ms),
            // Commands applied once per request id (requests.rs).
            Command::Once {
                id,
                now_ms,
                command,
            } => self.apply_once(*id, *now_ms, command).result,
            Command::CheckState { .. } => Ok(CommandOutput::Done),
            Command::SetClusterVersion { version } => {
                if *version > self.cluster_version() {
                    self.version.insert(0, *version);
                }
                Ok(CommandOutput::Done)
            }
        }
    }

    /// Refuses a command newer than the cluster version ([`Command::since`]), which a
    /// member may not be able to decode. `SetClusterVersion` itself is how the version
    /// rises, and is always admitted (it only ever raises it).
    pub fn admits_version(&self, command: &Command) -> Result<(), ApplyError> {
        let cluster = self.cluster_version();
        if command.since() > cluster && !matches!(command, Command::SetClusterVersion { .. }) {
            return Err(ApplyError::NeedsVersion {
                kind: command.kind().to_string(),
                needs: command.since(),
                cluster,
            });
        }
        Ok(())
    }

    /// The cluster version: the log version every member applies (1 until the leader
    /// first raises it).
    pub fn cluster_version(&self) -> u32 {
        self.version.get(&0).copied().unwrap_or(1)
    }

    /// [`Self::apply`] for a committed log entry, saying also whether it was the repeat
    /// of a request id applied before (which changed nothing).
    pub fn apply_entry(&mut self, command: &Command) -> Outcome {
        match command {
            Command::Once {
                id,
                now_ms,
                command,
            } if self.cluster().is_some() => self.apply_once(*id, *now_ms, command),
            _ => Outcome {
                result: self.apply(command),
                repeat: false,
            },
        }
    }
}
