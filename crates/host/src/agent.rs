//! The host agent: what runs on this host follows what cluster state assigns here. Every
//! round it steps each assigned VM (start, adopt, stop, restart per its policy, back off,
//! report its phase), stops runners that are no longer assigned here, removes the state
//! dirs of deleted VMs, and fences: a host that has seen no leader for `fence_after`
//! stops every VM, so a partitioned host never runs a VM the leader has moved elsewhere.
//!
//! The agent runs over two seams: a [`Cluster`] (what cluster state says, and how to
//! report, fetch and run hooks; the node implements it over raft) and a [`Supervisor`].
//! Tests drive it with fakes of both. It decides each VM's next step with the pure
//! [`reconcile::plan`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_core::{Desired, Image, Phase, RestartPolicy, Vm};
use tokio::sync::{watch, Notify};
use tracing::Instrument as _;

use crate::reconcile::{self, Action, Observed, Record, Restart, Want};
use crate::{HostError, Limits, Runner, Supervisor, VmDir, VmState};

/// How often the agent looks even when nothing was applied.
pub const IDLE: Duration = Duration::from_secs(1);
/// A runner counts as running (not starting) once it has stayed up this long.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How long a failed image fetch waits before the next try.
pub const FETCH_RETRY: Duration = Duration::from_secs(5);
/// The console lines a failure report carries.
pub const FAILURE_LINES: u32 = 5;
/// How often consoles are trimmed.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// The supervisor's name for a VM: `tenant@name` (unique, and a valid directory name).
pub fn local_name(vm: &Vm) -> String {
    format!("{}@{}", vm.spec.tenant, vm.spec.name)
}

/// The state-table key of a supervisor name.
pub fn key_of_local(name: &str) -> Option<String> {
    name.split_once('@').map(|(t, n)| Vm::key(t, n))
}

/// What the agent asks of the cluster. The node implements it over its raft node (with
/// reports proposed as commands through the node's choke point); tests fake it.
pub trait Cluster: Send + Sync + 'static {
    /// Milliseconds since the epoch (the agent reads no clock itself).
    fn now_ms(&self) -> u64;
    /// The VMs cluster state assigns to this host, by supervisor name.
    fn assigned(&self) -> BTreeMap<String, Vm>;
    /// The keys of every VM the cluster knows.
    fn known(&self) -> BTreeSet<String>;
    /// A VM by key, as cluster state has it now.
    fn vm(&self, key: &str) -> Option<Vm>;
    fn image(&self, name: &str) -> Option<Image>;
    /// Whether this host knows a leader now.
    fn has_leader(&self) -> bool;
    /// Catches up with the leader (a read barrier); false when it could not.
    fn sync(&self) -> impl Future<Output = bool> + Send;
    /// Records `phase` (and why) for `vm`. Best effort: a host without a leader goes on
    /// running its VMs and reports again on a later round.
    fn report(
        &self,
        vm: &Vm,
        phase: Phase,
        reason: Option<String>,
    ) -> impl Future<Output = ()> + Send;
    /// Where `image`'s runner is on this host, whether or not it is there yet.
    fn runner_dir(&self, image: &Image) -> PathBuf;
    /// Why a fetch failed (it becomes the VM's reason).
    type FetchError: std::error::Error + Send + 'static;
    /// Fetches `image` onto this host.
    fn fetch(&self, image: &Image) -> impl Future<Output = Result<(), Self::FetchError>> + Send;
    /// Runs `vm`'s after-start hooks (their outcome is theirs: a VM runs on either way).
    fn after_start(&self, vm: &Vm) -> impl Future<Output = ()> + Send;
    /// The agent tried to start `vm`'s runner: it was exec'd (`ok`) or could not be.
    /// `restart`: the VM ran here before under the same placement (after an exit or a
    /// restart request). For the metrics; does nothing by default.
    fn started(&self, _vm: &Vm, _ok: bool, _restart: bool) {}
    /// One reconcile round took `took`. For the metrics; does nothing by default.
    fn reconciled(&self, _took: Duration) {}
    /// The span the agent does `what` ("image fetch", "runner exec") for `vm` in: one of
    /// the trace of the request that asked for it. For traces; disabled by default.
    fn span(&self, _vm: &Vm, _what: &'static str) -> tracing::Span {
        tracing::Span::none()
    }
}

/// The agent's timings.
#[derive(Clone, Copy, Debug)]
pub struct AgentConfig {
    /// A host that has had no leader for this long stops every VM.
    pub fence_after: Duration,
    /// How long a runner gets to stop before it is killed.
    pub stop_timeout: Duration,
}

/// Whether this host can see a leader, and whether it has fenced.
#[derive(Debug)]
struct Fence {
    last_contact_ms: u64,
    fenced: bool,
    /// This host's state has caught up with the leader since it started or was fenced.
    synced: bool,
}

/// Why a round runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// A new raft entry was applied.
    Applied,
    /// A wake-up call, or the idle interval passed.
    Other,
    /// The node stopped.
    Stopped,
}

/// Waits for the next applied entry, a wake-up, or `at_most`.
pub async fn next_change(
    applied: &mut watch::Receiver<u64>,
    wake: &Notify,
    at_most: Duration,
) -> Wake {
    tokio::select! {
        r = applied.changed() => if r.is_ok() { Wake::Applied } else { Wake::Stopped },
        _ = wake.notified() => Wake::Other,
        _ = tokio::time::sleep(at_most) => Wake::Other,
    }
}

/// The host agent of one node.
pub struct Agent<C> {
    cluster: Arc<C>,
    supervisor: Arc<dyn Supervisor>,
    config: AgentConfig,
    /// VMs whose image is being fetched here now.
    fetching: Mutex<HashSet<String>>,
    /// Wakes the agent (e.g. when a fetch finished).
    pub wake: Notify,
    fence: Mutex<Fence>,
    /// The VMs as the last round stepped them.
    seen: tokio::sync::Mutex<HashMap<String, Vm>>,
}

impl<C: Cluster> Agent<C> {
    pub fn new(cluster: Arc<C>, supervisor: Arc<dyn Supervisor>, config: AgentConfig) -> Self {
        let now = cluster.now_ms();
        Self {
            cluster,
            supervisor,
            config,
            fetching: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            fence: Mutex::new(Fence {
                last_contact_ms: now,
                fenced: false,
                synced: false,
            }),
            seen: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Runs until the node stops: a round whenever an entry is applied (only the VMs it
    /// changed), on a wake-up, and at least every [`IDLE`] (all of them: exits, backoffs,
    /// settling).
    pub async fn run(self: Arc<Self>, mut applied: watch::Receiver<u64>) {
        let mut trimmed = self.cluster.now_ms();
        let mut swept = self.cluster.now_ms();
        loop {
            let wake = next_change(&mut applied, &self.wake, IDLE).await;
            if wake == Wake::Stopped {
                break;
            }
            let idle_ms = IDLE.as_millis() as u64;
            let quick =
                wake == Wake::Applied && self.cluster.now_ms().saturating_sub(swept) < idle_ms;
            let began = std::time::Instant::now();
            let round = self.round(quick).await;
            self.cluster.reconciled(began.elapsed());
            if round == Round::Full {
                swept = self.cluster.now_ms();
            }
            if self.cluster.now_ms().saturating_sub(trimmed) > TRIM_EVERY.as_millis() as u64 {
                trimmed = self.cluster.now_ms();
                for (name, _) in self.supervisor.running() {
                    let _ = self.supervisor.trim_console(&name);
                }
            }
        }
    }

    /// One round: the fence first, then (a quick round) the VMs that changed since the
    /// last round, or (a full round, or when a quick one is not enough) every VM and the
    /// sweep of what is no longer assigned here.
    pub async fn round(self: &Arc<Self>, quick: bool) -> Round {
        match self.check_fence().await {
            FenceState::Fenced => {
                self.fence_round().await;
                return Round::Fenced;
            }
            FenceState::Waiting => return Round::Waiting,
            FenceState::Clear => {}
        }
        let mut seen = self.seen.lock().await;
        if quick {
            let mine = self.cluster.assigned();
            if !seen.keys().any(|k| !mine.contains_key(k)) {
                let changed: Vec<(String, Vm)> = mine
                    .into_iter()
                    .filter(|(name, vm)| seen.get(name) != Some(vm))
                    .collect();
                for (name, vm) in &changed {
                    seen.insert(name.clone(), vm.clone());
                }
                drop(seen);
                self.step_all(changed).await;
                return Round::Quick;
            }
        }
        let mine = self.cluster.assigned();
        let known = self.cluster.known();
        // Runners here that cluster state no longer puts here: moved, or deleted.
        let mut still_running = BTreeSet::new();
        for (name, _) in self.supervisor.running() {
            if mine.contains_key(&name) {
                continue;
            }
            tracing::info!(vm = %name, "not assigned here any more; stopping");
            if let Err(e) = self.stop(&name).await {
                tracing::error!(vm = %name, "cannot stop: {e}");
                still_running.insert(name);
            }
        }
        // State dirs of deleted VMs go (once their runner stopped above).
        for name in self.supervisor.local_dirs() {
            let gone = key_of_local(&name).is_none_or(|k| !known.contains(&k));
            if gone && !still_running.contains(&name) {
                if let Ok(dir) = self.supervisor.dir(&name) {
                    dir.remove();
                }
            }
        }
        // Exactly what this round steps: a VM applied meanwhile is new to the next round.
        *seen = mine.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        drop(seen);
        self.step_all(mine.into_iter().collect()).await;
        Round::Full
    }

    /// Whether this host may act: it must know a leader and have caught up with it once
    /// (after a start or a fence), or, without a leader, it fences after `fence_after`.
    async fn check_fence(&self) -> FenceState {
        let now = self.cluster.now_ms();
        if self.cluster.has_leader() {
            let synced = match self.fence.lock() {
                Ok(mut f) => {
                    f.last_contact_ms = now;
                    f.synced
                }
                Err(_) => false,
            };
            if !synced {
                // After a start or a fence this host's state may be behind (its VMs may
                // have moved meanwhile): act only once it has caught up with the leader.
                if !self.cluster.sync().await {
                    return FenceState::Waiting;
                }
            }
            if let Ok(mut f) = self.fence.lock() {
                f.synced = true;
                if f.fenced {
                    tracing::warn!("in contact with a leader again; resuming VMs");
                    f.fenced = false;
                }
            }
            return FenceState::Clear;
        }
        let Ok(mut f) = self.fence.lock() else {
            return FenceState::Waiting;
        };
        let silent = Duration::from_millis(now.saturating_sub(f.last_contact_ms));
        if silent >= self.config.fence_after {
            if !f.fenced {
                tracing::warn!(
                    "no leader for {:?}: fencing (stopping every VM on this host)",
                    self.config.fence_after
                );
                f.fenced = true;
                f.synced = false;
            }
            FenceState::Fenced
        } else if f.synced {
            FenceState::Clear
        } else {
            // Started without a leader: nothing to act on yet (running VMs run on).
            FenceState::Waiting
        }
    }

    /// Stops every VM here, all at once: the timing rule gives the whole fence one stop
    /// timeout, not one per VM.
    async fn fence_round(self: &Arc<Self>) {
        let mut stops = tokio::task::JoinSet::new();
        for (name, _) in self.supervisor.running() {
            tracing::warn!(vm = %name, "fenced: stopping");
            if let Ok(dir) = self.supervisor.dir(&name) {
                if let Some(mut r) = dir.record() {
                    r.stopped = true;
                    write_record(&dir, &r);
                }
            }
            let me = self.clone();
            stops.spawn(async move {
                if let Err(e) = me.stop(&name).await {
                    tracing::error!(vm = %name, "cannot stop a fenced VM: {e}");
                }
            });
        }
        while stops.join_next().await.is_some() {}
    }

    /// Steps VMs side by side (each touches only its own state dir and runner), so one
    /// VM's report or stop does not hold up another's start; returns when all are done.
    async fn step_all(self: &Arc<Self>, vms: Vec<(String, Vm)>) {
        let mut steps = tokio::task::JoinSet::new();
        for (name, vm) in vms {
            let me = self.clone();
            steps.spawn(async move {
                if let Err(e) = me.step(&name, &vm).await {
                    tracing::debug!(vm = %name, "reconcile: {e}");
                }
            });
        }
        while steps.join_next().await.is_some() {}
    }

    async fn stop(&self, name: &str) -> Result<(), HostError> {
        let supervisor = self.supervisor.clone();
        let name = name.to_string();
        let timeout = self.config.stop_timeout;
        tokio::task::spawn_blocking(move || supervisor.stop(&name, timeout)).await??;
        Ok(())
    }

    /// Reports `phase` for `vm` unless cluster state already says so.
    async fn report(&self, vm: &Vm, phase: Phase, reason: Option<String>) {
        if vm.phase == phase && vm.reason == reason {
            return;
        }
        self.cluster.report(vm, phase, reason).await;
    }

    /// Converges one VM assigned to this host.
    pub async fn step(self: &Arc<Self>, name: &str, vm: &Vm) -> Result<(), HostError> {
        let dir = self.supervisor.dir(name)?;
        let mut record = dir.record();
        let state = self.supervisor.state(name)?;
        let observed = match state {
            VmState::Running { .. } => Observed::Running,
            VmState::Exited { code } => Observed::Exited { code },
            VmState::Absent => Observed::Absent,
        };
        let want = Want {
            generation: vm.generation,
            running: vm.desired == Desired::Running,
            restarts: vm.restarts,
            policy: policy(vm.spec.restart),
        };
        let now = self.cluster.now_ms();
        // Note the first sight of an exit, for the backoff.
        if let (Observed::Exited { .. }, Some(r)) = (observed, record.as_mut()) {
            if r.generation == vm.generation && r.exited_at_ms.is_none() {
                r.exited_at_ms = Some(now);
                write_record(&dir, r);
            }
        }
        match reconcile::plan(&want, record.as_ref(), observed, now) {
            Action::Keep => {
                if observed == Observed::Running {
                    if record.is_none_or(|r| r.generation != vm.generation) {
                        // Adopted (a placement this host had not recorded): make it ours.
                        let adopted = Record {
                            generation: vm.generation,
                            restarts: vm.restarts,
                            // It ran before this daemon: settled.
                            started_at_ms: now.saturating_sub(SETTLE.as_millis() as u64),
                            ..Record::default()
                        };
                        write_record(&dir, &adopted);
                        record = Some(adopted);
                    }
                    let phase = self.running_phase(&dir, vm, record.as_ref(), now);
                    self.report(vm, phase, None).await;
                } else if !want.running && !matches!(vm.phase, Phase::Stopped | Phase::Failed) {
                    self.report(vm, Phase::Stopped, None).await;
                }
                Ok(())
            }
            Action::Stop => {
                self.report(vm, Phase::Stopping, None).await;
                if let Some(r) = record.as_mut() {
                    r.stopped = true;
                    write_record(&dir, r);
                }
                self.stop(name).await?;
                self.report(vm, Phase::Stopped, None).await;
                Ok(())
            }
            Action::Restart => {
                self.report(vm, Phase::Stopping, Some("restart requested".into()))
                    .await;
                self.stop(name).await?;
                self.start(&dir, vm, record, false).await
            }
            Action::Start => self.start(&dir, vm, record, true).await,
            Action::Wait(_) => {
                let (code, clean) = match state {
                    VmState::Exited { code } => (exit_text(code), code == Some(0)),
                    _ => (String::new(), false),
                };
                let failures = record.map_or(0, |r| r.failures);
                let why = format!(
                    "{code}; restarting in {}s (attempt {}){}",
                    reconcile::backoff(failures).as_secs(),
                    failures + 1,
                    last_lines(&dir, record.as_ref())
                );
                // One report per exit, not one per second of backoff. A clean exit (under
                // `--restart always`) is stopped, not failed.
                let phase = if clean { Phase::Stopped } else { Phase::Failed };
                if !matches!(vm.phase, Phase::Failed | Phase::Stopped) {
                    self.report(vm, phase, Some(why)).await;
                }
                Ok(())
            }
            Action::Down { failed } => {
                let code = match state {
                    VmState::Exited { code } => exit_text(code),
                    _ => String::new(),
                };
                if failed {
                    let why = format!("{code}{}", last_lines(&dir, record.as_ref()));
                    self.report(vm, Phase::Failed, Some(why)).await;
                } else {
                    self.report(vm, Phase::Stopped, Some(code)).await;
                }
                Ok(())
            }
        }
    }

    /// Starting until the runner has stayed up for [`SETTLE`]; then running, or ready once
    /// the guest printed the VM's ready marker.
    fn running_phase(&self, dir: &VmDir, vm: &Vm, record: Option<&Record>, now: u64) -> Phase {
        if vm.phase == Phase::Ready {
            return Phase::Ready;
        }
        if let Some(marker) = &vm.spec.ready_marker {
            let seen = dir
                .run_lines(record.map_or(0, |r| r.console_from), u32::MAX)
                .iter()
                .any(|l| l.contains(marker.as_str()));
            if seen {
                return Phase::Ready;
            }
        }
        let age = now.saturating_sub(record.map_or(0, |r| r.started_at_ms));
        if Duration::from_millis(age) < SETTLE {
            Phase::Starting
        } else {
            Phase::Running
        }
    }

    /// Starts the VM's runner, fetching its image first when it is not here.
    async fn start(
        self: &Arc<Self>,
        dir: &VmDir,
        vm: &Vm,
        record: Option<Record>,
        after_exit: bool,
    ) -> Result<(), HostError> {
        let restart = record
            .as_ref()
            .is_some_and(|r| r.generation == vm.generation);
        let Some(image) = self.cluster.image(&vm.spec.image) else {
            let why = format!("image {} is gone", vm.spec.image);
            self.cluster.started(vm, false, restart);
            self.report(vm, Phase::Failed, Some(why)).await;
            return Ok(());
        };
        if image.manifest != vm.manifest {
            let why = format!(
                "image {} now names another closure than the VM was created with",
                image.name
            );
            self.cluster.started(vm, false, restart);
            self.report(vm, Phase::Failed, Some(why)).await;
            return Ok(());
        }
        let runner_dir = self.cluster.runner_dir(&image);
        if !runner_dir.exists() {
            self.fetch_in_background(vm, &image).await;
            return Ok(());
        }
        let runner = match Runner::new(&runner_dir) {
            Ok(r) => r,
            Err(e) => {
                self.cluster.started(vm, false, restart);
                self.report(vm, Phase::Failed, Some(e.to_string())).await;
                return Ok(());
            }
        };
        let same_run = record.filter(|r| r.generation == vm.generation);
        let now = self.cluster.now_ms();
        let failures = match same_run {
            Some(r) if after_exit && !r.stopped && r.restarts >= vm.restarts => {
                let ran = now.saturating_sub(r.started_at_ms);
                if Duration::from_millis(ran) >= reconcile::STABLE_RUN {
                    0
                } else {
                    r.failures.saturating_add(1)
                }
            }
            _ => 0,
        };
        let console_from = dir.console_len();
        // Taps and cgroups run commands and may retry: off the async workers.
        let supervisor = self.supervisor.clone();
        let name = dir.name().to_string();
        let limits = Limits {
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
        };
        let span = self.cluster.span(vm, "runner exec");
        let started = tokio::task::spawn_blocking(move || {
            supervisor.start_with(&name, &runner, Some(&limits))
        })
        .instrument(span.clone())
        .await
        .map_err(HostError::from)
        .and_then(|r| r);
        if let Err(e) = started {
            span.record("otel.status_code", "error");
            self.cluster.started(vm, false, restart);
            self.report(vm, Phase::Failed, Some(e.to_string()))
                .instrument(span)
                .await;
            return Ok(());
        }
        self.cluster.started(vm, true, restart);
        write_record(
            dir,
            &Record {
                generation: vm.generation,
                restarts: vm.restarts,
                failures,
                started_at_ms: self.cluster.now_ms(),
                exited_at_ms: None,
                stopped: false,
                console_from,
            },
        );
        // Reported after the exec, so the report's commit is not on the start's path; a
        // later round promotes it to running once it has settled.
        self.report(vm, Phase::Starting, None)
            .instrument(span)
            .await;
        let (me, vm) = (self.clone(), vm.clone());
        tokio::spawn(async move { me.cluster.after_start(&vm).await });
        Ok(())
    }

    /// Fetches the VM's image in a task of its own (once at a time per VM); its end wakes
    /// the agent.
    async fn fetch_in_background(self: &Arc<Self>, vm: &Vm, image: &Image) {
        let name = local_name(vm);
        let fresh = self
            .fetching
            .lock()
            .map(|mut f| f.insert(name.clone()))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        // A retry keeps the last failure's reason until it succeeds.
        if vm.phase != Phase::Fetching {
            self.report(vm, Phase::Fetching, None).await;
        }
        let me = self.clone();
        let (vm, image) = (vm.clone(), image.clone());
        let span = self.cluster.span(&vm, "image fetch");
        tokio::spawn(async move {
            let fetched = me.cluster.fetch(&image).instrument(span.clone()).await;
            if let Err(e) = fetched {
                span.record("otel.status_code", "error");
                tracing::warn!(vm = %name, "fetching image {}: {e}", image.name);
                let current = me.cluster.vm(&vm.id());
                if let Some(current) = current.filter(|c| c.generation == vm.generation) {
                    let why = format!("fetching image {}: {e}; retrying", image.name);
                    me.report(&current, Phase::Fetching, Some(why)).await;
                }
                tokio::time::sleep(FETCH_RETRY).await;
            }
            if let Ok(mut f) = me.fetching.lock() {
                f.remove(&name);
            }
            me.wake.notify_one();
        });
    }
}

/// What a round did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// Stepped the VMs that changed.
    Quick,
    /// Stepped every VM and swept.
    Full,
    /// Stopped every VM: no leader for too long.
    Fenced,
    /// Nothing: not caught up with a leader yet.
    Waiting,
}

enum FenceState {
    Clear,
    Waiting,
    Fenced,
}

fn policy(p: RestartPolicy) -> Restart {
    match p {
        RestartPolicy::Always => Restart::Always,
        RestartPolicy::OnFailure => Restart::OnFailure,
        RestartPolicy::Never => Restart::Never,
    }
}

fn write_record(dir: &VmDir, record: &Record) {
    if let Err(e) = dir.write_record(record) {
        tracing::error!("{e}");
    }
}

fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited with code {c}"),
        None => "killed by a signal (or exited while the daemon was down)".into(),
    }
}

/// This run's last console lines, for a failure reason.
fn last_lines(dir: &VmDir, record: Option<&Record>) -> String {
    let lines = dir.run_lines(record.map_or(0, |r| r.console_from), FAILURE_LINES);
    if lines.is_empty() {
        String::new()
    } else {
        format!("; console: {}", lines.join(" | "))
    }
}
