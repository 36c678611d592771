//! The sans-IO consensus core: a raft-rs `RawNode` over the redb [`Store`], and the state
//! machine it drives. No threads, no sockets, no clock: the caller ticks it, feeds it
//! messages and sends what it returns. The daemon and the simulation share this code.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Instant;

use blixard_core::{
    decode_versioned, encode_versioned, ApplyError, CommandOutput, Envelope, NodeId, RequestId,
    State, StateDigest,
};
use blixard_store::{Store, StoreError, WriteBatch};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
};
use raft::{RawNode, ReadState, SnapshotStatus, StateRole};

use crate::metrics::RaftMetrics;

/// Tunables of one raft node.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub id: u64,
    /// Ticks without a leader's heartbeat before an election (randomised up to 2×).
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Compact the log once it holds more entries than this beyond the applied index.
    pub snapshot_threshold: u64,
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
    /// The newest log version this node applies ([`blixard_core::LOG_VERSION`], or lower
    /// to act as an older release in tests): it stops at an entry that needs a newer one.
    pub log_version: u32,
}

impl CoreConfig {
    pub fn new(id: u64) -> Self {
        Self {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_threshold: 10_000,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            log_version: blixard_core::LOG_VERSION,
        }
    }
}

/// Consensus failures. Storage errors are fatal for the node: it stops rather than
/// continue with state it could not persist.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A committed entry this build cannot apply. Every member must apply every entry in
    /// order, so the node stops here rather than skip it and diverge; a newer blixard
    /// applies it on the next start.
    #[error("committed entry {index} cannot be applied by this blixard ({why}); it stops rather than skip it: upgrade this node to a blixard that applies it")]
    CannotApply { index: u64, why: String },
    #[error("this data dir's cluster runs at cluster version {cluster}, and this blixard applies log version {mine}: run a blixard of log version {cluster} or newer (the cluster version never goes back)")]
    ClusterNewer { cluster: u32, mine: u32 },
}

/// The state machine as of one applied index ([`RaftCore::copy_state`]).
#[derive(Debug)]
pub struct StateCopy {
    pub rows: Vec<blixard_core::Row>,
    pub index: u64,
    pub term: u64,
}

/// The result of applying a command this node proposed.
#[derive(Debug)]
pub struct Applied {
    pub index: u64,
    pub request_id: u64,
    pub result: Result<CommandOutput, ApplyError>,
}

/// A state change this node applied (any proposer's): what the audit log records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub index: u64,
    /// The command's kind (`create_vm`, `set_node_down`, …).
    pub kind: &'static str,
    /// The node that proposed it (`None` for commands without a waiting caller).
    pub proposer: Option<NodeId>,
    /// The client request it was made for (`Command::Once`).
    pub request: Option<RequestId>,
    /// What it changed, for the event stream.
    pub subject: Option<blixard_core::Subject>,
}

/// What one round of `Ready` handling produced for the caller.
#[derive(Debug, Default)]
pub struct Output {
    /// Every command applied successfully in this round (the state changes).
    pub changes: Vec<Change>,
    /// Messages to send, in order.
    pub messages: Vec<Message>,
    /// Results for this node's own proposals.
    pub applied: Vec<Applied>,
    /// ReadIndex answers: serve the read once `applied_index >= index`.
    pub read_states: Vec<ReadState>,
    /// This node was removed from the configuration.
    pub removed_self: bool,
}

impl Output {
    /// Keeps the result of an entry this node proposed, for its waiting caller, and the
    /// change it made unless it was a `repeat` (a request id applied before: no change).
    fn hand_back(
        &mut self,
        me: u64,
        index: u64,
        env: &Envelope,
        result: Result<CommandOutput, ApplyError>,
        repeat: bool,
    ) {
        if result.is_ok() && !repeat && !matches!(env.command, blixard_core::Command::Noop) {
            self.changes.push(Change {
                index,
                kind: env.command.kind(),
                proposer: env.proposer,
                request: env.command.request_id(),
                subject: env.command.subject(),
            });
        }
        if env.proposer.map(|p| p.0) == Some(me) {
            self.applied.push(Applied {
                index,
                request_id: env.request_id,
                result,
            });
        }
    }
}

/// One raft node: the `RawNode`, its storage and the state machine.
pub struct RaftCore {
    raw: RawNode<Store>,
    store: Store,
    state: Arc<RwLock<State>>,
    conf: ConfState,
    applied: u64,
    /// The term of the entry at `applied`.
    applied_term: u64,
    cfg: CoreConfig,
    /// Messages of each `Ready` (by number) that may go out once it is durable.
    held: VecDeque<(u64, Vec<Message>)>,
    /// The highest `Ready` number known durable.
    persisted: u64,
    /// The last compaction queued.
    compact_queued: u64,
    /// As leader: the last log index whose commit the followers must hear of at once
    /// (see [`RaftCore::quiet_commits`]).
    urgent: u64,
    /// This node's digests at the last few check entries it applied.
    checks: VecDeque<StateDigest>,
    /// Set when a check found this node's state unlike the proposer's.
    alarm: Option<String>,
    metrics: RaftMetrics,
    tracing: Option<Arc<dyn EntryTracing>>,
}

/// How entries join traces. Raft carries a trace context as opaque bytes in each normal
/// entry's `context` (replicated with it, outside the command, so the command's encoding
/// does not change); the node supplies the glue to its tracer.
pub trait EntryTracing: Send + Sync {
    /// The calling task's trace context, to carry in the entry it proposes (empty: none).
    fn context(&self) -> Vec<u8>;
    /// The span this node applies an entry in that carries `context` (never empty).
    fn apply_span(
        &self,
        context: &[u8],
        index: u64,
        command: &blixard_core::Command,
    ) -> tracing::Span;
}

/// How many check digests a node keeps to compare with later checks.
const CHECKS_KEPT: usize = 8;

fn lock_write(state: &RwLock<State>) -> std::sync::RwLockWriteGuard<'_, State> {
    match state.write() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl RaftCore {
    /// Records this node's digest at check entry `index`, and compares the proposer's
    /// digest at an earlier check entry with its own.
    fn check_state(
        checks: &mut VecDeque<StateDigest>,
        alarm: &mut Option<String>,
        index: u64,
        digest: u64,
        previous: Option<StateDigest>,
        proposer: Option<NodeId>,
    ) {
        if let Some(p) = previous {
            match checks.iter().find(|c| c.index == p.index) {
                Some(mine) if mine.digest != p.digest => {
                    let text = format!(
                        "this node's state differs from node {}'s at index {}: digest {:016x}, theirs {:016x}; its data may be damaged (check it with `blixard node check-data` once stopped)",
                        proposer.map_or(0, |n| n.0),
                        p.index,
                        mine.digest,
                        p.digest
                    );
                    tracing::error!("{text}");
                    *alarm = Some(text);
                }
                Some(_) => tracing::debug!(index = p.index, "state check: digests agree"),
                None => {}
            }
        }
        if checks.len() == CHECKS_KEPT {
            checks.pop_front();
        }
        checks.push_back(StateDigest { index, digest });
    }

    /// This node's digest at the last check entry it applied.
    pub fn last_check(&self) -> Option<StateDigest> {
        self.checks.back().copied()
    }

    /// Why this node's state is suspect, if a check found it so.
    pub fn alarm(&self) -> Option<&str> {
        self.alarm.as_deref()
    }

    /// Opens a node from its store. A store that was never bootstrapped or joined starts
    /// empty and waits for a leader to send it a snapshot.
    pub fn open(store: Store, cfg: CoreConfig, logger: &slog::Logger) -> Result<Self, CoreError> {
        let (state, applied, applied_term) = store.load_state()?;
        if state.cluster_version() > cfg.log_version {
            return Err(CoreError::ClusterNewer {
                cluster: state.cluster_version(),
                mine: cfg.log_version,
            });
        }
        let conf = store.conf_state()?;
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied,
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let raw = RawNode::new(&raft_cfg, store.clone(), logger)?;
        Ok(Self {
            raw,
            store,
            state: Arc::new(RwLock::new(state)),
            conf,
            applied,
            applied_term,
            cfg,
            held: VecDeque::new(),
            persisted: 0,
            compact_queued: 0,
            urgent: 0,
            checks: VecDeque::new(),
            alarm: None,
            metrics: RaftMetrics::default(),
            tracing: None,
        })
    }

    /// Lets entries carry their proposer's trace context and be applied in spans of it.
    pub fn set_tracing(&mut self, tracing: Arc<dyn EntryTracing>) {
        self.tracing = Some(tracing);
    }

    pub fn tracing(&self) -> Option<Arc<dyn EntryTracing>> {
        self.tracing.clone()
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    /// This node's raft metrics (the raft thread keeps the gauges current).
    pub fn metrics(&self) -> &RaftMetrics {
        &self.metrics
    }

    /// The state machine, shared for reads.
    pub fn state(&self) -> Arc<RwLock<State>> {
        self.state.clone()
    }

    pub fn read_state(&self) -> RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    pub fn step(&mut self, msg: Message) -> Result<(), raft::Error> {
        let forwarded = msg.get_msg_type() == raft::eraftpb::MessageType::MsgPropose;
        self.quiet_commits();
        self.raw.step(msg)?;
        if forwarded {
            // A follower's proposal: it answers its caller once it has applied it.
            self.urgent = self.raw.raft.raft_log.last_index();
        }
        Ok(())
    }

    /// Whether the leader tells the followers of a new commit index at once (an append
    /// message of its own to each) or with the next append or heartbeat. At once only
    /// while an entry that someone waits on elsewhere is not yet committed: a follower's
    /// proposal (the follower answers once it applied it) or any command but the
    /// leader's own metadata writes (a host agent or the scheduler may act on it). So a
    /// stream of key-value writes through the leader costs one round of messages per
    /// write, not two; the followers apply each write when the next one, or the next
    /// heartbeat, reaches them. raft-rs still tells them at once while a configuration
    /// change is pending.
    fn quiet_commits(&mut self) {
        let quiet = self.urgent <= self.raw.raft.raft_log.committed;
        self.raw.raft.skip_bcast_commit(quiet);
    }

    pub fn campaign(&mut self) -> Result<(), raft::Error> {
        self.raw.campaign()
    }

    /// Proposes a command as a normal entry. Followers forward it to the leader.
    /// `context` (a trace context, or empty) travels with the entry, outside the command.
    pub fn propose(&mut self, envelope: &Envelope, context: &[u8]) -> Result<(), raft::Error> {
        self.raw
            .propose(context.to_vec(), encode_versioned(envelope))?;
        let own_metadata =
            envelope.proposer == Some(NodeId(self.cfg.id)) && envelope.command.kind() == "set_meta";
        if !own_metadata {
            self.urgent = self.raw.raft.raft_log.last_index();
        }
        Ok(())
    }

    /// Proposes a configuration change; `envelope` (applied with it) records the change in
    /// the state machine. Only the leader should call this, with no change pending.
    pub fn propose_conf_change(
        &mut self,
        envelope: &Envelope,
        cc: ConfChangeV2,
    ) -> Result<(), raft::Error> {
        let mut cc = cc;
        cc.context = encode_versioned(envelope).into();
        self.raw.propose_conf_change(vec![], cc)
    }

    /// Asks `to` to take over the leadership (leader only).
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
    }

    pub fn role(&self) -> StateRole {
        self.raw.raft.state
    }

    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    /// Every row of the state machine, with the index and term it is the state at (one
    /// consistent copy: the raft thread applies nothing meanwhile).
    pub fn copy_state(&self) -> StateCopy {
        StateCopy {
            rows: self.read_state().all_rows(),
            index: self.applied,
            term: self.applied_term,
        }
    }

    pub fn first_index(&self) -> u64 {
        self.store.first_index()
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }

    /// A configuration change is proposed and not yet applied.
    pub fn has_pending_conf(&self) -> bool {
        self.raw.raft.has_pending_conf()
    }

    /// The highest log index a peer is known to hold (leader only).
    pub fn matched(&self, id: u64) -> Option<u64> {
        self.raw.raft.prs().get(id).map(|p| p.matched)
    }

    /// Whether the leader heard from the peer within the last election timeout.
    pub fn recently_active(&self, id: u64) -> Option<bool> {
        self.raw.raft.prs().get(id).map(|p| p.recent_active)
    }

    /// Writes everything queued and makes every earlier write durable (before a clean
    /// shutdown); stops the store's writer thread if it has one.
    pub fn sync(&self) -> Result<(), CoreError> {
        self.store.stop_writer()?;
        Ok(self.store.sync()?)
    }

    /// The store, to run queued writes (`Store::run_queued`) where no writer thread does.
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Handles one `Ready` with asynchronous persistence (raft-rs's `advance_append_async`):
    ///
    /// 1. the messages that may go out before persisting (the leader's appends) are
    ///    returned at once, so the followers write while the leader does;
    /// 2. committed entries (raft hands over only entries this node has persisted) are
    ///    applied to the state machine;
    /// 3. new entries go into the store's in-memory tail, and one batch with them, the
    ///    hard state and the applied state is queued for writing;
    /// 4. the messages that may only go out once that batch is durable (votes, acks) are
    ///    held until [`RaftCore::on_persisted`] reports it;
    /// 5. the applied index advances and the log is compacted past the threshold (queued
    ///    behind the batch).
    ///
    /// A `Ready` carrying a snapshot is handled synchronously instead (see
    /// [`RaftCore::install_snapshot_ready`]).
    pub fn process_ready(&mut self) -> Result<Output, CoreError> {
        let mut out = Output::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut ready = self.raw.ready();

        // 1.
        out.messages.extend(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot_ready(ready, &mut out)?;
            self.report_snapshots(&out);
            return Ok(out);
        }

        // 2. and 3.
        let batch = self.ready_batch(&mut ready, &mut out)?;

        // 4.
        let number = ready.number();
        let held = ready.take_persisted_messages();
        if !held.is_empty() {
            self.held.push_back((number, held));
        }
        out.read_states.extend(ready.take_read_states());
        self.raw.advance_append_async(ready);
        self.store.submit(batch, number);

        // 5.
        self.raw.advance_apply_to(self.applied);
        self.maybe_compact();
        self.report_snapshots(&out);
        Ok(out)
    }

    /// Applies a `Ready`'s committed entries and makes the batch that persists it: the
    /// applied state, its new entries (staged in the store's tail, readable from now on)
    /// and hard state.
    fn ready_batch(
        &mut self,
        ready: &mut raft::Ready,
        out: &mut Output,
    ) -> Result<WriteBatch, CoreError> {
        let mut batch = WriteBatch::default();
        self.apply_entries(ready.take_committed_entries(), &mut batch, out)?;
        batch.entries = ready.take_entries();
        if let Some(hs) = ready.hs() {
            batch.hard_state = Some(hs.clone());
        }
        // New entries, term and vote must be on disk before anyone hears of them; a
        // configuration change is synced too, so membership never goes back. A commit
        // index or applied state lost in a crash is recovered from the log.
        batch.sync = ready.must_sync() || batch.conf_state.is_some();
        self.store.stage(&batch.entries);
        Ok(batch)
    }

    /// The store wrote every `Ready` up to `number`: returns the messages that waited for
    /// it. Numbers already reported are ignored.
    pub fn on_persisted(&mut self, number: u64) -> Vec<Message> {
        let mut out = Vec::new();
        if number <= self.persisted {
            return out;
        }
        self.persisted = number;
        // The leader's own write may complete a commit.
        self.quiet_commits();
        self.raw.on_persist_ready(number);
        while self.held.front().is_some_and(|(n, _)| *n <= number) {
            if let Some((_, msgs)) = self.held.pop_front() {
                out.extend(msgs);
            }
        }
        out
    }

    /// A `Ready` with a snapshot, in the order raft-rs documents for synchronous
    /// handling, after every queued write is done: install the snapshot, apply, write
    /// entries and hard state, send, advance, handle the light ready.
    fn install_snapshot_ready(
        &mut self,
        mut ready: raft::Ready,
        out: &mut Output,
    ) -> Result<(), CoreError> {
        self.store.flush()?;
        // Everything queued before is durable: what waited for it may go.
        while let Some((_, msgs)) = self.held.pop_front() {
            out.messages.extend(msgs);
        }
        self.persisted = ready.number();

        let snap = ready.snapshot().clone();
        self.store.apply_snapshot(&snap)?;
        let (state, applied, applied_term) = self.store.load_state()?;
        if state.cluster_version() > self.cfg.log_version {
            return Err(CoreError::CannotApply {
                index: applied,
                why: format!(
                    "the snapshot is of a cluster at version {}, and this blixard applies log version {}",
                    state.cluster_version(),
                    self.cfg.log_version
                ),
            });
        }
        *lock_write(&self.state) = state;
        self.applied = applied;
        self.applied_term = applied_term;
        self.conf = snap.get_metadata().get_conf_state().clone();

        let mut batch = self.ready_batch(&mut ready, out)?;
        batch.sync = true;
        self.store.write(batch)?;
        out.messages.extend(ready.take_persisted_messages());
        out.read_states.extend(ready.take_read_states());

        let mut light = self.raw.advance_append(ready);
        let mut batch = WriteBatch::default();
        if light.commit_index().is_some() {
            batch.hard_state = Some(self.raw.raft.hard_state());
        }
        out.messages.extend(light.take_messages());
        self.apply_entries(light.take_committed_entries(), &mut batch, out)?;
        batch.sync = batch.conf_state.is_some();
        self.store.write(batch)?;
        self.raw.advance_apply_to(self.applied);
        Ok(())
    }

    /// raft-rs pauses replication to a peer it sent a snapshot to until it is told the
    /// snapshot's fate; if the snapshot or the peer's reply is lost, nothing else resumes
    /// it and the peer stays behind for the rest of the term. Report each one finished as
    /// it leaves: if it was in fact lost, the peer rejects the next append and the leader
    /// sends a new snapshot.
    fn report_snapshots(&mut self, out: &Output) {
        for msg in &out.messages {
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                self.metrics.snapshots_sent.inc();
                self.raw.report_snapshot(msg.to, SnapshotStatus::Finish);
            }
        }
    }

    fn maybe_compact(&mut self) {
        let first = self.store.first_index().max(self.compact_queued + 1);
        if self.applied >= first && self.applied - first + 1 > self.cfg.snapshot_threshold {
            // Keep a tail of a quarter of the threshold, so that a follower a few entries
            // behind catches up from the log instead of needing a whole snapshot.
            let to = self.applied - self.cfg.snapshot_threshold / 4;
            if to >= first {
                tracing::debug!(applied = self.applied, first, to, "compacting the raft log");
                self.store.submit_compact(to);
                self.compact_queued = to;
            }
        }
    }

    /// Refuses an entry that needs a newer log version than this node applies (as an
    /// older release, which could not decode it, would).
    fn check_version(&self, index: u64, command: &blixard_core::Command) -> Result<(), CoreError> {
        let needs = match command {
            blixard_core::Command::SetClusterVersion { version } => command.since().max(*version),
            _ => command.since(),
        };
        if needs > self.cfg.log_version {
            return Err(CoreError::CannotApply {
                index,
                why: format!(
                    "it needs log version {needs}, and this blixard applies log version {}",
                    self.cfg.log_version
                ),
            });
        }
        Ok(())
    }

    fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        batch: &mut WriteBatch,
        out: &mut Output,
    ) -> Result<(), CoreError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let (last_index, last_term) = (last.index, last.term);
        let me = self.cfg.id;
        let mut state = lock_write(&self.state);
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if entry.data.is_empty() {
                        // The empty entry a new leader appends.
                        continue;
                    }
                    let env: Envelope =
                        decode_versioned(&entry.data).map_err(|e| CoreError::CannotApply {
                            index: entry.index,
                            why: format!("it does not decode: {e}; a newer blixard wrote it?"),
                        })?;
                    self.check_version(entry.index, &env.command)?;
                    let span = match &self.tracing {
                        Some(t) if !entry.context.is_empty() => {
                            Some(t.apply_span(&entry.context, entry.index, &env.command))
                        }
                        _ => None,
                    };
                    let _in_span = span.as_ref().map(tracing::Span::enter);
                    let started = Instant::now();
                    let applied = state.apply_entry(&env.command);
                    self.metrics
                        .apply_duration
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.proposals_committed.inc();
                    if let blixard_core::Command::CheckState { previous } = &env.command {
                        Self::check_state(
                            &mut self.checks,
                            &mut self.alarm,
                            entry.index,
                            state.digest(),
                            *previous,
                            env.proposer,
                        );
                        if self.alarm.is_some() {
                            self.metrics.state_check_alarm.set(1);
                        }
                    }
                    out.hand_back(me, entry.index, &env, applied.result, applied.repeat);
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| {
                        CoreError::CannotApply {
                            index: entry.index,
                            why: format!("the configuration change does not decode: {e}"),
                        }
                    })?;
                    // Leaving a joint configuration carries no command when raft-rs
                    // proposes it itself (an implicit transition); blixard's own carry
                    // a no-op.
                    let env: Envelope = if cc.context.is_empty() && cc.leave_joint() {
                        Envelope {
                            proposer: None,
                            request_id: 0,
                            command: blixard_core::Command::Noop,
                        }
                    } else {
                        decode_versioned(&cc.context).map_err(|e| CoreError::CannotApply {
                            index: entry.index,
                            why: format!(
                                "its context does not decode: {e}; a newer blixard wrote it?"
                            ),
                        })?
                    };
                    self.check_version(entry.index, &env.command)?;
                    // The state machine and raft must agree: try the state change on a
                    // copy, and commit it only if raft accepts the configuration too.
                    let mut trial = state.clone();
                    let result = match trial.apply(&env.command) {
                        Ok(output) => match self.raw.apply_conf_change(&cc) {
                            Ok(cs) => {
                                let what = if !cs.voters_outgoing.is_empty() {
                                    "entered a joint configuration"
                                } else if !self.conf.voters_outgoing.is_empty() {
                                    "left the joint configuration"
                                } else {
                                    "configuration changed"
                                };
                                tracing::info!(
                                    index = entry.index,
                                    voters = ?cs.voters,
                                    outgoing = ?cs.voters_outgoing,
                                    learners = ?cs.learners,
                                    learners_next = ?cs.learners_next,
                                    "{what}"
                                );
                                *state = trial;
                                self.conf = cs.clone();
                                batch.conf_state = Some(cs);
                                if cc.changes.iter().any(|c| {
                                    c.node_id == me
                                        && c.get_change_type() == ConfChangeType::RemoveNode
                                }) {
                                    out.removed_self = true;
                                }
                                Ok(output)
                            }
                            Err(e) => Err(ApplyError::ConfChangeRefused(e.to_string())),
                        },
                        Err(e) => Err(e),
                    };
                    self.metrics.proposals_committed.inc();
                    if let Err(e) = &result {
                        tracing::info!(index = entry.index, "configuration change refused: {e}");
                    }
                    out.hand_back(me, entry.index, &env, result, false);
                }
                EntryType::EntryConfChange => {
                    tracing::error!(
                        index = entry.index,
                        "ignoring a v1 configuration change; blixard only proposes v2"
                    );
                }
            }
        }
        batch.rows.extend(state.drain_changes());
        if last_index > self.applied {
            self.applied = last_index;
            self.applied_term = last_term;
            batch.applied = Some((last_index, last_term));
        }
        Ok(())
    }
}
