//! A deterministic, seeded simulation of 3- and 5-node clusters: real `RaftCore`s over real
//! redb `Store`s, an in-memory network that drops, delays, reorders and duplicates
//! messages, random partitions, and crash/restart of nodes from their database files.
//!
//! Checked after every round:
//! * at most one leader per term, over the whole run;
//! * every committed entry a node holds (read from its store up to its persisted commit
//!   index) agrees with every other node's entry at that index, and never changes;
//! * a node's persisted commit index never goes backwards, across restarts too;
//! * every node that has applied up to index `i` has the same state digest at `i`;
//! * the applied index a restart finds is the one the node had before the crash, and the
//!   stored applied index never passes the stored commit index;
//! * a ReadIndex answer is never below a commit index some node had persisted before the
//!   read was asked for.
//!
//! At the end all partitions heal, all nodes restart, the network behaves, and all nodes
//! must converge: same applied index, same digest, a final write visible everywhere, and
//! the same again after reopening every store. Seeds whose log was never compacted also
//! replay the committed log into a fresh state and compare digests. Nodes that were down
//! while the log was compacted catch up by snapshot; the run asserts some did.
//!
//! Determinism: everything random comes from one seeded PRNG, and all maps are BTreeMaps.
//! raft-rs draws its randomised election timeout from `thread_rng`, so followers are
//! never ticked; their election timer is emulated from the seed (see `Sim::tick`).
//!
//! `BLIXARD_SIM_SEEDS=<n>` runs seeds `0..n` (default 200; even seeds run 3 nodes, odd
//! seeds 5). `BLIXARD_SIM_SEED=<n>` replays one seed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Instant;

use blixard_core::{Command, CommandOutput, Envelope, NodeId};
use blixard_raft::{CoreConfig, Message, RaftCore, StateRole};
use blixard_store::Store;
use raft::eraftpb::MessageType;
use raft::{GetEntriesContext, Storage};

mod common;

const DEFAULT_SEEDS: u64 = 200;
const ELECTION_TICK: u64 = 10;

// ---------------------------------------------------------------------------------------
// A tiny deterministic PRNG (splitmix64).
// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille / 1000`.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

// ---------------------------------------------------------------------------------------
// Parameters and statistics
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Params {
    nodes: u64,
    /// Rounds with faults; one round delivers the messages due and handles every `Ready`.
    fault_rounds: u64,
    /// Rounds per raft tick.
    tick_every: u64,
    drop_pm: u64,
    dup_pm: u64,
    max_delay: u64,
    propose_pm: u64,
    crash_pm: u64,
    partition_pm: u64,
    max_size_per_msg: u64,
    max_inflight_msgs: usize,
    /// Small in most seeds, so that logs are compacted and lagging nodes need snapshots;
    /// large in some, so that no entry is compacted before the checks read it and the
    /// whole committed log can be replayed at the end.
    snapshot_threshold: u64,
    /// Per mille of rounds in which a node leaves its queued writes for later (the store's
    /// writer is asynchronous; a crash loses what is still queued).
    write_lag_pm: u64,
}

impl Params {
    fn for_seed(seed: u64, rng: &mut Rng) -> Self {
        Params {
            nodes: if seed.is_multiple_of(2) { 3 } else { 5 },
            fault_rounds: 500,
            tick_every: 2,
            drop_pm: rng.range(0, 150),
            dup_pm: rng.range(0, 100),
            max_delay: rng.range(1, 4),
            propose_pm: rng.range(200, 600),
            crash_pm: rng.range(5, 25),
            partition_pm: rng.range(3, 15),
            max_size_per_msg: if rng.chance(500) { 300 } else { 1024 * 1024 },
            max_inflight_msgs: if rng.chance(500) { 4 } else { 256 },
            snapshot_threshold: if rng.chance(800) { 20 } else { 100_000 },
            write_lag_pm: if rng.chance(300) {
                0
            } else {
                rng.range(100, 800)
            },
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Stats {
    seeds: u64,
    committed: u64,
    proposals_applied: u64,
    snapshots_sent: u64,
    snapshots_installed: u64,
    crashes: u64,
    partitions: u64,
    messages: u64,
    dropped: u64,
    replayed: u64,
    reads: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.seeds += o.seeds;
        self.committed += o.committed;
        self.proposals_applied += o.proposals_applied;
        self.snapshots_sent += o.snapshots_sent;
        self.snapshots_installed += o.snapshots_installed;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.messages += o.messages;
        self.dropped += o.dropped;
        self.replayed += o.replayed;
        self.reads += o.reads;
    }
}

// ---------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------

struct Up {
    core: RaftCore,
    /// A clone of the core's store, for the checks.
    store: Store,
}

struct Node {
    id: u64,
    path: PathBuf,
    up: Option<Up>,
    /// When a crashed node restarts.
    down_until: u64,
    /// The highest committed index already checked against the global log.
    checked: u64,
    /// The highest persisted commit index ever seen on this node.
    max_commit: u64,
    /// The applied index at the last check.
    applied: u64,
    /// The emulated election timer, in ticks (see `Sim::tick`).
    elapsed: u64,
    timeout: u64,
}

struct Sim {
    seed: u64,
    p: Params,
    rng: Rng,
    logger: slog::Logger,
    durable: bool,
    now: u64,
    nodes: Vec<Node>,
    /// Messages in flight by (delivery round, sequence number).
    queue: BTreeMap<(u64, u64), Message>,
    seq: u64,
    /// Each node's side while a partition is active.
    sides: Option<Vec<u8>>,
    heal_at: u64,
    /// Whether the network misbehaves.
    faults: bool,
    next_request: u64,
    // ---- what has been observed ----
    leaders: BTreeMap<u64, u64>,
    /// index -> (term, data) of every committed entry observed on any node.
    committed: BTreeMap<u64, (u64, Vec<u8>)>,
    /// applied index -> state digest.
    digests: BTreeMap<u64, u64>,
    /// Snapshots delivered this round: node -> snapshot index.
    pending_installs: BTreeMap<u64, u64>,
    /// ReadIndex requests in flight: context -> the highest commit index any node had
    /// persisted when the read was asked for. The read index must not be below it.
    reads: BTreeMap<u64, u64>,
    next_read: u64,
    stats: Stats,
    dir: tempfile::TempDir,
}

/// A temp dir in /dev/shm when there is one (fsync is free there), else the default.
fn temp_dir() -> tempfile::TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix("blixard-sim-");
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = builder.tempdir_in(shm) {
            return dir;
        }
    }
    builder.tempdir().unwrap()
}

fn is_leader(core: &RaftCore) -> bool {
    core.role() == StateRole::Leader
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let p = Params::for_seed(seed, &mut rng);
        let dir = temp_dir();
        // fsync on tmpfs is free, so use durable commits there; elsewhere the nodes' clean
        // shutdown (dropping the store) persists volatile commits as well.
        let durable = dir.path().starts_with("/dev/shm");
        let state = common::initial_state();
        let voters: Vec<u64> = (1..=p.nodes).collect();
        let mut sim = Sim {
            seed,
            p,
            rng,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            durable,
            now: 0,
            nodes: Vec::new(),
            queue: BTreeMap::new(),
            seq: 0,
            sides: None,
            heal_at: 0,
            faults: true,
            next_request: 1,
            leaders: BTreeMap::new(),
            committed: BTreeMap::new(),
            digests: BTreeMap::new(),
            pending_installs: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_read: 0,
            stats: Stats {
                seeds: 1,
                ..Stats::default()
            },
            dir,
        };
        for id in voters.iter().copied() {
            let path = sim.dir.path().join(format!("node{id}.redb"));
            {
                let store = sim.open_store(&path);
                store.bootstrap(&state, &voters).unwrap();
            }
            sim.nodes.push(Node {
                id,
                path,
                up: None,
                down_until: 0,
                checked: 0,
                max_commit: 0,
                applied: 0,
                elapsed: 0,
                timeout: 0,
            });
        }
        for i in 0..sim.nodes.len() {
            sim.start(i);
        }
        sim
    }

    fn open_store(&self, path: &Path) -> Store {
        let res = if self.durable {
            Store::open(path)
        } else {
            Store::open_volatile(path)
        };
        res.unwrap_or_else(|e| panic!("seed {}: open {}: {e}", self.seed, path.display()))
    }

    fn core_config(&self, id: u64) -> CoreConfig {
        let mut cfg = CoreConfig::new(id);
        cfg.election_tick = ELECTION_TICK as usize;
        cfg.heartbeat_tick = 2;
        cfg.snapshot_threshold = self.p.snapshot_threshold;
        cfg.max_size_per_msg = self.p.max_size_per_msg;
        cfg.max_inflight_msgs = self.p.max_inflight_msgs;
        cfg
    }

    /// Opens node `i` from its database file and checks what it finds.
    fn start(&mut self, i: usize) {
        let seed = self.seed;
        let id = self.nodes[i].id;
        let store = self.open_store(&self.nodes[i].path);
        let core = RaftCore::open(store.clone(), self.core_config(id), &self.logger)
            .unwrap_or_else(|e| panic!("seed {seed}: node {id} failed to restart: {e}"));
        let node = &mut self.nodes[i];
        let hs = store.hard_state().unwrap();
        assert!(
            hs.commit >= node.max_commit,
            "seed {seed}: node {id} lost committed entries over a restart: commit {} < {}",
            hs.commit,
            node.max_commit
        );
        // Applied state is written behind the log: a restart may go back (and re-apply
        // from the log), never forward, and the state at that index is the one seen there.
        let applied = core.applied_index();
        assert!(
            applied <= node.applied.max(1),
            "seed {seed}: node {id} restarted at applied index {applied}, beyond the {} it had",
            node.applied
        );
        if let Some(known) = self.digests.get(&applied) {
            assert_eq!(
                *known,
                core.read_state().digest(),
                "seed {seed}: node {id} restarted with another state at applied index {applied}"
            );
        }
        node.applied = applied;
        // Re-check the whole persisted log against what the cluster committed.
        node.checked = store.first_index().saturating_sub(1);
        node.up = Some(Up { core, store });
        self.reset_timer(i);
        self.check_node(i);
    }

    /// Restarts node `i`'s emulated election timer with a new seeded timeout in
    /// `[election_tick, 2 * election_tick)`, like raft-rs's randomised timeout.
    fn reset_timer(&mut self, i: usize) {
        let timeout = self.rng.range(ELECTION_TICK, 2 * ELECTION_TICK - 1);
        let node = &mut self.nodes[i];
        node.elapsed = 0;
        node.timeout = timeout;
    }

    /// One raft tick. raft-rs draws its randomised election timeout from `thread_rng`,
    /// which no seed controls, so only leaders are ticked (heartbeats and check-quorum use
    /// the fixed election timeout). Followers and candidates are never ticked: their
    /// election timer is emulated here with the seeded PRNG, and when it expires the node
    /// campaigns exactly as raft's own timeout would (`MsgHup`, a pre-vote first). Its
    /// timer restarts whenever raft's would: a message from a current leader, or a change
    /// of term or role.
    fn tick(&mut self) {
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            let Some(up) = node.up.as_mut() else {
                continue;
            };
            if is_leader(&up.core) {
                up.core.tick();
                continue;
            }
            node.elapsed += 1;
            if node.elapsed >= node.timeout {
                let _ = up.core.campaign();
                self.reset_timer(i);
            }
        }
    }

    fn crash(&mut self, i: usize) {
        // Short outages restart a node while the election it voted in is still running;
        // long ones make it fall behind a compacted log.
        let down_for = if self.rng.chance(500) {
            self.rng.range(1, 6)
        } else {
            self.rng.range(10, 200)
        };
        let node = &mut self.nodes[i];
        node.up = None;
        node.down_until = self.now + down_for;
        self.stats.crashes += 1;
    }

    fn up_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.up.is_some()).count()
    }

    fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    fn connected(&self, from: u64, to: u64) -> bool {
        match &self.sides {
            None => true,
            Some(sides) => match (self.index_of(from), self.index_of(to)) {
                (Some(a), Some(b)) => sides[a] == sides[b],
                _ => false,
            },
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for msg in msgs {
            self.stats.messages += 1;
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                self.stats.snapshots_sent += 1;
            }
            let copies = if self.faults && self.rng.chance(self.p.dup_pm) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                if self.faults && self.rng.chance(self.p.drop_pm) {
                    self.stats.dropped += 1;
                    continue;
                }
                let delay = if self.faults {
                    self.rng.range(1, self.p.max_delay)
                } else {
                    1
                };
                self.seq += 1;
                self.queue.insert((self.now + delay, self.seq), msg.clone());
            }
        }
    }

    fn inject_faults(&mut self) {
        let n = self.nodes.len();
        // Partitions.
        if self.sides.is_some() && self.now >= self.heal_at {
            self.sides = None;
        }
        if self.sides.is_none() && self.rng.chance(self.p.partition_pm) {
            let groups = if self.rng.chance(300) { 3 } else { 2 };
            let sides: Vec<u8> = (0..n).map(|_| self.rng.below(groups) as u8).collect();
            self.heal_at = self.now + self.rng.range(20, 200);
            self.sides = Some(sides);
            self.stats.partitions += 1;
        }
        // Crashes: at most a minority down at once, so that the cluster keeps committing.
        let max_down = (n - 1) / 2;
        if self.rng.chance(self.p.crash_pm) && n - self.up_count() < max_down {
            let candidates: Vec<usize> = (0..n).filter(|&i| self.nodes[i].up.is_some()).collect();
            let i = candidates[self.rng.below(candidates.len() as u64) as usize];
            self.crash(i);
        }
    }

    fn restart_due(&mut self, force: bool) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].up.is_none() && (force || self.now >= self.nodes[i].down_until) {
                self.start(i);
            }
        }
    }

    fn propose(&mut self, i: usize, key: String, value: Option<String>) {
        let request_id = self.next_request;
        self.next_request += 1;
        let id = self.nodes[i].id;
        if let Some(up) = self.nodes[i].up.as_mut() {
            let envelope = Envelope {
                proposer: Some(NodeId(id)),
                request_id,
                command: Command::SetMeta { key, value },
            };
            // Dropped proposals (no leader known) are fine: raft promises nothing for them.
            let _ = up.core.propose(&envelope, &[]);
        }
    }

    /// Asks a random node for a linearizable read index.
    fn random_read(&mut self) {
        if !self.rng.chance(50) {
            return;
        }
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up.is_some())
            .collect();
        if up.is_empty() {
            return;
        }
        let i = up[self.rng.below(up.len() as u64) as usize];
        let committed = self.nodes.iter().map(|n| n.max_commit).max().unwrap_or(0);
        self.next_read += 1;
        let ctx = self.next_read;
        self.reads.insert(ctx, committed);
        if let Some(up) = self.nodes[i].up.as_mut() {
            up.core.read_index(ctx.to_be_bytes().to_vec());
        }
    }

    fn random_proposals(&mut self) {
        if !self.rng.chance(self.p.propose_pm) {
            return;
        }
        let burst = if self.rng.chance(100) {
            self.rng.range(2, 8)
        } else {
            1
        };
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up.is_some())
            .collect();
        if up.is_empty() {
            return;
        }
        // Mostly at the leader, sometimes at a follower (which forwards it).
        let leader = up.iter().copied().find(|&i| {
            self.nodes[i]
                .up
                .as_ref()
                .is_some_and(|u| is_leader(&u.core))
        });
        let target = match leader {
            Some(l) if self.rng.chance(700) => l,
            _ => up[self.rng.below(up.len() as u64) as usize],
        };
        for _ in 0..burst {
            let key = format!("k{}", self.rng.below(16));
            // Some writes delete, so that a state that merged rows instead of replacing
            // them (or applied an entry twice) would differ.
            let value = (!self.rng.chance(200))
                .then(|| format!("s{}-r{}-n{}", self.seed, self.next_request, target + 1));
            self.propose(target, key, value);
        }
    }

    fn deliver_due(&mut self) {
        let later = self.queue.split_off(&(self.now + 1, 0));
        let due = std::mem::replace(&mut self.queue, later);
        for msg in due.into_values() {
            let (from, to) = (msg.from, msg.to);
            if !self.connected(from, to) {
                self.stats.dropped += 1;
                continue;
            }
            let Some(i) = self.index_of(to) else {
                continue;
            };
            let Some(up) = self.nodes[i].up.as_mut() else {
                self.stats.dropped += 1;
                continue;
            };
            let kind = msg.get_msg_type();
            let snapshot_index =
                (kind == MessageType::MsgSnapshot).then(|| msg.get_snapshot().get_metadata().index);
            let from_leader = matches!(
                kind,
                MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
            ) && msg.term >= up.core.term();
            let (term, role) = (up.core.term(), up.core.role());
            let (last, commit) = (up.core.last_index(), up.core.commit_index());
            let stepped = up.core.step(msg).is_ok();
            let changed = (up.core.term(), up.core.role()) != (term, role);
            if stepped {
                if let Some(s) = snapshot_index {
                    if s > last && s > commit {
                        self.pending_installs.insert(to, s);
                    }
                }
            }
            if changed || (stepped && from_leader) {
                self.reset_timer(i);
            }
        }
    }

    fn process(&mut self, i: usize) {
        let seed = self.seed;
        let id = self.nodes[i].id;
        let mut rounds = 0;
        loop {
            let has_ready = |sim: &Self| sim.nodes[i].up.as_ref().map(|up| up.core.has_ready());
            match has_ready(self) {
                None => return,
                Some(true) => {}
                Some(false) => {
                    // Writing what is queued may release messages and make more ready.
                    self.write_queued(i);
                    if has_ready(self) != Some(true) {
                        break;
                    }
                }
            }
            let Some(up) = self.nodes[i].up.as_mut() else {
                return;
            };
            rounds += 1;
            assert!(
                rounds < 100,
                "seed {seed}: node {id} never runs out of Ready"
            );
            let out = up
                .core
                .process_ready()
                .unwrap_or_else(|e| panic!("seed {seed}: node {id}: process_ready: {e}"));
            assert!(!out.removed_self, "seed {seed}: node {id} was removed");
            for applied in &out.applied {
                assert_eq!(
                    applied.result,
                    Ok(CommandOutput::Done),
                    "seed {seed}: node {id}: request {} at index {} failed",
                    applied.request_id,
                    applied.index
                );
                self.stats.proposals_applied += 1;
            }
            for rs in &out.read_states {
                let ctx: [u8; 8] = rs.request_ctx.as_slice().try_into().unwrap();
                let ctx = u64::from_be_bytes(ctx);
                let floor = self.reads[&ctx];
                assert!(
                    rs.index >= floor,
                    "seed {seed}: node {id}: read {ctx} got read index {} but {floor} was \
                     already committed when it was asked",
                    rs.index
                );
                self.stats.reads += 1;
            }
            self.send(out.messages);
            self.write_queued(i);
        }
        if let Some(s) = self.pending_installs.remove(&id) {
            if let Some(up) = self.nodes[i].up.as_ref() {
                if up.core.applied_index() >= s {
                    self.stats.snapshots_installed += 1;
                }
            }
        }
    }

    /// Runs node `i`'s queued writes, all or some of them, or (in some rounds) none yet,
    /// and sends the messages that waited for them.
    fn write_queued(&mut self, i: usize) {
        let seed = self.seed;
        if self.rng.chance(self.p.write_lag_pm) {
            return;
        }
        let max = if self.rng.chance(300) {
            self.rng.range(1, 3) as usize
        } else {
            usize::MAX
        };
        let id = self.nodes[i].id;
        let Some(up) = self.nodes[i].up.as_mut() else {
            return;
        };
        let written = up
            .store
            .run_queued(max)
            .unwrap_or_else(|e| panic!("seed {seed}: node {id}: queued write: {e}"));
        if let Some(number) = written {
            let msgs = up.core.on_persisted(number);
            self.send(msgs);
        }
    }

    /// Checks one node's persisted log, commit index, applied index and state.
    fn check_node(&mut self, i: usize) {
        let seed = self.seed;
        let node = &mut self.nodes[i];
        let id = node.id;
        let Some(up) = node.up.as_ref() else {
            return;
        };
        if is_leader(&up.core) {
            let term = up.core.term();
            let leader = *self.leaders.entry(term).or_insert(id);
            assert_eq!(
                leader, id,
                "seed {seed}: two leaders in term {term}: {leader} and {id}"
            );
        }
        let hs = up.store.hard_state().unwrap();
        assert!(
            hs.commit >= node.max_commit,
            "seed {seed}: node {id}: persisted commit went back from {} to {}",
            node.max_commit,
            hs.commit
        );
        node.max_commit = hs.commit;
        let first = up.store.first_index();
        let last = Storage::last_index(&up.store).unwrap();
        let low = (node.checked + 1).max(first);
        let high = hs.commit.min(last);
        if low <= high {
            let entries = up
                .store
                .entries(low, high + 1, None, GetEntriesContext::empty(false))
                .unwrap_or_else(|e| panic!("seed {seed}: node {id}: entries {low}..={high}: {e}"));
            assert_eq!(entries.len() as u64, high - low + 1, "seed {seed}");
            for e in entries {
                let seen = (e.term, e.data.to_vec());
                match self.committed.get(&e.index) {
                    Some(known) => assert_eq!(
                        known, &seen,
                        "seed {seed}: node {id} holds another entry at committed index {}",
                        e.index
                    ),
                    None => {
                        self.committed.insert(e.index, seen);
                    }
                }
            }
        }
        node.checked = node.checked.max(hs.commit);

        let applied = up.core.applied_index();
        assert!(
            applied <= up.core.commit_index(),
            "seed {seed}: node {id} applied {applied} beyond its commit index"
        );
        let (stored_applied, _) = up.store.applied().unwrap();
        assert!(
            stored_applied <= applied,
            "seed {seed}: node {id}: stored applied index {stored_applied} is beyond the \
             core's {applied}"
        );
        // A restart needs applied <= commit in what is on disk.
        assert!(
            stored_applied <= hs.commit,
            "seed {seed}: node {id}: stored applied index {stored_applied} is beyond the \
             stored commit index {}",
            hs.commit
        );
        if applied != node.applied {
            let digest = up.core.read_state().digest();
            let known = *self.digests.entry(applied).or_insert(digest);
            assert_eq!(
                known, digest,
                "seed {seed}: node {id} has another state at applied index {applied}"
            );
            node.applied = applied;
        }
    }

    fn round(&mut self) {
        self.now += 1;
        if self.faults {
            self.inject_faults();
            self.restart_due(false);
            self.random_proposals();
            self.random_read();
        }
        if self.now.is_multiple_of(self.p.tick_every) {
            self.tick();
        }
        self.deliver_due();
        for i in 0..self.nodes.len() {
            self.process(i);
        }
        for i in 0..self.nodes.len() {
            self.check_node(i);
        }
    }

    /// One line per node, for failure messages.
    fn describe(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let Some(up) = node.up.as_ref() else {
                out.push_str(&format!("  node {}: down\n", node.id));
                continue;
            };
            let c = &up.core;
            let peers: Vec<String> = self
                .nodes
                .iter()
                .filter_map(|p| {
                    c.matched(p.id)
                        .map(|m| format!("{}:{m}/{:?}", p.id, c.recently_active(p.id)))
                })
                .collect();
            out.push_str(&format!(
                "  node {}: {:?} term {} leader {} commit {} applied {} log {}..={} peers [{}]\n",
                node.id,
                c.role(),
                c.term(),
                c.leader_id(),
                c.commit_index(),
                c.applied_index(),
                c.first_index(),
                c.last_index(),
                peers.join(" "),
            ));
        }
        out
    }

    fn leader(&self) -> Option<usize> {
        let max_term = self
            .nodes
            .iter()
            .filter_map(|n| n.up.as_ref().map(|u| u.core.term()))
            .max()?;
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i]
                .up
                .as_ref()
                .is_some_and(|u| is_leader(&u.core) && u.core.term() == max_term)
        })
    }

    fn converged(&self, marker: &str) -> bool {
        let mut applied = None;
        let mut digest = None;
        for node in &self.nodes {
            let Some(up) = node.up.as_ref() else {
                return false;
            };
            let state = up.core.read_state();
            if state.meta_get("final").map(String::as_str) != Some(marker) {
                return false;
            }
            if up.core.applied_index() != up.core.commit_index() {
                return false;
            }
            let a = up.core.applied_index();
            let d = state.digest();
            if *applied.get_or_insert(a) != a || *digest.get_or_insert(d) != d {
                return false;
            }
        }
        true
    }

    fn run(mut self) -> Stats {
        let seed = self.seed;
        for _ in 0..self.p.fault_rounds {
            self.round();
        }

        // Heal everything and let the cluster settle.
        self.faults = false;
        self.sides = None;
        self.restart_due(true);
        let marker = format!("seed {seed} done");
        let mut proposed_at = None;
        let limit = self.now + 3_000;
        while !self.converged(&marker) {
            assert!(
                self.now < limit,
                "seed {seed}: the cluster did not converge after healing:\n{}",
                self.describe()
            );
            if proposed_at.is_none_or(|at| self.now >= at + 100) {
                if let Some(l) = self.leader() {
                    self.propose(l, "final".into(), Some(marker.clone()));
                    proposed_at = Some(self.now);
                }
            }
            self.round();
        }

        // Final agreement.
        let applied: Vec<u64> = self.nodes.iter().map(|n| n.applied).collect();
        let digests: Vec<u64> = self
            .nodes
            .iter()
            .map(|n| n.up.as_ref().unwrap().core.read_state().digest())
            .collect();
        assert!(
            applied.windows(2).all(|w| w[0] == w[1]),
            "seed {seed}: applied indexes differ: {applied:?}"
        );
        assert!(
            digests.windows(2).all(|w| w[0] == w[1]),
            "seed {seed}: state digests differ: {digests:?}"
        );

        // If some node's log showed every committed entry, replaying them must give the
        // same state.
        let last = applied[0];
        if (2..=last).all(|i| self.committed.contains_key(&i)) {
            let mut state = common::initial_state();
            for i in 2..=last {
                let (_, data) = &self.committed[&i];
                if data.is_empty() {
                    continue;
                }
                let env: Envelope = blixard_core::decode_versioned(data).unwrap();
                state.apply(&env.command).unwrap();
            }
            assert_eq!(
                state.digest(),
                digests[0],
                "seed {seed}: replaying the committed log gives another state"
            );
            self.stats.replayed += 1;
        }

        // Reopen every store after a clean stop: the state on disk is the state in memory.
        for i in 0..self.nodes.len() {
            let id = self.nodes[i].id;
            if let Some(up) = self.nodes[i].up.take() {
                up.core
                    .sync()
                    .unwrap_or_else(|e| panic!("seed {seed}: node {id}: sync: {e}"));
            }
            let store = self.open_store(&self.nodes[i].path);
            let (state, stored_applied, _) = store.load_state().unwrap();
            assert_eq!(stored_applied, last, "seed {seed}: node {id} after reopen");
            assert_eq!(
                state.digest(),
                digests[0],
                "seed {seed}: node {id} after reopen"
            );
        }
        self.stats.committed = last;
        self.stats
    }
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| Sim::new(seed).run())).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let params = Params::for_seed(seed, &mut Rng::new(seed));
        format!(
            "seed {seed} failed: {msg}\n  {params:?}\n  replay: BLIXARD_SIM_SEED={seed} \
             cargo test -p blixard-raft --test sim -- --nocapture"
        )
    })
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

#[test]
fn simulation() {
    let started = Instant::now();
    let seeds: Vec<u64> = match env_u64("BLIXARD_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("BLIXARD_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(seeds.len().max(1));
    let results: Vec<(u64, Result<Stats, String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let mine: Vec<u64> = seeds.iter().copied().skip(w).step_by(workers).collect();
                scope.spawn(move || {
                    mine.into_iter()
                        .map(|seed| (seed, run_seed(seed)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut total = Stats::default();
    let mut failures = Vec::new();
    let mut sorted = results;
    sorted.sort_by_key(|(seed, _)| *seed);
    for (_, result) in &sorted {
        match result {
            Ok(stats) => total.add(stats),
            Err(msg) => failures.push(msg.clone()),
        }
    }
    println!(
        "sim: {} seeds ({} failed) in {:.1?}: {} committed entries, {} own proposals applied, \
         {} snapshots sent, {} installed, {} crashes, {} partitions, {} messages ({} dropped), \
         {} reads served, {} logs replayed",
        sorted.len(),
        failures.len(),
        started.elapsed(),
        total.committed,
        total.proposals_applied,
        total.snapshots_sent,
        total.snapshots_installed,
        total.crashes,
        total.partitions,
        total.messages,
        total.dropped,
        total.reads,
        total.replayed,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if sorted.len() >= 20 {
        assert!(
            total.snapshots_sent > 0 && total.snapshots_installed > 0,
            "no snapshot was installed in {} seeds",
            sorted.len()
        );
    }
}
