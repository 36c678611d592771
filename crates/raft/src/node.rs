//! [`RaftNode`]: a [`RaftCore`] on its own thread, with typed proposals and reads.
//!
//! The thread owns the core; everyone else talks to it through a channel. Storage writes
//! (fsync) happen on the store's writer thread, which reports back through the same
//! channel; neither blocks the async runtime.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blixard_core::{
    ApplyError, Command, CommandOutput, Envelope, JoinRequest, MemberRole, MemberStatus, NodeId,
    State,
};
use blixard_store::{Persisted, StoreError};
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Message,
};
use raft::StateRole;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::core::{Change, EntryTracing, Output, RaftCore, StateCopy};
use crate::metrics::RaftMetrics;

/// Sends raft messages to peers. Must not block: queue and return.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, messages: Vec<Message>);
}

/// Why a proposal or read did not produce a result.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize, PartialEq, Eq)]
pub enum ProposeError {
    #[error("no leader is known; the cluster may be electing one or may have lost its quorum")]
    NoLeader,
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("{0}")]
    Rejected(ApplyError),
    #[error("raft dropped the proposal: {0}")]
    Dropped(String),
    #[error("the raft node has stopped")]
    Stopped,
    /// Handed to a leader, and not applied within the caller's time: it may or may not
    /// be applied later.
    #[error("not applied in time after it was handed to a leader")]
    TimedOut,
    /// The leader it was handed to lost its leadership before it was applied.
    #[error("the leader changed before the write was applied")]
    LeaderChanged,
}

/// A peer as the leader sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: u64,
    pub matched: u64,
    pub recently_active: bool,
}

/// A snapshot of the node's raft status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    pub role: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Filled on the leader only.
    pub peers: Vec<PeerStatus>,
    /// This node's digest at the last state check it applied.
    #[serde(default)]
    pub state_check: Option<blixard_core::StateDigest>,
    /// Set when a state check found this node's state unlike another member's.
    #[serde(default)]
    pub alarm: Option<String>,
}

type Reply<T> = oneshot::Sender<Result<T, ProposeError>>;

enum Input {
    /// A command, the trace context of its caller ([`EntryTracing::context`]), the reply,
    /// and when to answer it anyway ([`RaftNode::propose_within`]).
    Propose(Command, Vec<u8>, Reply<CommandOutput>, Option<Instant>),
    Join(JoinRequest, Reply<CommandOutput>),
    Remove(NodeId, u64, Reply<CommandOutput>),
    ChangeRole(NodeId, MemberRole, Reply<CommandOutput>),
    ReadIndex(Reply<()>),
    Raft(Message),
    /// The store's writer made every `Ready` up to this number durable, or failed.
    Persisted(Result<Persisted, StoreError>),
    Status(oneshot::Sender<NodeStatus>),
    /// A copy of the whole state at the applied index (a backup).
    Copy(oneshot::Sender<StateCopy>),
    Campaign,
    Shutdown,
}

/// A handle to the raft thread. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    tx: mpsc::Sender<Input>,
    state: Arc<RwLock<State>>,
    changed: watch::Receiver<u64>,
    removed: watch::Receiver<bool>,
    halted: watch::Receiver<Option<String>>,
    leader: watch::Receiver<u64>,
    id: NodeId,
    metrics: RaftMetrics,
    tracing: Option<Arc<dyn EntryTracing>>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode").field("id", &self.id).finish()
    }
}

impl RaftNode {
    /// Starts the raft thread. `tick` is the interval of one raft tick. Every change the
    /// node applies from now on goes to `changes` (for the audit log), in order, none
    /// skipped: when its reader falls behind by the channel's capacity, the raft thread
    /// waits for it. The thread drops the sender when it ends, after its last change.
    pub fn spawn(
        core: RaftCore,
        transport: Arc<dyn Transport>,
        tick: Duration,
        changes: Option<tokio::sync::mpsc::Sender<Change>>,
    ) -> Result<(Self, JoinHandle<()>), std::io::Error> {
        let (tx, rx) = mpsc::channel();
        let persisted = tx.clone();
        core.store().start_writer(Box::new(move |done| {
            let _ = persisted.send(Input::Persisted(done));
        }))?;
        let state = core.state();
        let (changed_tx, changed) = watch::channel(core.applied_index());
        let (removed_tx, removed) = watch::channel(false);
        let (halted_tx, halted) = watch::channel(None);
        let (leader_tx, leader) = watch::channel(0);
        let id = NodeId(core.id());
        let metrics = core.metrics().clone();
        let tracing = core.tracing();
        let worker = Worker {
            core,
            transport,
            tick,
            pending: HashMap::new(),
            next_request: seed_request_id(),
            conf_queue: VecDeque::new(),
            reads: BTreeMap::new(),
            ticks: 0,
            waiting_reads: Vec::new(),
            next_read: 0,
            changed_tx,
            removed_tx,
            halted_tx,
            changes,
            feed_warned: None,
            leader_tx,
            logged_term: 0,
            activated: HashMap::new(),
            handed_over_at: None,
        };
        let handle = std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || worker.run(rx))?;
        Ok((
            Self {
                tx,
                state,
                changed,
                removed,
                halted,
                leader,
                id,
                metrics,
                tracing,
            },
            handle,
        ))
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The raft thread's metrics, to register with the node's registry.
    pub fn metrics(&self) -> &RaftMetrics {
        &self.metrics
    }

    /// The local state machine, as of the last applied entry (a stale read).
    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Why the raft thread stopped on its own (it cannot write its log, or meets an entry
    /// it cannot apply): `Some` once it has; the node cannot go on without it.
    pub fn halted(&self) -> watch::Receiver<Option<String>> {
        self.halted.clone()
    }

    /// Resolves to `true` once this node learns it was removed from the cluster.
    pub fn removed(&self) -> watch::Receiver<bool> {
        self.removed.clone()
    }

    /// The applied index as of the last round that applied anything but metadata writes
    /// and state checks: what the host agents and the scheduler wake on. A round that
    /// only wrote metadata keys (`SetMeta`) changes nothing they read, and a busy
    /// key-value load would otherwise wake both on every node for every write.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// The leader this node knows of, as of the raft thread's last round (no round trip
    /// to the thread, unlike [`RaftNode::status`]).
    pub fn leader(&self) -> Option<NodeId> {
        let id = *self.leader.borrow();
        (id != 0).then_some(NodeId(id))
    }

    /// The leader's id as the raft thread publishes it (0: none known), to wait on.
    pub fn leader_watch(&self) -> watch::Receiver<u64> {
        self.leader.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Input) -> Result<T, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Proposes a command and waits until it is committed and applied here; returns the
    /// result of `apply`. Callers bound the wait with a timeout.
    pub async fn propose(&self, command: Command) -> Result<CommandOutput, ProposeError> {
        self.propose_by(command, None).await
    }

    /// [`Self::propose`], answered by `within` at the latest: with
    /// [`ProposeError::NoLeader`] if it was never handed to a leader (nothing happened),
    /// else [`ProposeError::TimedOut`] (it may or may not be applied). The raft thread
    /// decides which, so the answer is exact.
    pub async fn propose_within(
        &self,
        command: Command,
        within: Duration,
    ) -> Result<CommandOutput, ProposeError> {
        self.propose_by(command, Some(Instant::now() + within))
            .await
    }

    async fn propose_by(
        &self,
        command: Command,
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, ProposeError> {
        let context = self
            .tracing
            .as_ref()
            .map(|t| t.context())
            .unwrap_or_default();
        self.ask(|r| Input::Propose(command, context, r, deadline))
            .await
    }

    /// Admits a new member as a learner (leader only). The node id in `request` is
    /// filled in by the leader.
    pub async fn join(&self, request: JoinRequest) -> Result<CommandOutput, ProposeError> {
        self.ask(|r| Input::Join(request, r)).await
    }

    /// Removes a member from the configuration (leader only).
    pub async fn remove(&self, node: NodeId, now_ms: u64) -> Result<CommandOutput, ProposeError> {
        self.ask(|r| Input::Remove(node, now_ms, r)).await
    }

    /// Makes a member a voter or a learner that stays one (leader only), through a joint
    /// configuration change. A learner must have caught up with the leader first. The
    /// leader does not demote itself: it hands its leadership to the voter that is most
    /// up to date and answers [`ProposeError::NotLeader`] with no leader, to be asked
    /// again once the new leader is known.
    pub async fn change_role(
        &self,
        node: NodeId,
        role: MemberRole,
    ) -> Result<CommandOutput, ProposeError> {
        self.ask(|r| Input::ChangeRole(node, role, r)).await
    }

    /// Waits until the local state reflects everything committed before the call
    /// (raft's ReadIndex), so that a read that follows is linearizable.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        self.ask(Input::ReadIndex).await
    }

    /// Hands a message from a peer to raft.
    pub fn step(&self, message: Message) {
        let _ = self.tx.send(Input::Raft(message));
    }

    pub async fn status(&self) -> Result<NodeStatus, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Status(reply))
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)
    }

    /// A copy of every state row at this node's applied index, taken between two rounds
    /// of the raft thread (for `cluster backup`).
    pub async fn copy_state(&self) -> Result<StateCopy, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Copy(reply))
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)
    }

    /// Starts an election now (used at bootstrap so a new cluster has a leader at once).
    pub fn campaign(&self) {
        let _ = self.tx.send(Input::Campaign);
    }

    /// Stops the raft thread after the current step.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Input::Shutdown);
    }
}

fn seed_request_id() -> u64 {
    // Request ids only need to differ across restarts of one node.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    nanos.rotate_left(17)
}

enum ConfWork {
    Join(JoinRequest, Reply<CommandOutput>),
    Remove(NodeId, u64, Reply<CommandOutput>),
    /// The leader promotes a learner that caught up (unless the operator keeps it one).
    Promote(NodeId),
    /// `cluster promote` / `cluster demote`.
    Role(NodeId, MemberRole, Reply<CommandOutput>),
}

/// Ticks after which a leader that must hand its leadership on asks again.
const HAND_OVER_RETRY_TICKS: u64 = 20;

/// How far behind the leader's commit index a learner may be and count as caught up.
const CAUGHT_UP_ENTRIES: u64 = 64;

/// Ticks after which an unanswered ReadIndex request is sent again.
const READ_RETRY_TICKS: u64 = 20;
/// Ticks after which a proposal under a request id (`Command::Once`) that has not been
/// applied is proposed again, though the leader did not change (its forward may have been
/// lost on the way).
const ONCE_RETRY_TICKS: u64 = 20;

/// A proposal whose caller waits for its result.
struct Pending {
    reply: Reply<CommandOutput>,
    /// What happens when the leader changes before it is applied.
    on_leader_change: OnLeaderChange,
    /// The leader it was last handed to (0: none yet) and when (in ticks).
    leader: u64,
    at_tick: u64,
    /// When the caller is answered anyway ([`RaftNode::propose_within`]).
    deadline: Option<Instant>,
}

enum OnLeaderChange {
    /// A `Command::Once`: proposed again to the new leader (applied once whatever
    /// happens to the earlier copy).
    Repropose(Box<Envelope>, Vec<u8>),
    /// Any other command: the caller hears at once that the outcome is unknown, rather
    /// than at its timeout.
    Fail,
    /// A configuration change: left to its timeout (only the leader proposes them).
    Wait,
}

struct Worker {
    core: RaftCore,
    transport: Arc<dyn Transport>,
    tick: Duration,
    pending: HashMap<u64, Pending>,
    next_request: u64,
    conf_queue: VecDeque<ConfWork>,
    /// ReadIndex requests sent to raft, by context, with the leader and tick they were
    /// (last) sent at: a request sent to a leader that then died is lost, so it is sent
    /// again when the leader changes or it waits too long.
    reads: BTreeMap<u64, (u64, u64, Reply<()>)>,
    ticks: u64,
    /// ReadIndex answers waiting for the applied index to catch up.
    waiting_reads: Vec<(u64, Reply<()>)>,
    next_read: u64,
    changed_tx: watch::Sender<u64>,
    removed_tx: watch::Sender<bool>,
    /// Set when the thread stops on an error ([`RaftNode::halted`]).
    halted_tx: watch::Sender<Option<String>>,
    /// Where applied changes go (see [`RaftNode::spawn`]); `None` once its reader is gone.
    changes: Option<tokio::sync::mpsc::Sender<Change>>,
    /// When the thread last said it waits for the change feed's reader.
    feed_warned: Option<Instant>,
    /// The leader this node knows of (0: none), published after every round.
    leader_tx: watch::Sender<u64>,
    /// The term of the last leadership change logged, so each is logged once.
    logged_term: u64,
    /// Kept learners this leader proposed to mark active, and at which tick.
    activated: HashMap<u64, u64>,
    /// When this leader last handed its leadership on (in ticks).
    handed_over_at: Option<u64>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Input>) {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(input) => {
                    if !self.handle(input) {
                        break;
                    }
                    // Batch: take everything already queued before one Ready round.
                    let mut stop = false;
                    for _ in 0..4096 {
                        match rx.try_recv() {
                            Ok(input) => {
                                if !self.handle(input) {
                                    stop = true;
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    if stop {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.core.tick();
                next_tick += self.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.tick;
                }
                self.housekeeping();
            }
            self.drive_conf_queue();
            // A round can leave more to do (raft-rs generates a new Ready from what the
            // last one advanced); do it now rather than at the next input or tick.
            let mut go_on = true;
            for _ in 0..8 {
                match self.ready() {
                    Ok(true) if self.core.has_ready() => {}
                    Ok(true) => break,
                    Ok(false) => {
                        go_on = false;
                        break;
                    }
                    Err(e) => {
                        tracing::error!("raft node stopping: {e}");
                        self.halted_tx.send_replace(Some(e.to_string()));
                        go_on = false;
                        break;
                    }
                }
            }
            if !go_on {
                break;
            }
            self.publish_leader();
        }
        if let Err(e) = self.core.sync() {
            tracing::error!("could not sync the store on shutdown: {e}");
        }
        tracing::debug!("raft thread exiting");
    }

    /// A request id not used before by this node (since its start).
    fn take_request_id(&mut self) -> u64 {
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        id
    }

    /// Returns false when the node must stop.
    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Propose(command, context, reply, deadline) => {
                let request_id = self.take_request_id();
                let once = matches!(command, Command::Once { .. });
                let env = Envelope {
                    proposer: Some(NodeId(self.core.id())),
                    request_id,
                    command,
                };
                let leader = self.core.leader_id();
                if leader == 0 && !once {
                    self.core.metrics().proposals_failed.inc();
                    let _ = reply.send(Err(ProposeError::NoLeader));
                    return true;
                }
                // A write under a request id waits for a leader (within its caller's
                // timeout) instead of failing: it is proposed once one is known.
                let proposed = if leader == 0 {
                    Ok(())
                } else {
                    self.core.propose(&env, &context)
                };
                match proposed {
                    Ok(()) => {
                        let on_leader_change = if once {
                            OnLeaderChange::Repropose(Box::new(env), context)
                        } else {
                            OnLeaderChange::Fail
                        };
                        self.pending.insert(
                            request_id,
                            Pending {
                                reply,
                                on_leader_change,
                                leader,
                                at_tick: self.ticks,
                                deadline,
                            },
                        );
                    }
                    Err(raft::Error::ProposalDropped) => {
                        self.core.metrics().proposals_failed.inc();
                        let _ = reply.send(Err(ProposeError::NoLeader));
                    }
                    Err(e) => {
                        self.core.metrics().proposals_failed.inc();
                        let _ = reply.send(Err(ProposeError::Dropped(e.to_string())));
                    }
                }
            }
            Input::Join(request, reply) => {
                self.conf_queue.push_back(ConfWork::Join(request, reply))
            }
            Input::Remove(node, now, reply) => self
                .conf_queue
                .push_back(ConfWork::Remove(node, now, reply)),
            Input::ChangeRole(node, role, reply) => {
                self.conf_queue.push_back(ConfWork::Role(node, role, reply))
            }
            Input::ReadIndex(reply) => {
                if self.core.leader_id() == 0 {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                    return true;
                }
                self.next_read += 1;
                self.core.read_index(self.next_read.to_be_bytes().to_vec());
                self.reads
                    .insert(self.next_read, (self.core.leader_id(), self.ticks, reply));
            }
            Input::Raft(msg) => {
                if let Err(e) = self.core.step(msg) {
                    tracing::debug!("raft refused a message: {e}");
                }
            }
            Input::Persisted(Ok(done)) => {
                if let Some(took) = done.took {
                    self.core
                        .metrics()
                        .log_fsync_duration
                        .observe(took.as_secs_f64());
                }
                let messages = self.core.on_persisted(done.ready);
                if !messages.is_empty() {
                    self.transport.send(messages);
                }
            }
            Input::Persisted(Err(e)) => {
                tracing::error!("raft node stopping: writing the raft log failed: {e}");
                self.halted_tx
                    .send_replace(Some(format!("writing the raft log failed: {e}")));
                return false;
            }
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Input::Copy(reply) => {
                let _ = reply.send(self.core.copy_state());
            }
            Input::Campaign => {
                if let Err(e) = self.core.campaign() {
                    tracing::warn!("campaign failed: {e}");
                }
            }
            Input::Shutdown => return false,
        }
        true
    }

    fn status(&self) -> NodeStatus {
        let cs = self.core.conf_state();
        let leader = self.core.leader_id();
        let is_leader = self.core.role() == StateRole::Leader;
        let peers = if is_leader {
            cs.voters
                .iter()
                .chain(cs.learners.iter())
                .filter(|id| **id != self.core.id())
                .map(|id| PeerStatus {
                    id: *id,
                    matched: self.core.matched(*id).unwrap_or(0),
                    recently_active: self.core.recently_active(*id).unwrap_or(false),
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut voters = cs.voters.clone();
        voters.sort_unstable();
        let mut learners = cs.learners.clone();
        learners.sort_unstable();
        NodeStatus {
            id: self.core.id(),
            role: format!("{:?}", self.core.role()).to_lowercase(),
            leader: (leader != 0).then_some(leader),
            term: self.core.term(),
            commit: self.core.commit_index(),
            applied: self.core.applied_index(),
            first_index: self.core.first_index(),
            last_index: self.core.last_index(),
            voters,
            learners,
            peers,
            state_check: self.core.last_check(),
            alarm: self.core.alarm().map(str::to_string),
        }
    }

    fn publish_leader(&mut self) {
        let leader = self.core.leader_id();
        let m = self.core.metrics();
        m.has_leader.set(i64::from(leader != 0));
        m.is_leader
            .set(i64::from(self.core.role() == StateRole::Leader));
        m.term.set(self.core.term());
        m.commit_index.set(self.core.commit_index());
        m.applied_index.set(self.core.applied_index());
        m.proposals_pending.set(self.pending.len() as u64);
        let changed = self.leader_tx.send_if_modified(|l| {
            let changed = *l != leader;
            *l = leader;
            changed
        });
        let term = self.core.term();
        if changed && leader != 0 {
            self.core.metrics().leader_changes_seen.inc();
        }
        if changed || (leader != 0 && term != self.logged_term) {
            match leader {
                0 => tracing::info!(term, "no leader"),
                l => tracing::info!(leader = l, term, "leader elected"),
            }
            self.logged_term = term;
        }
    }

    fn housekeeping(&mut self) {
        self.ticks += 1;
        self.pending.retain(|_, p| !p.reply.is_closed());
        self.follow_leader_change();
        self.expire_pending(Instant::now());
        self.reads.retain(|_, (_, _, r)| !r.is_closed());
        let leader = self.core.leader_id();
        if leader != 0 {
            let (ticks, patience) = (self.ticks, READ_RETRY_TICKS);
            let stale: Vec<u64> = self
                .reads
                .iter()
                .filter(|(_, (sent_to, at, _))| *sent_to != leader || ticks >= at + patience)
                .map(|(ctx, _)| *ctx)
                .collect();
            for ctx in stale {
                self.core.read_index(ctx.to_be_bytes().to_vec());
                if let Some(entry) = self.reads.get_mut(&ctx) {
                    entry.0 = leader;
                    entry.1 = ticks;
                }
            }
        }
        if self.core.role() != StateRole::Leader {
            return;
        }
        // Promote learners that have caught up; a learner the operator keeps one is
        // marked active instead, once, so that it takes VMs.
        let learners = self.core.conf_state().learners.clone();
        for id in learners {
            if !self.caught_up(id) {
                continue;
            }
            let (kept, joining) = {
                let state = self.core.read_state();
                (
                    state.is_kept_learner(NodeId(id)),
                    state
                        .member(NodeId(id))
                        .is_some_and(|m| m.status == MemberStatus::Joining),
                )
            };
            if kept {
                let due = self
                    .activated
                    .get(&id)
                    .is_none_or(|at| self.ticks >= at + ONCE_RETRY_TICKS);
                if joining && due {
                    self.activate_learner(id);
                }
                continue;
            }
            let queued = self
                .conf_queue
                .iter()
                .any(|w| matches!(w, ConfWork::Promote(n) if n.0 == id));
            if !queued {
                self.conf_queue.push_back(ConfWork::Promote(NodeId(id)));
            }
        }
    }

    /// Whether a peer's log is within [`CAUGHT_UP_ENTRIES`] of the commit index (leader
    /// only).
    fn caught_up(&self, id: u64) -> bool {
        let commit = self.core.commit_index();
        self.core
            .matched(id)
            .is_some_and(|m| m + CAUGHT_UP_ENTRIES >= commit && m > 0)
    }

    /// Marks a kept learner that caught up active (a plain entry: its raft role stays).
    fn activate_learner(&mut self, id: u64) {
        let env = Envelope {
            proposer: None,
            request_id: self.take_request_id(),
            command: Command::SetRole {
                node: NodeId(id),
                role: MemberRole::Learner,
            },
        };
        match self.core.propose(&env, &[]) {
            Ok(()) => {
                self.activated.insert(id, self.ticks);
            }
            Err(e) => tracing::debug!(node = id, "marking a learner active: {e}"),
        }
    }

    /// Proposals handed to a leader that is no longer the leader (or, for writes under a
    /// request id, not applied for a while): writes under a request id go to the current
    /// leader again (the state machine applies them once); others fail at once with an
    /// unknown outcome, so their callers need not wait for their timeout.
    fn follow_leader_change(&mut self) {
        let leader = self.core.leader_id();
        if leader == 0 {
            return;
        }
        let ticks = self.ticks;
        let mut failed = Vec::new();
        for (id, p) in &mut self.pending {
            let moved = p.leader != leader;
            match &p.on_leader_change {
                OnLeaderChange::Repropose(env, context) => {
                    if moved || ticks >= p.at_tick + ONCE_RETRY_TICKS {
                        if let Err(e) = self.core.propose(env, context) {
                            tracing::debug!("proposing a write again: {e}");
                            continue;
                        }
                        if p.leader != 0 {
                            tracing::debug!(from = p.leader, to = leader, "proposed a write again");
                        }
                        p.leader = leader;
                        p.at_tick = ticks;
                    }
                }
                OnLeaderChange::Fail if moved => failed.push(*id),
                OnLeaderChange::Fail | OnLeaderChange::Wait => {}
            }
        }
        for id in failed {
            if let Some(p) = self.pending.remove(&id) {
                self.core.metrics().proposals_failed.inc();
                let _ = p.reply.send(Err(ProposeError::LeaderChanged));
            }
        }
    }

    /// Answers the proposals whose caller's time is up: never handed to a leader, they
    /// are dropped and nothing happened; handed to one, their outcome is unknown.
    fn expire_pending(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                self.core.metrics().proposals_failed.inc();
                let error = if p.leader == 0 {
                    ProposeError::NoLeader
                } else {
                    ProposeError::TimedOut
                };
                let _ = p.reply.send(Err(error));
            }
        }
    }

    /// Proposes the next queued configuration change once none is pending.
    fn drive_conf_queue(&mut self) {
        // A joint configuration is left before anything else changes.
        if self.core.role() == StateRole::Leader
            && !self.core.has_pending_conf()
            && self.leave_joint()
        {
            return;
        }
        while !self.conf_queue.is_empty() {
            if self.core.role() != StateRole::Leader {
                let leader = (self.core.leader_id() != 0).then_some(self.core.leader_id());
                for work in self.conf_queue.drain(..) {
                    match work {
                        ConfWork::Join(_, r)
                        | ConfWork::Remove(_, _, r)
                        | ConfWork::Role(_, _, r) => {
                            let _ = r.send(Err(ProposeError::NotLeader { leader }));
                        }
                        ConfWork::Promote(_) => {}
                    }
                }
                return;
            }
            if self.core.has_pending_conf() {
                return;
            }
            let Some(work) = self.conf_queue.pop_front() else {
                return;
            };
            let request_id = self.take_request_id();
            let me = Some(NodeId(self.core.id()));
            let (env, change, reply) = match work {
                ConfWork::Join(mut request, reply) => {
                    let next = self.core.read_state().next_node_id();
                    let Some(node) = next else {
                        let _ =
                            reply.send(Err(ProposeError::Rejected(ApplyError::NotBootstrapped)));
                        continue;
                    };
                    request.node = node;
                    let change = single(ConfChangeType::AddLearnerNode, node.0);
                    let env = Envelope {
                        proposer: me,
                        request_id,
                        command: Command::Join(request),
                    };
                    (env, change, Some(reply))
                }
                ConfWork::Remove(node, now_ms, reply) => {
                    let env = Envelope {
                        proposer: me,
                        request_id,
                        command: Command::RemoveMember { node, now_ms },
                    };
                    (env, single(ConfChangeType::RemoveNode, node.0), Some(reply))
                }
                ConfWork::Promote(node) => {
                    if !self.core.conf_state().learners.contains(&node.0) {
                        continue;
                    }
                    let env = Envelope {
                        proposer: None,
                        request_id,
                        command: Command::SetRole {
                            node,
                            role: MemberRole::Voter,
                        },
                    };
                    (env, single(ConfChangeType::AddNode, node.0), None)
                }
                ConfWork::Role(node, role, reply) => {
                    let change = match self.role_change(node, role) {
                        Ok(change) => change,
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    };
                    let env = Envelope {
                        proposer: me,
                        request_id,
                        command: Command::ChangeRole { node, role },
                    };
                    (env, change, Some(reply))
                }
            };
            let joint = matches!(env.command, Command::ChangeRole { .. });
            let mut cc = ConfChangeV2::default();
            cc.set_changes(vec![change].into());
            if joint {
                // Through a joint configuration (old and new voters both make a quorum),
                // left explicitly by the leader once applied (see `leave_joint`).
                cc.set_transition(ConfChangeTransition::Explicit);
            }
            match self.core.propose_conf_change(&env, cc) {
                Ok(()) => {
                    if let Some(reply) = reply {
                        self.pending.insert(
                            request_id,
                            Pending {
                                reply,
                                on_leader_change: OnLeaderChange::Wait,
                                leader: self.core.leader_id(),
                                at_tick: self.ticks,
                                deadline: None,
                            },
                        );
                    }
                }
                Err(e) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(ProposeError::Dropped(e.to_string())));
                    }
                }
            }
        }
    }

    /// The change that gives `node` its new role, or why it must not happen now: a
    /// learner that has not caught up is not promoted, and the leader hands its
    /// leadership on rather than demote itself.
    fn role_change(
        &mut self,
        node: NodeId,
        role: MemberRole,
    ) -> Result<ConfChangeSingle, ProposeError> {
        match role {
            MemberRole::Voter => {
                if self.core.conf_state().learners.contains(&node.0) && !self.caught_up(node.0) {
                    return Err(ProposeError::Rejected(ApplyError::NotCaughtUp {
                        node,
                        matched: self.core.matched(node.0).unwrap_or(0),
                        commit: self.core.commit_index(),
                    }));
                }
                Ok(single(ConfChangeType::AddNode, node.0))
            }
            MemberRole::Learner => {
                if node.0 == self.core.id() {
                    return Err(match self.hand_over() {
                        Some(to) => {
                            tracing::info!(to, "handing leadership on before demoting this node");
                            ProposeError::NotLeader { leader: None }
                        }
                        None => ProposeError::Rejected(ApplyError::OnlyVoter(node)),
                    });
                }
                Ok(single(ConfChangeType::AddLearnerNode, node.0))
            }
        }
    }

    /// Asks the most up-to-date other voter of the incoming configuration to take over
    /// the leadership (preferring ones heard from lately); `None` when there is none.
    fn hand_over(&mut self) -> Option<u64> {
        let me = self.core.id();
        let others: Vec<u64> = self
            .core
            .conf_state()
            .voters
            .iter()
            .copied()
            .filter(|id| *id != me)
            .collect();
        let to = others.iter().copied().max_by_key(|id| {
            (
                self.core.recently_active(*id) == Some(true),
                self.core.matched(*id).unwrap_or(0),
            )
        })?;
        self.core.transfer_leader(to);
        self.handed_over_at = Some(self.ticks);
        Some(to)
    }

    /// Proposes leaving a joint configuration, when the applied one is joint (after
    /// `cluster promote`/`demote`, or a leader change in between). Returns whether it did.
    fn leave_joint(&mut self) -> bool {
        if self.core.conf_state().voters_outgoing.is_empty() {
            return false;
        }
        // A leader the joint configuration demotes (it won an election as an outgoing
        // voter) hands its leadership to an incoming voter, which leaves the joint
        // configuration, rather than go on leading as a learner.
        if !self.core.conf_state().voters.contains(&self.core.id()) {
            let due = self
                .handed_over_at
                .is_none_or(|at| self.ticks >= at + HAND_OVER_RETRY_TICKS);
            if due {
                if let Some(to) = self.hand_over() {
                    tracing::info!(to, "this leader is demoted: handing its leadership on");
                }
            }
            return true;
        }
        let env = Envelope {
            proposer: None,
            request_id: self.take_request_id(),
            command: Command::Noop,
        };
        if let Err(e) = self.core.propose_conf_change(&env, ConfChangeV2::default()) {
            tracing::warn!("proposing to leave the joint configuration: {e}");
        }
        true
    }

    /// One Ready round. Returns false when the node must stop.
    fn ready(&mut self) -> Result<bool, crate::CoreError> {
        if !self.core.has_ready() {
            return Ok(true);
        }
        let applied_before = self.core.applied_index();
        let Output {
            changes,
            messages,
            applied,
            read_states,
            removed_self,
        } = self.core.process_ready()?;
        // Only metadata writes (and state checks) applied in this round: nothing the
        // agents and the scheduler read changed. A round that applied entries without a
        // change (no-ops, refusals, repeats) still wakes them, to be safe; one that
        // applied nothing does not.
        let quiet = !changes.is_empty()
            && changes
                .iter()
                .all(|c| matches!(c.kind, "set_meta" | "check_state"));
        for change in changes {
            self.feed(change);
        }
        if !messages.is_empty() {
            self.transport.send(messages);
        }
        for a in applied {
            if let Some(p) = self.pending.remove(&a.request_id) {
                let _ = p.reply.send(a.result.map_err(ProposeError::Rejected));
            }
        }
        for rs in read_states {
            let ctx: Option<[u8; 8]> = rs.request_ctx.as_slice().try_into().ok();
            if let Some((_, _, reply)) = ctx.and_then(|c| self.reads.remove(&u64::from_be_bytes(c)))
            {
                self.waiting_reads.push((rs.index, reply));
            }
        }
        let applied_index = self.core.applied_index();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied_index);
        self.waiting_reads = waiting;
        for (_, reply) in ready {
            let _ = reply.send(Ok(()));
        }
        if applied_index != applied_before && !quiet {
            self.changed_tx.send_replace(applied_index);
        }
        if removed_self {
            tracing::warn!("this node was removed from the cluster");
            self.removed_tx.send_replace(true);
            return Ok(false);
        }
        Ok(true)
    }
}

impl Worker {
    /// Hands one applied change to the feed's reader, waiting while the feed is full, so
    /// none is skipped.
    fn feed(&mut self, change: Change) {
        use tokio::sync::mpsc::error::TrySendError;
        let Some(tx) = &self.changes else { return };
        let sent = match tx.try_send(change) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(change)) => {
                if self
                    .feed_warned
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
                {
                    tracing::warn!(
                        "the applied-change feed is full: the raft thread waits for its reader (the audit log)"
                    );
                    self.feed_warned = Some(Instant::now());
                }
                // Off any async runtime: this thread is the raft thread.
                tx.blocking_send(change).map_err(|_| ())
            }
            Err(TrySendError::Closed(_)) => Err(()),
        };
        if sent.is_err() {
            tracing::error!(
                "the applied-change feed's reader is gone; applied changes are no longer handed on"
            );
            self.changes = None;
        }
    }
}

fn single(kind: ConfChangeType, node: u64) -> ConfChangeSingle {
    let mut c = ConfChangeSingle::default();
    c.set_change_type(kind);
    c.node_id = node;
    c
}
