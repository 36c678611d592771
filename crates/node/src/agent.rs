//! The loops that make VMs happen: on the leader, the scheduler (placements) and the
//! liveness watch (hosts down and up); on every node, the reconciler (what runs here
//! follows what cluster state assigns here) and the fence (no leader for too long: stop
//! every VM, so a partitioned host never runs a VM the leader has moved elsewhere).
//!
//! Each loop wakes when this node applies a new raft entry, and at least once a second.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_core::{place, Command, Desired, MemberStatus, NodeId, Phase, RestartPolicy, Vm};
use blixard_host::reconcile::{self, Action, Observed, Record, Restart, Want};
use blixard_host::{Runner, VmState};
use blixard_net::api::ProgressSink;

use crate::service::{now_ms, NodeService};
use crate::vms::{hook_vm, Vms};

/// How often the loops look even when nothing was applied.
const IDLE: Duration = Duration::from_secs(1);
/// How often the leader samples its peers' activity.
const LIVENESS_POLL: Duration = Duration::from_millis(250);
/// A runner counts as running (not starting) once it has stayed up this long.
const SETTLE: Duration = Duration::from_secs(1);
/// How long a failed image fetch waits before the next try.
const FETCH_RETRY: Duration = Duration::from_secs(5);
/// The console lines a failure report carries.
const FAILURE_LINES: usize = 5;

/// Why a loop woke up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// A new raft entry was applied.
    Applied,
    /// A wake-up call, or `at_most` passed.
    Other,
    /// The node stopped.
    Stopped,
}

/// Waits for the next applied entry, a wake-up, or `at_most`.
async fn next_change(
    applied: &mut tokio::sync::watch::Receiver<u64>,
    wake: &tokio::sync::Notify,
    at_most: Duration,
) -> Wake {
    tokio::select! {
        r = applied.changed() => if r.is_ok() { Wake::Applied } else { Wake::Stopped },
        _ = wake.notified() => Wake::Other,
        _ = tokio::time::sleep(at_most) => Wake::Other,
    }
}

/// The leader's scheduler and liveness watch; idle on followers.
pub async fn scheduler(service: Arc<NodeService>) {
    let mut applied = service.node.applied();
    // When each peer was last seen active, as far as this leader knows.
    let mut seen: HashMap<NodeId, Instant> = HashMap::new();
    let mut was_leader = false;
    let never = tokio::sync::Notify::new();
    while next_change(&mut applied, &never, LIVENESS_POLL).await != Wake::Stopped {
        let Ok(status) = service.node.status().await else {
            continue;
        };
        let me = service.node.id();
        if status.leader != Some(me.0) {
            was_leader = false;
            continue;
        }
        if !was_leader {
            // A new leader knows nothing of the past: every peer gets a full timeout.
            seen.clear();
            was_leader = true;
        }
        let now = Instant::now();
        let mut active: HashMap<u64, bool> = status
            .peers
            .iter()
            .map(|p| (p.id, p.recently_active))
            .collect();
        active.insert(me.0, true);
        if let Err(e) = liveness(&service, &active, &mut seen, now).await {
            tracing::debug!("liveness: {e}");
        }
        if let Err(e) = schedule_round(&service).await {
            tracing::debug!("scheduler: {e}");
        }
    }
}

async fn liveness(
    service: &NodeService,
    active: &HashMap<u64, bool>,
    seen: &mut HashMap<NodeId, Instant>,
    now: Instant,
) -> Result<(), String> {
    let members: Vec<(NodeId, Option<u64>)> = {
        let state = service.node.state();
        state
            .members()
            .filter(|m| m.status == MemberStatus::Active)
            .map(|m| (m.id, state.down_since(m.id)))
            .collect()
    };
    for (node, down_since) in members {
        let first = *seen.entry(node).or_insert(now);
        let up = active.get(&node.0).copied().unwrap_or(false);
        if up {
            seen.insert(node, now);
        }
        let change = match (up, down_since) {
            (true, Some(_)) => Some(false),
            (false, None) if now.duration_since(first) >= service.vms.down_after => Some(true),
            _ => None,
        };
        if let Some(down) = change {
            tracing::warn!(%node, down, "host liveness changed");
            service
                .propose(Command::SetNodeDown {
                    node,
                    down,
                    now_ms: now_ms(),
                })
                .await
                .map_err(|e| e.to_string())?;
            service
                .audit
                .record_node(node, if down { "marked down" } else { "marked up" });
        }
    }
    Ok(())
}

/// Places every pending VM (or records why it cannot be placed), in key order.
async fn schedule_round(service: &NodeService) -> Result<(), String> {
    let config = service.vms.scheduler;
    let decisions: Vec<Command> = {
        let state = service.node.state();
        let mut ledger = state.ledger();
        let members: Vec<_> = state.members().cloned().collect();
        let mut out = Vec::new();
        for vm in state.vms().filter(|v| v.node.is_none()) {
            let decision = place(&members, &vm.spec, &ledger, &config);
            if let Ok(node) = decision {
                ledger.add_spec(&vm.spec, node);
            }
            let (node, reason) = match decision {
                Ok(n) => (Some(n), None),
                Err(why) => {
                    let why = format!("unschedulable: {why}");
                    // Already recorded: nothing to propose.
                    if vm.reason.as_deref() == Some(why.as_str()) {
                        continue;
                    }
                    (None, Some(why))
                }
            };
            out.push(Command::PlaceVm {
                key: vm.id(),
                generation: vm.generation,
                node,
                reason,
                cpu_overcommit_pct: config.cpu_overcommit_pct,
                memory_overcommit_pct: config.memory_overcommit_pct,
                now_ms: now_ms(),
            });
        }
        out
    };
    for command in decisions {
        let (key, node, reason) = match &command {
            Command::PlaceVm {
                key, node, reason, ..
            } => (key.clone(), *node, reason.clone()),
            _ => continue,
        };
        match service.propose(command).await {
            // The leader's decisions are state changes too: in its audit log.
            Ok(_) => match node {
                Some(n) => {
                    service
                        .audit
                        .record_vm(&key, "scheduled", Some(&format!("placed on n{n}")))
                }
                None => service.audit.record_vm(&key, "pending", reason.as_deref()),
            },
            // A decision overtaken by another change is made again next round.
            Err(e) => tracing::debug!("placement refused: {e}"),
        }
    }
    Ok(())
}

/// Tracks whether this node can see a leader; fences (stops every VM) when it has not
/// for the fence timeout.
struct Fence {
    last_contact: Instant,
    fenced: bool,
    /// This node's state has caught up with the leader since it started or was fenced.
    synced: bool,
}

/// The reconciler: runs on every node.
pub async fn reconciler(service: Arc<NodeService>) {
    let mut applied = service.node.applied();
    let mut fence = Fence {
        last_contact: Instant::now(),
        fenced: false,
        synced: false,
    };
    let mut trimmed = Instant::now();
    // The VMs as the last round saw them, and when every VM was last looked at.
    let mut seen: HashMap<String, Vm> = HashMap::new();
    let mut swept = Instant::now();
    loop {
        let wake = next_change(&mut applied, &service.vms.wake, IDLE).await;
        if wake == Wake::Stopped {
            break;
        }
        let has_leader = service.node.leader().is_some();
        if has_leader {
            fence.last_contact = Instant::now();
            if !fence.synced {
                // After a start or a fence this node's state may be behind (its VMs may
                // have moved meanwhile): act only once it has caught up with the leader.
                match tokio::time::timeout(REPORT_TIMEOUT, service.barrier(false)).await {
                    Ok(Ok(())) => fence.synced = true,
                    _ => continue,
                }
            }
            if fence.fenced {
                tracing::warn!("in contact with a leader again; resuming VMs");
                fence.fenced = false;
            }
        } else if fence.last_contact.elapsed() >= service.vms.fence_after {
            if !fence.fenced {
                tracing::warn!(
                    "no leader for {:?}: fencing (stopping every VM on this host)",
                    service.vms.fence_after
                );
                fence.fenced = true;
                fence.synced = false;
            }
            fence_round(&service).await;
            continue;
        } else if !fence.synced {
            // Started without a leader: nothing to act on yet (running VMs run on).
            continue;
        }
        // A new entry: only the VMs it changed (the start path of a new VM stays short).
        // Otherwise, and at least once a second, all of them (exits, backoffs, settling).
        let quick = wake == Wake::Applied && swept.elapsed() < IDLE;
        if !quick || !reconcile_round(&service, true, &mut seen).await {
            reconcile_round(&service, false, &mut seen).await;
            swept = Instant::now();
        }
        if trimmed.elapsed() > Duration::from_secs(10) {
            trimmed = Instant::now();
            for (name, _) in service.vms.supervisor.running() {
                let _ = service.vms.supervisor.trim_console(&name);
            }
        }
    }
}

fn read_record(dir: &Path) -> Option<Record> {
    let bytes = std::fs::read(dir.join("assignment.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_record(dir: &Path, record: &Record) {
    let Ok(bytes) = serde_json::to_vec(record) else {
        return;
    };
    let tmp = dir.join("assignment.json.tmp");
    if let Err(e) = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, bytes))
        .and_then(|_| std::fs::rename(&tmp, dir.join("assignment.json")))
    {
        tracing::error!("cannot write {}: {e}", dir.display());
    }
}

async fn stop_local(service: &NodeService, name: &str) -> Result<(), String> {
    let supervisor = service.vms.supervisor.clone();
    let name2 = name.to_string();
    let timeout = service.vms.stop_timeout;
    tokio::task::spawn_blocking(move || supervisor.stop(&name2, timeout))
        .await
        .map_err(|e| e.to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Stops every VM here, all at once: the timing rule gives the whole fence one stop
/// timeout, not one per VM.
async fn fence_round(service: &Arc<NodeService>) {
    let mut stops = tokio::task::JoinSet::new();
    for (name, _) in service.vms.supervisor.running() {
        tracing::warn!(vm = %name, "fenced: stopping");
        if let Some(dir) = service.vms.state_dir(&name) {
            if let Some(mut r) = read_record(&dir) {
                r.stopped = true;
                write_record(&dir, &r);
            }
        }
        let me = service.clone();
        stops.spawn(async move {
            if let Err(e) = stop_local(&me, &name).await {
                tracing::error!(vm = %name, "cannot stop a fenced VM: {e}");
            }
        });
    }
    while stops.join_next().await.is_some() {}
}

/// The VMs assigned to this host, by supervisor name.
fn mine_now(service: &NodeService) -> HashMap<String, Vm> {
    let me = service.node.id();
    service
        .node
        .state()
        .vms()
        .filter(|v| v.node == Some(me))
        .map(|v| (Vms::local_name(v), v.clone()))
        .collect()
}

/// One reconciler round; `seen` is what the rounds have stepped. A quick round steps only
/// the VMs that changed since, and returns false when that is not enough (a VM left this
/// host) and a full round must follow. A full round steps every VM, and sweeps runners
/// and state dirs that are no longer assigned here.
async fn reconcile_round(
    service: &Arc<NodeService>,
    quick: bool,
    seen: &mut HashMap<String, Vm>,
) -> bool {
    if quick {
        let mine = mine_now(service);
        if seen.keys().any(|k| !mine.contains_key(k)) {
            return false;
        }
        let changed: Vec<(String, Vm)> = mine
            .into_iter()
            .filter(|(name, vm)| seen.get(name) != Some(vm))
            .collect();
        for (name, vm) in &changed {
            seen.insert(name.clone(), vm.clone());
        }
        step_all(service, changed).await;
        return true;
    }
    let me = service.node.id();
    let (mine, known): (BTreeMap<String, Vm>, std::collections::BTreeSet<String>) = {
        let state = service.node.state();
        (
            state
                .vms()
                .filter(|v| v.node == Some(me))
                .map(|v| (Vms::local_name(v), v.clone()))
                .collect(),
            state.vms().map(Vm::id).collect(),
        )
    };
    // Runners here that cluster state no longer puts here: moved, or deleted.
    let mut still_running = std::collections::BTreeSet::new();
    for (name, _) in service.vms.supervisor.running() {
        if mine.contains_key(&name) {
            continue;
        }
        tracing::info!(vm = %name, "not assigned here any more; stopping");
        if let Err(e) = stop_local(service, &name).await {
            tracing::error!(vm = %name, "cannot stop: {e}");
            still_running.insert(name);
        }
    }
    // State dirs of deleted VMs go (once their runner stopped above).
    for name in service.vms.local_dirs() {
        let gone = Vms::key_of_local(&name).is_none_or(|k| !known.contains(&k));
        if gone && !still_running.contains(&name) {
            if let Some(dir) = service.vms.state_dir(&name) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    // Exactly what this round stepped: a VM applied meanwhile is new to the next round.
    *seen = mine.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    step_all(service, mine.into_iter().collect()).await;
    true
}

/// Steps VMs side by side (each touches only its own state dir and runner), so one VM's
/// report or stop does not hold up another's start; returns when all are done.
async fn step_all(service: &Arc<NodeService>, vms: Vec<(String, Vm)>) {
    let mut steps = tokio::task::JoinSet::new();
    for (name, vm) in vms {
        let me = service.clone();
        steps.spawn(async move {
            if let Err(e) = step(&me, &name, &vm).await {
                tracing::debug!(vm = %name, "reconcile: {e}");
            }
        });
    }
    while steps.join_next().await.is_some() {}
}

fn policy(p: RestartPolicy) -> Restart {
    match p {
        RestartPolicy::Always => Restart::Always,
        RestartPolicy::OnFailure => Restart::OnFailure,
        RestartPolicy::Never => Restart::Never,
    }
}

/// How long a report may wait for the cluster; the host acts on its own either way.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Reports `phase` for `vm` unless cluster state already says so. Best effort: a host
/// without a leader goes on running (and restarting) its VMs, and reports again on a
/// later round, since cluster state still shows the old phase.
async fn report(service: &NodeService, vm: &Vm, phase: Phase, reason: Option<String>) {
    if vm.phase == phase && vm.reason == reason {
        return;
    }
    let command = Command::ReportVm {
        key: vm.id(),
        node: service.node.id(),
        generation: vm.generation,
        phase,
        reason: reason.clone(),
        now_ms: now_ms(),
    };
    match tokio::time::timeout(REPORT_TIMEOUT, service.propose(command)).await {
        Ok(Ok(_)) => service
            .audit
            .record_vm(&vm.id(), &phase.to_string(), reason.as_deref()),
        Ok(Err(e)) => tracing::debug!(vm = %vm.id(), %phase, "report not recorded: {e}"),
        Err(_) => tracing::debug!(vm = %vm.id(), %phase, "report timed out"),
    }
}

/// Converges one VM assigned to this host.
async fn step(service: &Arc<NodeService>, name: &str, vm: &Vm) -> Result<(), String> {
    let sup = &service.vms.supervisor;
    let dir = service
        .vms
        .state_dir(name)
        .ok_or_else(|| format!("invalid VM name {name}"))?;
    let mut record = read_record(&dir);
    let state = sup.state(name).map_err(|e| e.to_string())?;
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
    let now = now_ms();
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
                let phase = running_phase(service, name, vm, record.as_ref());
                report(service, vm, phase, None).await;
                Ok(())
            } else if !want.running && !matches!(vm.phase, Phase::Stopped | Phase::Failed) {
                report(service, vm, Phase::Stopped, None).await;
                Ok(())
            } else {
                Ok(())
            }
        }
        Action::Stop => {
            report(service, vm, Phase::Stopping, None).await;
            if let Some(r) = record.as_mut() {
                r.stopped = true;
                write_record(&dir, r);
            }
            stop_local(service, name).await?;
            report(service, vm, Phase::Stopped, None).await;
            Ok(())
        }
        Action::Restart => {
            report(
                service,
                vm,
                Phase::Stopping,
                Some("restart requested".into()),
            )
            .await;
            stop_local(service, name).await?;
            start(service, name, &dir, vm, record, false).await
        }
        Action::Start => start(service, name, &dir, vm, record, true).await,
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
                last_lines(service, name, record.as_ref())
            );
            // One report per exit, not one per second of backoff. A clean exit (under
            // `--restart always`) is stopped, not failed.
            let phase = if clean { Phase::Stopped } else { Phase::Failed };
            if !matches!(vm.phase, Phase::Failed | Phase::Stopped) {
                report(service, vm, phase, Some(why)).await;
            }
            Ok(())
        }
        Action::Down { failed } => {
            let code = match state {
                VmState::Exited { code } => exit_text(code),
                _ => String::new(),
            };
            if failed {
                let why = format!("{code}{}", last_lines(service, name, record.as_ref()));
                report(service, vm, Phase::Failed, Some(why)).await;
                Ok(())
            } else {
                report(service, vm, Phase::Stopped, Some(code)).await;
                Ok(())
            }
        }
    }
}

fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited with code {c}"),
        None => "killed by a signal (or exited while the daemon was down)".into(),
    }
}

/// This run's console output (since `record.console_from`).
fn this_run(service: &NodeService, name: &str, record: Option<&Record>, lines: u32) -> Vec<String> {
    let Ok(path) = service.vms.supervisor.console_path(name) else {
        return Vec::new();
    };
    // This run's output, at most its last [`crate::vms::MAX_LOG_BYTES`].
    let len = std::fs::metadata(&path).map_or(0, |m| m.len());
    let from = record
        .map_or(0, |r| r.console_from)
        .max(len.saturating_sub(crate::vms::MAX_LOG_BYTES));
    let text = crate::vms::read_console(&path, lines, Some(from))
        .map(|(t, _)| t)
        .unwrap_or_default();
    let all: Vec<String> = text.lines().map(str::to_string).collect();
    all[all.len().saturating_sub(lines as usize)..].to_vec()
}

/// This run's last console lines, for a failure reason.
fn last_lines(service: &NodeService, name: &str, record: Option<&Record>) -> String {
    let lines = this_run(service, name, record, FAILURE_LINES as u32);
    if lines.is_empty() {
        String::new()
    } else {
        format!("; console: {}", lines.join(" | "))
    }
}

/// Starting until the runner has stayed up for [`SETTLE`]; then running, or ready once
/// the guest printed the VM's ready marker.
fn running_phase(service: &NodeService, name: &str, vm: &Vm, record: Option<&Record>) -> Phase {
    if vm.phase == Phase::Ready {
        return Phase::Ready;
    }
    if let Some(marker) = &vm.spec.ready_marker {
        let seen = this_run(service, name, record, u32::MAX)
            .iter()
            .any(|l| l.contains(marker.as_str()));
        if seen {
            return Phase::Ready;
        }
    }
    let age = now_ms().saturating_sub(record.map_or(0, |r| r.started_at_ms));
    if Duration::from_millis(age) < SETTLE {
        Phase::Starting
    } else {
        Phase::Running
    }
}

/// Starts the VM's runner, fetching its image first when it is not here.
async fn start(
    service: &Arc<NodeService>,
    name: &str,
    dir: &Path,
    vm: &Vm,
    record: Option<Record>,
    after_exit: bool,
) -> Result<(), String> {
    let Some(image) = service.node.state().image(&vm.spec.image).cloned() else {
        {
            report(
                service,
                vm,
                Phase::Failed,
                Some(format!("image {} is gone", vm.spec.image)),
            )
            .await;
            return Ok(());
        }
    };
    if image.manifest != vm.manifest {
        let why = format!(
            "image {} now names another closure than the VM was created with",
            image.name
        );
        {
            report(service, vm, Phase::Failed, Some(why)).await;
            return Ok(());
        }
    }
    let base = image
        .root
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let runner_dir = service.vms.runner_store.join(&base);
    if !runner_dir.exists() {
        fetch_in_background(service, vm, &image).await?;
        return Ok(());
    }
    let runner = match Runner::new(&runner_dir) {
        Ok(r) => r,
        Err(e) => {
            report(service, vm, Phase::Failed, Some(e.to_string())).await;
            return Ok(());
        }
    };
    let same_run = record.filter(|r| r.generation == vm.generation);
    let failures = match same_run {
        Some(r) if after_exit && !r.stopped && r.restarts >= vm.restarts => {
            let ran = now_ms().saturating_sub(r.started_at_ms);
            if Duration::from_millis(ran) >= reconcile::STABLE_RUN {
                0
            } else {
                r.failures.saturating_add(1)
            }
        }
        _ => 0,
    };
    let console_from = service
        .vms
        .supervisor
        .console_path(name)
        .ok()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    // Taps and cgroups run commands and may retry: off the async workers.
    let (me, name2, vm2) = (service.clone(), name.to_string(), vm.clone());
    let started = tokio::task::spawn_blocking(move || me.vms.start(&name2, &runner, &vm2))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = started {
        {
            report(service, vm, Phase::Failed, Some(e)).await;
            return Ok(());
        }
    }
    write_record(
        dir,
        &Record {
            generation: vm.generation,
            restarts: vm.restarts,
            failures,
            started_at_ms: now_ms(),
            exited_at_ms: None,
            stopped: false,
            console_from,
        },
    );
    // Reported after the exec, so the report's commit is not on the start's path; the
    // reconciler promotes it to running once it has settled.
    report(service, vm, Phase::Starting, None).await;
    let (me, hook) = (service.clone(), hook_vm(&vm.spec, vm.node));
    tokio::spawn(async move { me.vms.hooks.after_vm_start(&hook).await });
    Ok(())
}

async fn fetch_in_background(
    service: &Arc<NodeService>,
    vm: &Vm,
    image: &blixard_core::Image,
) -> Result<(), String> {
    let name = Vms::local_name(vm);
    let fresh = service
        .vms
        .fetching
        .lock()
        .map(|mut f| f.insert(name.clone()))
        .unwrap_or(false);
    if !fresh {
        return Ok(());
    }
    // A retry keeps the last failure's reason until it succeeds.
    if vm.phase != Phase::Fetching {
        report(service, vm, Phase::Fetching, None).await;
    }
    let me = service.clone();
    let (vm, image) = (vm.clone(), image.clone());
    tokio::spawn(async move {
        let result = me.pull_here(&image, ProgressSink::none()).await;
        if let Err(e) = result {
            tracing::warn!(vm = %name, "fetching image {}: {e}", image.name);
            let current = me.node.state().vm(&vm.id()).cloned();
            if let Some(current) = current.filter(|c| c.generation == vm.generation) {
                let why = format!("fetching image {}: {e}; retrying", image.name);
                report(&me, &current, Phase::Fetching, Some(why)).await;
            }
            tokio::time::sleep(FETCH_RETRY).await;
        }
        if let Ok(mut f) = me.vms.fetching.lock() {
            f.remove(&name);
        }
        me.vms.wake.notify_one();
    });
    Ok(())
}
