//! A state turned into the first state of a cluster with one voter: restoring a backup on
//! a fresh node, and a survivor forcing a new cluster after its majority is gone for good.
//! Both go through the same operations as the log (`join`, `set_role`, `remove_member`),
//! so the other members' VMs are unplaced, their images' holds and admin credentials
//! dropped, and their ids never reused, exactly as if each had left.

use super::{ApplyError, State};
use crate::command::{JoinRequest, NewMember};
use crate::ids::{ClusterId, EndpointKey, NodeId};
use crate::member::MemberRole;

/// A node taking over a backed-up state.
#[derive(Clone, Debug)]
pub struct Restore {
    /// The cluster id from now on (a new one, unless the operator keeps the old).
    pub cluster_id: ClusterId,
    pub member: NewMember,
    /// This node's admin credential.
    pub admin: EndpointKey,
    pub now_ms: u64,
}

impl State {
    /// Makes this (a backup's) state the first state of a new cluster whose only member is
    /// the restoring node: it joins under the next node id as a voter, every other member
    /// is removed, and the join tokens go (tickets of the old cluster name its members).
    /// Returns the new node's id.
    pub fn restore(&mut self, r: &Restore) -> Result<NodeId, ApplyError> {
        let node = self.next_node_id().ok_or(ApplyError::NotBootstrapped)?;
        // A token of its own, spent at once (every token goes below).
        let mut token_hash = [0xff; 32];
        token_hash[..8].copy_from_slice(&node.0.to_be_bytes());
        self.tokens.clear();
        self.create_join_token(&token_hash, r.now_ms, r.now_ms.saturating_add(1))?;
        self.join(&JoinRequest {
            node,
            token_hash,
            now_ms: r.now_ms,
            member: r.member.clone(),
            admin: r.admin,
        })?;
        self.set_role(node, MemberRole::Voter)?;
        self.remove_all_but(node, r.now_ms)?;
        self.tokens.clear();
        self.learner_tokens.clear();
        if let Some(mut meta) = self.cluster().cloned() {
            meta.cluster_id = r.cluster_id;
            self.meta.insert(0, meta);
        }
        Ok(node)
    }

    /// Keeps `me` as the only member (a voter): every other member is removed as if it
    /// had left. For `node run --force-new-cluster` on the survivor of a lost majority.
    /// Returns the members removed.
    pub fn force_new_cluster(
        &mut self,
        me: NodeId,
        now_ms: u64,
    ) -> Result<Vec<NodeId>, ApplyError> {
        if self.member(me).is_none() {
            return Err(ApplyError::UnknownMember(me));
        }
        self.set_role(me, MemberRole::Voter)?;
        self.remove_all_but(me, now_ms)
    }

    fn remove_all_but(&mut self, me: NodeId, now_ms: u64) -> Result<Vec<NodeId>, ApplyError> {
        let others: Vec<NodeId> = self
            .members()
            .map(|m| m.id)
            .filter(|id| *id != me)
            .collect();
        for node in &others {
            self.remove_member(*node, now_ms)?;
        }
        Ok(others)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::command::Command;
    use crate::member::{Capacity, MemberStatus};
    use crate::vm::{Desired, Phase, VmSpec};
    use crate::BlobHash;

    fn member(name: &str, key: u8) -> NewMember {
        NewMember {
            name: name.into(),
            endpoint: EndpointKey([key; 32]),
            addrs: vec![],
            labels: BTreeMap::new(),
            capacity: Capacity {
                vcpus: 8,
                memory_mib: 8192,
            },
        }
    }

    /// Three members (1 voter + 2 joined and promoted), a VM on n2, an image held by n3.
    fn cluster() -> State {
        let mut s = State::new();
        s.apply(&Command::Bootstrap {
            cluster_id: ClusterId([1; 16]),
            name: "c".into(),
            member: member("n1", 1),
            admin: EndpointKey([101; 32]),
            now_ms: 1,
        })
        .unwrap();
        for (id, key) in [(2u64, 2u8), (3, 3)] {
            let token_hash = [key; 32];
            s.apply(&Command::CreateJoinToken {
                token_hash,
                now_ms: 1,
                expires_at_ms: 1_000_000,
            })
            .unwrap();
            s.apply(&Command::Join(JoinRequest {
                node: NodeId(id),
                token_hash,
                now_ms: 2,
                member: member(&format!("n{id}"), key),
                admin: EndpointKey([100 + key; 32]),
            }))
            .unwrap();
            s.apply(&Command::SetRole {
                node: NodeId(id),
                role: MemberRole::Voter,
            })
            .unwrap();
        }
        s.apply(&Command::CreateJoinToken {
            token_hash: [9; 32],
            now_ms: 3,
            expires_at_ms: 1_000_000,
        })
        .unwrap();
        s.apply(&Command::AddImage(crate::Image {
            name: "web".into(),
            manifest: BlobHash([7; 32]),
            root: "/nix/store/aaaa-web".into(),
            store_dir: "/nix/store".into(),
            nar_count: 1,
            nar_size: 10,
            holders: [NodeId(3)].into(),
            pinned: false,
            tenant: None,
            created_at_ms: 3,
        }))
        .unwrap();
        s.apply(&Command::CreateTenant {
            name: "default".into(),
            now_ms: 3,
        })
        .unwrap();
        let spec = VmSpec {
            name: "vm1".into(),
            tenant: "default".into(),
            image: "web".into(),
            vcpus: 1,
            memory_mib: 256,
            labels: BTreeMap::new(),
            constraints: BTreeMap::new(),
            anti_affinity: None,
            restart: crate::RestartPolicy::Always,
            ready_marker: None,
        };
        s.apply(&Command::CreateVm {
            spec,
            start: true,
            now_ms: 4,
            placement: None,
        })
        .unwrap();
        let generation = s.vm("default/vm1").unwrap().generation;
        s.apply(&Command::PlaceVm {
            key: "default/vm1".into(),
            generation,
            node: Some(NodeId(2)),
            reason: None,
            cpu_overcommit_pct: 100,
            memory_overcommit_pct: 100,
            now_ms: 5,
        })
        .unwrap();
        s
    }

    #[test]
    fn a_restored_state_has_one_voter_under_a_new_id_and_keeps_the_rest() {
        let mut s = cluster();
        let node = s
            .restore(&Restore {
                cluster_id: ClusterId([2; 16]),
                member: member("fresh", 50),
                admin: EndpointKey([150; 32]),
                now_ms: 10,
            })
            .unwrap();
        assert_eq!(node, NodeId(4), "ids are never reused");
        let members: Vec<_> = s.members().collect();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].id, node);
        assert_eq!(members[0].role, MemberRole::Voter);
        assert_eq!(members[0].status, MemberStatus::Active);
        for old in 1..=3 {
            assert!(s.is_removed(NodeId(old)));
        }
        assert_eq!(s.cluster().unwrap().cluster_id, ClusterId([2; 16]));
        assert_eq!(s.cluster().unwrap().next_node_id, 5);
        // Only the new node's admin credential; no join token of the old cluster.
        assert!(s.admin(&EndpointKey([101; 32])).is_none());
        assert_eq!(s.admin(&EndpointKey([150; 32])).unwrap().node, node);
        assert!(s.tokens.is_empty());
        // The VM stays, wanted running, and waits to be placed again; the image stays,
        // held by no one until it is imported again.
        let vm = s.vm("default/vm1").unwrap();
        assert_eq!(
            (vm.desired, vm.phase, vm.node),
            (Desired::Running, Phase::Pending, None)
        );
        assert!(s.image("web").unwrap().holders.is_empty());
    }

    #[test]
    fn a_forced_new_cluster_keeps_the_survivor_and_its_id() {
        let mut s = cluster();
        let removed = s.force_new_cluster(NodeId(3), 10).unwrap();
        assert_eq!(removed, vec![NodeId(1), NodeId(2)]);
        assert_eq!(
            s.members().map(|m| m.id).collect::<Vec<_>>(),
            vec![NodeId(3)]
        );
        assert_eq!(s.cluster().unwrap().cluster_id, ClusterId([1; 16]));
        assert_eq!(s.image("web").unwrap().holders, [NodeId(3)].into());
        assert_eq!(s.vm("default/vm1").unwrap().node, None);
        assert_eq!(
            s.force_new_cluster(NodeId(9), 11),
            Err(ApplyError::UnknownMember(NodeId(9)))
        );
    }
}
