//! When a leader tells its followers of a commit: at once while an entry someone waits on
//! elsewhere is uncommitted (a follower's proposal, any command but the leader's own
//! metadata writes), otherwise with the next append or heartbeat. Three real cores over
//! real redb files, messages delivered by hand until the cluster is quiet.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use blixard_core::{Command, Envelope, NodeId};
use blixard_raft::{CoreConfig, Message, RaftCore, StateRole};
use blixard_store::Store;
use raft::eraftpb::MessageType;

mod common;

struct Net {
    cores: Vec<RaftCore>,
    stores: Vec<Store>,
    next_request: u64,
    _dir: tempfile::TempDir,
}

impl Net {
    /// Three voters; node 1 is elected.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let state = common::initial_state();
        let mut cores = Vec::new();
        let mut stores = Vec::new();
        for id in 1..=3u64 {
            let store = Store::open(&dir.path().join(format!("n{id}.redb"))).unwrap();
            store.bootstrap(&state, &[1, 2, 3]).unwrap();
            cores.push(RaftCore::open(store.clone(), CoreConfig::new(id), &logger).unwrap());
            stores.push(store);
        }
        let mut net = Net {
            cores,
            stores,
            next_request: 1,
            _dir: dir,
        };
        net.cores[0].campaign().unwrap();
        net.settle();
        assert_eq!(net.cores[0].role(), StateRole::Leader);
        net
    }

    /// Runs every node's `Ready`s and writes and delivers every message until none is
    /// left; returns the messages sent.
    fn settle(&mut self) -> Vec<Message> {
        let mut sent = Vec::new();
        for _ in 0..100 {
            let mut round = Vec::new();
            for i in 0..self.cores.len() {
                loop {
                    if self.cores[i].has_ready() {
                        round.extend(self.cores[i].process_ready().unwrap().messages);
                    }
                    if let Some(n) = self.stores[i].run_queued(usize::MAX).unwrap() {
                        round.extend(self.cores[i].on_persisted(n));
                    }
                    if !self.cores[i].has_ready() {
                        break;
                    }
                }
            }
            if round.is_empty() {
                return sent;
            }
            for m in &round {
                let to = usize::try_from(m.to).unwrap() - 1;
                self.cores[to].step(m.clone()).unwrap();
            }
            sent.extend(round);
        }
        panic!("the cluster never went quiet");
    }

    fn propose(&mut self, at: usize, proposer: u64, command: Command) {
        let envelope = Envelope {
            proposer: Some(NodeId(proposer)),
            request_id: self.next_request,
            command,
        };
        self.next_request += 1;
        self.cores[at].propose(&envelope, &[]).unwrap();
    }

    fn applied(&self) -> Vec<u64> {
        self.cores.iter().map(RaftCore::applied_index).collect()
    }

    /// Every node has applied as far as the others.
    fn assert_applied_alike(&self) {
        let applied = self.applied();
        assert!(applied.iter().all(|a| *a == applied[0]), "{applied:?}");
    }
}

fn meta(key: &str) -> Command {
    Command::SetMeta {
        key: key.into(),
        value: Some("v".into()),
    }
}

/// The leader's append messages to `to` among `sent`.
fn appends_to(sent: &[Message], to: u64) -> usize {
    sent.iter()
        .filter(|m| m.from == 1 && m.to == to && m.get_msg_type() == MessageType::MsgAppend)
        .count()
}

#[test]
fn the_leaders_own_metadata_write_reaches_the_followers_commit_with_the_next_message() {
    let mut net = Net::new();
    net.propose(0, 1, meta("a"));
    let sent = net.settle();
    // One append to each follower (the entry), no second one for its commit.
    assert_eq!((appends_to(&sent, 2), appends_to(&sent, 3)), (1, 1));
    let [leader, f2, f3] = net.applied()[..] else {
        unreachable!()
    };
    assert!(f2 < leader && f3 < leader, "{:?}", net.applied());
    assert_eq!(
        net.cores[0].read_state().meta_get("a").map(String::as_str),
        Some("v")
    );

    // The next write carries the commit of the first.
    net.propose(0, 1, meta("b"));
    net.settle();
    assert_eq!(net.cores[1].applied_index(), leader);
    assert_eq!(
        net.cores[1].read_state().meta_get("a").map(String::as_str),
        Some("v")
    );

    // With none, the heartbeat does.
    for _ in 0..CoreConfig::new(1).heartbeat_tick {
        net.cores[0].tick();
    }
    net.settle();
    net.assert_applied_alike();
}

#[test]
fn what_a_follower_or_a_host_waits_on_is_committed_to_the_followers_at_once() {
    let mut net = Net::new();
    // A follower's proposal: it answers its caller once it has applied it.
    net.propose(1, 2, meta("from-a-follower"));
    let sent = net.settle();
    assert_eq!((appends_to(&sent, 2), appends_to(&sent, 3)), (2, 2));
    net.assert_applied_alike();
    assert!(net.cores[1]
        .read_state()
        .meta_get("from-a-follower")
        .is_some());

    // Any other command through the leader (a host agent may act on it).
    net.propose(
        0,
        1,
        Command::CreateTenant {
            name: "t".into(),
            now_ms: 2,
        },
    );
    let sent = net.settle();
    assert_eq!((appends_to(&sent, 2), appends_to(&sent, 3)), (2, 2));
    net.assert_applied_alike();
}

/// The raft thread wakes the host agents and the scheduler (`RaftNode::changed`) for
/// rounds that change more than metadata keys, not for each key written.
#[test]
fn metadata_writes_do_not_wake_what_watches_for_changes() {
    struct Nowhere;
    impl blixard_raft::Transport for Nowhere {
        fn send(&self, _: Vec<Message>) {}
    }
    let dir = tempfile::tempdir().unwrap();
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let store = Store::open(&dir.path().join("n1.redb")).unwrap();
    store.bootstrap(&common::initial_state(), &[1]).unwrap();
    let core = RaftCore::open(store, CoreConfig::new(1), &logger).unwrap();
    let (node, thread) = blixard_raft::RaftNode::spawn(
        core,
        std::sync::Arc::new(Nowhere),
        std::time::Duration::from_millis(5),
        None,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let within = std::time::Duration::from_secs(10);
        node.campaign();
        // The first write waits for the election.
        let mut first = None;
        for _ in 0..1000 {
            match node.propose_within(meta("warm"), within).await {
                Ok(_) => {
                    first = Some(());
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        assert!(first.is_some(), "node 1 never took its writes");
        let mut changed = node.changed();
        changed.mark_unchanged();
        for i in 0..20 {
            node.propose_within(meta(&format!("k{i}")), within)
                .await
                .unwrap();
        }
        assert!(!changed.has_changed().unwrap(), "woken by metadata writes");
        node.propose_within(
            Command::CreateTenant {
                name: "t".into(),
                now_ms: 2,
            },
            within,
        )
        .await
        .unwrap();
        // (The raft thread answers the proposer before it moves the watch.)
        tokio::time::timeout(within, changed.changed())
            .await
            .expect("not woken by a new tenant")
            .unwrap();
        assert_eq!(
            *changed.borrow_and_update(),
            node.status().await.unwrap().applied
        );
    });
    node.shutdown();
    thread.join().unwrap();
}
