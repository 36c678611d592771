//! The state machine's unit tests: bootstrap, joins, removal, users, images, keys, and
//! rows (with the format-version-1 fixture).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::{ApplyError, LoadError, State};
use crate::command::{Command, CommandOutput, JoinRequest, NewMember};
use crate::ids::{BlobHash, ClusterId, EndpointKey, NodeId, RequestId};
use crate::image::Image;
use crate::member::{Capacity, MemberRole, MemberStatus};
use crate::user::User;

fn new_member(n: u8) -> NewMember {
    NewMember {
        name: format!("node{n}"),
        endpoint: EndpointKey([n; 32]),
        addrs: vec![SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(n)))],
        labels: BTreeMap::new(),
        capacity: Capacity {
            vcpus: 4,
            memory_mib: 4096,
        },
    }
}

/// A cluster bootstrapped at this build's log version, as `node run --init` makes one.
fn bootstrapped() -> State {
    let mut s = bootstrapped_at_version_1();
    s.apply(&Command::SetClusterVersion {
        version: crate::LOG_VERSION,
    })
    .unwrap();
    s
}

/// A cluster as a release before the cluster version bootstrapped it.
fn bootstrapped_at_version_1() -> State {
    let mut s = State::new();
    s.apply(&Command::Bootstrap {
        cluster_id: ClusterId([1; 16]),
        name: "test".into(),
        member: new_member(1),
        admin: EndpointKey([100; 32]),
        now_ms: 1_000,
    })
    .unwrap();
    s
}

#[test]
fn newer_commands_wait_for_the_cluster_version() {
    let mut s = bootstrapped_at_version_1();
    assert_eq!(s.cluster_version(), 1);
    s.apply(&Command::CreateTenant {
        name: "t".into(),
        now_ms: 1,
    })
    .unwrap();
    let remove = Command::RemoveTenant { name: "t".into() };
    assert_eq!(remove.since(), 2);
    let refused = s.apply(&remove).unwrap_err();
    assert_eq!(
        refused,
        ApplyError::NeedsVersion {
            kind: "remove_tenant".into(),
            needs: 2,
            cluster: 1
        }
    );
    assert!(s.tenant("t").is_some(), "a refused command changes nothing");
    // Wrapped once under a request id, it is judged by what it wraps.
    let once = Command::Once {
        id: RequestId([7; 16]),
        now_ms: 1,
        command: Box::new(remove.clone()),
    };
    assert_eq!(once.since(), 2);
    s.apply(&Command::SetClusterVersion { version: 2 }).unwrap();
    assert_eq!(s.cluster_version(), 2);
    // Never lowered.
    s.apply(&Command::SetClusterVersion { version: 1 }).unwrap();
    assert_eq!(s.cluster_version(), 2);
    s.apply(&remove).unwrap();
    assert!(s.tenant("t").is_none());
    // The version is a row: it survives a snapshot.
    let back = State::from_rows(s.all_rows().iter().map(|r| {
        (
            r.table.as_str(),
            r.key.as_slice(),
            r.value.as_deref().unwrap(),
        )
    }))
    .unwrap();
    assert_eq!(back.cluster_version(), 2);
}

fn token(s: &mut State, secret: u8, expires: u64) -> [u8; 32] {
    let hash = [secret; 32];
    s.apply(&Command::CreateJoinToken {
        token_hash: hash,
        now_ms: 1_000,
        expires_at_ms: expires,
    })
    .unwrap();
    hash
}

fn join(s: &mut State, hash: [u8; 32], n: u8, now_ms: u64) -> Result<CommandOutput, ApplyError> {
    let node = NodeId(s.cluster().unwrap().next_node_id);
    s.apply(&Command::Join(JoinRequest {
        node,
        token_hash: hash,
        now_ms,
        member: new_member(n),
        admin: EndpointKey([100 + n; 32]),
    }))
}

#[test]
fn nothing_applies_before_bootstrap_and_bootstrap_applies_once() {
    let mut s = State::new();
    assert_eq!(s.apply(&Command::Noop), Err(ApplyError::NotBootstrapped));
    let mut s = bootstrapped();
    let again = s.apply(&Command::Bootstrap {
        cluster_id: ClusterId([2; 16]),
        name: "other".into(),
        member: new_member(9),
        admin: EndpointKey([9; 32]),
        now_ms: 5,
    });
    assert_eq!(again, Err(ApplyError::AlreadyBootstrapped));
    assert_eq!(s.cluster().unwrap().cluster_id, ClusterId([1; 16]));
    assert!(s.admin(&EndpointKey([100; 32])).is_some());
}

#[test]
fn join_tokens_are_one_time_and_expire() {
    let mut s = bootstrapped();
    let t = token(&mut s, 7, 10_000);
    assert_eq!(
        join(&mut s, t, 2, 2_000),
        Ok(CommandOutput::Joined { node: NodeId(2) })
    );
    assert_eq!(
        join(&mut s, t, 3, 2_000),
        Err(ApplyError::TokenUsed(NodeId(2)))
    );
    let t2 = token(&mut s, 8, 3_000);
    assert_eq!(join(&mut s, t2, 3, 3_000), Err(ApplyError::TokenExpired));
    assert_eq!(join(&mut s, [9; 32], 3, 1), Err(ApplyError::TokenUnknown));
    let t3 = token(&mut s, 10, 10_000);
    // The same endpoint cannot join twice.
    assert!(matches!(
        join(&mut s, t3, 2, 2_000),
        Err(ApplyError::EndpointInUse(_, NodeId(2)))
    ));
    assert_eq!(
        join(&mut s, t3, 3, 2_000),
        Ok(CommandOutput::Joined { node: NodeId(3) })
    );
    assert_eq!(s.member(NodeId(3)).unwrap().status, MemberStatus::Joining);
}

#[test]
fn an_unused_join_token_can_be_revoked_and_then_admits_no_one() {
    let mut s = bootstrapped();
    let used = token(&mut s, 7, 10_000);
    join(&mut s, used, 2, 2_000).unwrap();
    let unused = token(&mut s, 8, 10_000);
    assert_eq!(s.join_tokens().count(), 2);
    let revoke = |s: &mut State, token_hash| s.apply(&Command::RevokeJoinToken { token_hash });
    assert_eq!(revoke(&mut s, used), Err(ApplyError::TokenUsed(NodeId(2))));
    assert_eq!(revoke(&mut s, unused), Ok(CommandOutput::Done));
    assert_eq!(
        join(&mut s, unused, 3, 2_000),
        Err(ApplyError::TokenUnknown)
    );
    assert_eq!(revoke(&mut s, unused), Err(ApplyError::TokenUnknown));
    assert_eq!(s.join_tokens().count(), 1);
}

#[test]
fn removed_ids_are_never_reused_or_revived() {
    let mut s = bootstrapped();
    let t = token(&mut s, 7, 10_000);
    join(&mut s, t, 2, 2_000).unwrap();
    s.apply(&Command::SetRole {
        node: NodeId(2),
        role: MemberRole::Voter,
    })
    .unwrap();
    s.apply(&Command::RemoveMember {
        node: NodeId(2),
        now_ms: 3_000,
    })
    .unwrap();
    assert!(s.is_removed(NodeId(2)));
    assert!(s.admin(&EndpointKey([102; 32])).is_none());
    assert_eq!(
        s.apply(&Command::SetRole {
            node: NodeId(2),
            role: MemberRole::Voter
        }),
        Err(ApplyError::MemberRemoved(NodeId(2)))
    );
    let t = token(&mut s, 8, 10_000);
    assert_eq!(
        join(&mut s, t, 4, 2_000),
        Ok(CommandOutput::Joined { node: NodeId(3) })
    );
    assert_eq!(
        s.apply(&Command::RemoveMember {
            node: NodeId(1),
            now_ms: 1
        }),
        Err(ApplyError::LastVoter(NodeId(1)))
    );
}

#[test]
fn refused_commands_change_nothing() {
    let mut s = bootstrapped();
    s.drain_changes();
    let before = s.digest();
    assert!(s
        .apply(&Command::SetMeta {
            key: String::new(),
            value: Some("x".into())
        })
        .is_err());
    assert!(join(&mut s, [3; 32], 3, 1).is_err());
    assert!(s.drain_changes().is_empty());
    assert_eq!(s.digest(), before);
}

#[test]
fn rows_rebuild_the_same_state() {
    let mut s = bootstrapped();
    let t = token(&mut s, 7, 10_000);
    join(&mut s, t, 2, 2_000).unwrap();
    s.apply(&Command::SetMeta {
        key: "owner".into(),
        value: Some("ops".into()),
    })
    .unwrap();
    let rows = s.all_rows();
    let loaded = State::from_rows(rows.iter().map(|r| {
        (
            r.table.as_str(),
            r.key.as_slice(),
            r.value.as_deref().unwrap(),
        )
    }))
    .unwrap();
    assert_eq!(loaded.digest(), s.digest());
    assert_eq!(loaded.meta_get("owner").map(String::as_str), Some("ops"));
}

#[test]
fn changes_track_inserts_and_deletes() {
    let mut s = bootstrapped();
    s.drain_changes();
    s.apply(&Command::SetMeta {
        key: "a".into(),
        value: Some("1".into()),
    })
    .unwrap();
    s.apply(&Command::SetMeta {
        key: "a".into(),
        value: None,
    })
    .unwrap();
    let changes = s.drain_changes();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].table, "kv");
    assert_eq!(changes[0].value, None);
}

#[test]
fn users_have_unique_names_and_keys() {
    let mut s = bootstrapped();
    let alice = User {
        name: "alice".into(),
        key: EndpointKey([50; 32]),
        roles: vec!["operator".into()],
        tenant: Some("acme".into()),
        created_at_ms: 5,
    };
    s.apply(&Command::AddUser(alice.clone())).unwrap();
    assert_eq!(s.user_by_key(&EndpointKey([50; 32])), Some(&alice));
    assert_eq!(
        s.apply(&Command::AddUser(alice.clone())),
        Err(ApplyError::UserExists("alice".into()))
    );
    let mut bob = alice.clone();
    bob.name = "bob".into();
    assert!(matches!(
        s.apply(&Command::AddUser(bob.clone())),
        Err(ApplyError::KeyInUse(..))
    ));
    bob.key = EndpointKey([100; 32]); // the admin credential of node 1
    assert!(matches!(
        s.apply(&Command::AddUser(bob.clone())),
        Err(ApplyError::KeyInUse(..))
    ));
    bob.key = EndpointKey([51; 32]);
    bob.name = "Bob!".into();
    assert!(matches!(
        s.apply(&Command::AddUser(bob.clone())),
        Err(ApplyError::InvalidUser(_))
    ));
    bob.name = "bob".into();
    bob.roles = vec![];
    assert!(matches!(
        s.apply(&Command::AddUser(bob)),
        Err(ApplyError::InvalidUser(_))
    ));
    s.apply(&Command::RemoveUser {
        name: "alice".into(),
    })
    .unwrap();
    assert!(s.user("alice").is_none());
    assert_eq!(
        s.apply(&Command::RemoveUser {
            name: "alice".into()
        }),
        Err(ApplyError::UnknownUser("alice".into()))
    );
}

#[test]
fn stored_rows_from_format_version_1_still_decode() {
    // Fixture: a `kv` row as format version 1 writes it. If this test fails, the
    // encoding changed: add a new version instead of changing this one.
    let key = [1u8, 5, b'o', b'w', b'n', b'e', b'r'];
    let value = [1u8, 3, b'o', b'p', b's'];
    let s = State::from_rows([("kv", &key[..], &value[..])]).unwrap();
    assert_eq!(s.meta_get("owner").map(String::as_str), Some("ops"));
    let future = [2u8, 3, b'o', b'p', b's'];
    assert!(matches!(
        State::from_rows([("kv", &key[..], &future[..])]),
        Err(LoadError::Row { .. })
    ));
    assert!(matches!(
        State::from_rows([("vms_v9", &key[..], &value[..])]),
        Err(LoadError::UnknownTable(_))
    ));
}

fn image(name: &str, manifest: u8, holder: u64) -> Image {
    Image {
        name: name.into(),
        manifest: BlobHash([manifest; 32]),
        root: "/nix/store/aaaa-web".into(),
        store_dir: "/nix/store".into(),
        nar_count: 2,
        nar_size: 1024,
        holders: [NodeId(holder)].into(),
        pinned: false,
        tenant: None,
        created_at_ms: 5,
    }
}

#[test]
fn images_register_gain_holders_pin_and_go() {
    let mut s = bootstrapped();
    let t = token(&mut s, 9, 10_000);
    join(&mut s, t, 2, 2_000).unwrap();
    s.apply(&Command::AddImage(image("web", 1, 1))).unwrap();
    // The same closure again from another node adds a holder; another closure under the
    // same name is refused.
    s.apply(&Command::AddImage(image("web", 1, 2))).unwrap();
    assert_eq!(
        s.image("web").unwrap().holders,
        [NodeId(1), NodeId(2)].into()
    );
    assert_eq!(
        s.apply(&Command::AddImage(image("web", 2, 1))),
        Err(ApplyError::ImageExists("web".into()))
    );
    assert_eq!(
        s.apply(&Command::SetImageHolder {
            name: "web".into(),
            manifest: BlobHash([2; 32]),
            node: NodeId(2),
            held: false
        }),
        Err(ApplyError::ImageChanged("web".into()))
    );
    s.apply(&Command::SetImageHolder {
        name: "web".into(),
        manifest: BlobHash([1; 32]),
        node: NodeId(2),
        held: false,
    })
    .unwrap();
    assert_eq!(s.image("web").unwrap().holders, [NodeId(1)].into());
    // Holders must be members.
    assert_eq!(
        s.apply(&Command::AddImage(image("other", 3, 7))),
        Err(ApplyError::UnknownMember(NodeId(7)))
    );
    // Bad shapes.
    let mut bad = image("Bad Name", 4, 1);
    assert!(matches!(
        s.apply(&Command::AddImage(bad.clone())),
        Err(ApplyError::InvalidImage(_))
    ));
    bad = image("ok", 4, 1);
    bad.root = "/elsewhere/x".into();
    assert!(matches!(
        s.apply(&Command::AddImage(bad.clone())),
        Err(ApplyError::InvalidImage(_))
    ));
    bad = image("ok", 4, 1);
    bad.nar_count = 0;
    assert!(matches!(
        s.apply(&Command::AddImage(bad)),
        Err(ApplyError::InvalidImage(_))
    ));
    // Pinned images stay.
    s.apply(&Command::PinImage {
        name: "web".into(),
        pinned: true,
    })
    .unwrap();
    assert_eq!(
        s.apply(&Command::RemoveImage { name: "web".into() }),
        Err(ApplyError::ImagePinned("web".into()))
    );
    s.apply(&Command::PinImage {
        name: "web".into(),
        pinned: false,
    })
    .unwrap();
    s.apply(&Command::RemoveImage { name: "web".into() })
        .unwrap();
    assert!(s.image("web").is_none());
    assert_eq!(
        s.apply(&Command::RemoveImage { name: "web".into() }),
        Err(ApplyError::UnknownImage("web".into()))
    );
}

#[test]
fn removed_members_stop_holding_images_and_the_cache_key_is_set_once() {
    let mut s = bootstrapped();
    let t = token(&mut s, 9, 10_000);
    join(&mut s, t, 2, 2_000).unwrap();
    s.apply(&Command::AddImage(image("web", 1, 2))).unwrap();
    s.apply(&Command::RemoveMember {
        node: NodeId(2),
        now_ms: 3_000,
    })
    .unwrap();
    assert!(s.image("web").unwrap().holders.is_empty());
    s.apply(&Command::SetCacheKey {
        secret: "first".into(),
    })
    .unwrap();
    s.apply(&Command::SetCacheKey {
        secret: "second".into(),
    })
    .unwrap();
    assert_eq!(s.cache_key().map(String::as_str), Some("first"));
    let copy = State::from_rows(s.all_rows().iter().map(|r| {
        (
            r.table.as_str(),
            r.key.as_slice(),
            r.value.as_deref().unwrap_or_default(),
        )
    }))
    .unwrap();
    assert_eq!(copy.digest(), s.digest());
}

#[test]
fn a_user_key_is_rotated_in_place_and_must_be_unused() {
    let mut s = bootstrapped();
    let user = |name: &str, key: u8| User {
        name: name.into(),
        key: EndpointKey([key; 32]),
        roles: vec!["viewer".into()],
        tenant: Some("acme".into()),
        created_at_ms: 1,
    };
    s.apply(&Command::AddUser(user("alice", 40))).unwrap();
    s.apply(&Command::AddUser(user("bob", 41))).unwrap();
    s.apply(&Command::SetUserKey {
        name: "alice".into(),
        key: EndpointKey([42; 32]),
    })
    .unwrap();
    let alice = s.user("alice").unwrap();
    assert_eq!(alice.key, EndpointKey([42; 32]));
    assert_eq!(alice.tenant.as_deref(), Some("acme"));
    assert!(
        s.user_by_key(&EndpointKey([40; 32])).is_none(),
        "the old key is gone"
    );
    assert!(matches!(
        s.apply(&Command::SetUserKey {
            name: "alice".into(),
            key: EndpointKey([41; 32]),
        }),
        Err(ApplyError::KeyInUse(..))
    ));
    assert!(matches!(
        s.apply(&Command::SetUserKey {
            name: "carol".into(),
            key: EndpointKey([43; 32]),
        }),
        Err(ApplyError::UnknownUser(_))
    ));
}

#[test]
fn an_admin_credential_is_rotated_in_place() {
    let mut s = bootstrapped();
    let old = EndpointKey([100; 32]);
    assert!(s.admin(&old).is_some());
    s.apply(&Command::SetAdminKey {
        node: NodeId(1),
        key: EndpointKey([101; 32]),
        now_ms: 5,
    })
    .unwrap();
    assert!(s.admin(&old).is_none(), "the old credential is gone");
    assert_eq!(s.admin(&EndpointKey([101; 32])).unwrap().node, NodeId(1));
    // A key someone holds (here: node 1's own endpoint key) is refused.
    assert!(matches!(
        s.apply(&Command::SetAdminKey {
            node: NodeId(1),
            key: EndpointKey([1; 32]),
            now_ms: 6,
        }),
        Err(ApplyError::KeyInUse(..))
    ));
    assert!(matches!(
        s.apply(&Command::SetAdminKey {
            node: NodeId(9),
            key: EndpointKey([102; 32]),
            now_ms: 6,
        }),
        Err(ApplyError::UnknownMember(_))
    ));
}

fn once(id: u8, now_ms: u64, command: Command) -> Command {
    Command::Once {
        id: crate::ids::RequestId([id; 16]),
        now_ms,
        command: Box::new(command),
    }
}

fn set(key: &str, value: &str) -> Command {
    Command::SetMeta {
        key: key.into(),
        value: Some(value.into()),
    }
}

#[test]
fn a_command_under_a_request_id_is_applied_once() {
    let mut s = bootstrapped();
    s.drain_changes();
    assert_eq!(
        s.apply(&once(1, 2_000, set("k", "a"))),
        Ok(CommandOutput::Done)
    );
    assert_eq!(s.meta_get("k").map(String::as_str), Some("a"));
    assert!(!s.drain_changes().is_empty());
    // Another write in between; the retry of the first changes nothing, returns the same.
    s.apply(&set("k", "b")).unwrap();
    s.drain_changes();
    assert_eq!(
        s.apply(&once(1, 2_500, set("k", "a"))),
        Ok(CommandOutput::Done)
    );
    assert_eq!(s.meta_get("k").map(String::as_str), Some("b"));
    assert!(s.drain_changes().is_empty(), "a duplicate writes no row");
    // A refused command is not remembered: its retry is judged again.
    let bad = Command::RemoveUser {
        name: "nobody".into(),
    };
    assert!(s.apply(&once(2, 3_000, bad.clone())).is_err());
    assert!(s.applied_request(&crate::ids::RequestId([2; 16])).is_none());
    // What cannot be wrapped is refused.
    for inner in [
        once(4, 1, Command::Noop),
        Command::Join(JoinRequest {
            node: NodeId(9),
            token_hash: [0; 32],
            now_ms: 1,
            member: new_member(9),
            admin: EndpointKey([9; 32]),
        }),
    ] {
        assert!(matches!(
            s.apply(&once(3, 3_000, inner)),
            Err(ApplyError::NotOnce(_))
        ));
    }
}

#[test]
fn request_ids_expire_after_the_window_and_survive_a_snapshot() {
    use super::requests::WINDOW_MS;
    let mut s = bootstrapped();
    s.apply(&once(1, 1_000, set("a", "1"))).unwrap();
    s.apply(&once(2, 2_000, set("b", "1"))).unwrap();
    // The rows carry the ids: a node restored from them deduplicates the same way.
    let rows = s.all_rows();
    let mut restored = State::from_rows(rows.iter().map(|r| {
        (
            r.table.as_str(),
            r.key.as_slice(),
            r.value.as_deref().unwrap(),
        )
    }))
    .unwrap();
    restored.apply(&set("a", "2")).unwrap();
    restored.apply(&once(1, 3_000, set("a", "1"))).unwrap();
    assert_eq!(restored.meta_get("a").map(String::as_str), Some("2"));
    // Past the window, id 1 is forgotten (and id 2 with it once its time is up).
    s.apply(&once(3, 1_000 + WINDOW_MS + 1, set("c", "1")))
        .unwrap();
    assert!(s.applied_request(&crate::ids::RequestId([1; 16])).is_none());
    assert!(s.applied_request(&crate::ids::RequestId([2; 16])).is_some());
    assert!(s.applied_request(&crate::ids::RequestId([3; 16])).is_some());
}

#[test]
fn the_nth_request_id_is_distinct_and_stable() {
    let id = crate::ids::RequestId([7; 16]);
    assert_eq!(id.nth(0), id);
    let ids: std::collections::BTreeSet<_> = (0..1000).map(|n| id.nth(n)).collect();
    assert_eq!(ids.len(), 1000);
    assert_eq!(id.nth(5), id.nth(5));
}

#[test]
fn learners_joined_by_a_learner_token_stay_learners_until_promoted() {
    let mut s = bootstrapped();
    let hash = [42; 32];
    s.apply(&Command::CreateLearnerToken {
        token_hash: hash,
        now_ms: 1_000,
        expires_at_ms: 5_000,
    })
    .unwrap();
    assert!(s.is_learner_token(&hash));
    join(&mut s, hash, 2, 2_000).unwrap();
    let n2 = NodeId(2);
    assert!(s.is_kept_learner(n2));
    assert_eq!(s.member(n2).unwrap().status, MemberStatus::Joining);
    // Caught up, the leader marks it active; it stays a learner.
    s.apply(&Command::SetRole {
        node: n2,
        role: MemberRole::Learner,
    })
    .unwrap();
    let m = s.member(n2).unwrap();
    assert_eq!(
        (m.role, m.status),
        (MemberRole::Learner, MemberStatus::Active)
    );
    assert!(s.is_kept_learner(n2));
    // A plain token's node is not kept a learner.
    let plain = token(&mut s, 7, 5_000);
    join(&mut s, plain, 3, 2_000).unwrap();
    assert!(!s.is_kept_learner(NodeId(3)));

    // Promote, then demote: the role and the mark follow; a no-op change is refused.
    let promote = Command::ChangeRole {
        node: n2,
        role: MemberRole::Voter,
    };
    assert_eq!(promote.since(), 3);
    s.apply(&promote).unwrap();
    assert_eq!(s.member(n2).unwrap().role, MemberRole::Voter);
    assert!(!s.is_kept_learner(n2));
    // A late "mark it active" (proposed before the promotion, or again by a new leader)
    // does not take the role back.
    s.apply(&Command::SetRole {
        node: n2,
        role: MemberRole::Learner,
    })
    .unwrap();
    assert_eq!(s.member(n2).unwrap().role, MemberRole::Voter);
    assert_eq!(
        s.apply(&promote).unwrap_err(),
        ApplyError::SameRole(n2, MemberRole::Voter)
    );
    s.apply(&Command::ChangeRole {
        node: NodeId(1),
        role: MemberRole::Learner,
    })
    .unwrap();
    assert!(s.is_kept_learner(NodeId(1)));
    // The only voter left is not demoted.
    assert_eq!(
        s.apply(&Command::ChangeRole {
            node: n2,
            role: MemberRole::Learner,
        })
        .unwrap_err(),
        ApplyError::OnlyVoter(n2)
    );
    // Removal forgets the mark; revoking a learner token forgets it too.
    s.apply(&Command::RemoveMember {
        node: NodeId(1),
        now_ms: 3_000,
    })
    .unwrap();
    assert!(!s.is_kept_learner(NodeId(1)));
    let unused = [43; 32];
    s.apply(&Command::CreateLearnerToken {
        token_hash: unused,
        now_ms: 1_000,
        expires_at_ms: 5_000,
    })
    .unwrap();
    s.apply(&Command::RevokeJoinToken { token_hash: unused })
        .unwrap();
    assert!(!s.is_learner_token(&unused));
}

#[test]
fn learner_commands_wait_for_cluster_version_3() {
    let mut s = bootstrapped_at_version_1();
    s.apply(&Command::SetClusterVersion { version: 2 }).unwrap();
    let refused = s
        .apply(&Command::CreateLearnerToken {
            token_hash: [1; 32],
            now_ms: 1,
            expires_at_ms: 2,
        })
        .unwrap_err();
    assert_eq!(
        refused,
        ApplyError::NeedsVersion {
            kind: "create_learner_token".into(),
            needs: 3,
            cluster: 2
        }
    );
}
