//! The host's loops: the reconciler (what runs here follows what cluster state assigns
//! here: start, adopt, stop, restart per policy, report) and the fence (no leader for too
//! long: stop every VM, so a partitioned host never runs a VM the leader has moved).
//! Each wakes when this node applies a new raft entry, and at least once a second.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_core::{Command, Desired, Phase, RestartPolicy, Vm};
use blixard_host::reconcile::{self, Action, Observed, Record, Restart, Want};
use blixard_host::{Runner, VmState};
use blixard_net::api::ProgressSink;

use super::{hook_vm, next_change, Loops, Vms, Wake, IDLE};
use crate::cluster::now_ms;

/// A runner counts as running (not starting) once it has stayed up this long.
const SETTLE: Duration = Duration::from_secs(1);
/// How long a failed image fetch waits before the next try.
const FETCH_RETRY: Duration = Duration::from_secs(5);
/// The console lines a failure report carries.
const FAILURE_LINES: usize = 5;

/// Tracks whether this node can see a leader; fences (stops every VM) when it has not
/// for the fence timeout.
struct Fence {
    last_contact: Instant,
    fenced: bool,
    /// This node's state has caught up with the leader since it started or was fenced.
    synced: bool,
}

/// The reconciler: runs on every node.
pub async fn reconciler(ctx: Arc<Loops>) {
    let mut applied = ctx.cluster.node.applied();
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
        let wake = next_change(&mut applied, &ctx.vms.wake, IDLE).await;
        if wake == Wake::Stopped {
            break;
        }
        let has_leader = ctx.cluster.node.leader().is_some();
        if has_leader {
            fence.last_contact = Instant::now();
            if !fence.synced {
                // After a start or a fence this node's state may be behind (its VMs may
                // have moved meanwhile): act only once it has caught up with the leader.
                match tokio::time::timeout(REPORT_TIMEOUT, ctx.cluster.barrier(false)).await {
                    Ok(Ok(())) => fence.synced = true,
                    _ => continue,
                }
            }
            if fence.fenced {
                tracing::warn!("in contact with a leader again; resuming VMs");
                fence.fenced = false;
            }
        } else if fence.last_contact.elapsed() >= ctx.vms.fence_after {
            if !fence.fenced {
                tracing::warn!(
                    "no leader for {:?}: fencing (stopping every VM on this host)",
                    ctx.vms.fence_after
                );
                fence.fenced = true;
                fence.synced = false;
            }
            fence_round(&ctx).await;
            continue;
        } else if !fence.synced {
            // Started without a leader: nothing to act on yet (running VMs run on).
            continue;
        }
        // A new entry: only the VMs it changed (the start path of a new VM stays short).
        // Otherwise, and at least once a second, all of them (exits, backoffs, settling).
        let quick = wake == Wake::Applied && swept.elapsed() < IDLE;
        if !quick || !reconcile_round(&ctx, true, &mut seen).await {
            reconcile_round(&ctx, false, &mut seen).await;
            swept = Instant::now();
        }
        if trimmed.elapsed() > Duration::from_secs(10) {
            trimmed = Instant::now();
            for (name, _) in ctx.vms.supervisor.running() {
                let _ = ctx.vms.supervisor.trim_console(&name);
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

async fn stop_local(ctx: &Loops, name: &str) -> Result<(), String> {
    let supervisor = ctx.vms.supervisor.clone();
    let name2 = name.to_string();
    let timeout = ctx.vms.stop_timeout;
    tokio::task::spawn_blocking(move || supervisor.stop(&name2, timeout))
        .await
        .map_err(|e| e.to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Stops every VM here, all at once: the timing rule gives the whole fence one stop
/// timeout, not one per VM.
async fn fence_round(ctx: &Arc<Loops>) {
    let mut stops = tokio::task::JoinSet::new();
    for (name, _) in ctx.vms.supervisor.running() {
        tracing::warn!(vm = %name, "fenced: stopping");
        if let Some(dir) = ctx.vms.state_dir(&name) {
            if let Some(mut r) = read_record(&dir) {
                r.stopped = true;
                write_record(&dir, &r);
            }
        }
        let me = ctx.clone();
        stops.spawn(async move {
            if let Err(e) = stop_local(&me, &name).await {
                tracing::error!(vm = %name, "cannot stop a fenced VM: {e}");
            }
        });
    }
    while stops.join_next().await.is_some() {}
}

/// The VMs assigned to this host, by supervisor name.
fn mine_now(ctx: &Loops) -> HashMap<String, Vm> {
    let me = ctx.cluster.node.id();
    ctx.cluster
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
async fn reconcile_round(ctx: &Arc<Loops>, quick: bool, seen: &mut HashMap<String, Vm>) -> bool {
    if quick {
        let mine = mine_now(ctx);
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
        step_all(ctx, changed).await;
        return true;
    }
    let me = ctx.cluster.node.id();
    let (mine, known): (BTreeMap<String, Vm>, std::collections::BTreeSet<String>) = {
        let state = ctx.cluster.node.state();
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
    for (name, _) in ctx.vms.supervisor.running() {
        if mine.contains_key(&name) {
            continue;
        }
        tracing::info!(vm = %name, "not assigned here any more; stopping");
        if let Err(e) = stop_local(ctx, &name).await {
            tracing::error!(vm = %name, "cannot stop: {e}");
            still_running.insert(name);
        }
    }
    // State dirs of deleted VMs go (once their runner stopped above).
    for name in ctx.vms.local_dirs() {
        let gone = Vms::key_of_local(&name).is_none_or(|k| !known.contains(&k));
        if gone && !still_running.contains(&name) {
            if let Some(dir) = ctx.vms.state_dir(&name) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    // Exactly what this round stepped: a VM applied meanwhile is new to the next round.
    *seen = mine.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    step_all(ctx, mine.into_iter().collect()).await;
    true
}

/// Steps VMs side by side (each touches only its own state dir and runner), so one VM's
/// report or stop does not hold up another's start; returns when all are done.
async fn step_all(ctx: &Arc<Loops>, vms: Vec<(String, Vm)>) {
    let mut steps = tokio::task::JoinSet::new();
    for (name, vm) in vms {
        let me = ctx.clone();
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
async fn report(ctx: &Loops, vm: &Vm, phase: Phase, reason: Option<String>) {
    if vm.phase == phase && vm.reason == reason {
        return;
    }
    let command = Command::ReportVm {
        key: vm.id(),
        node: ctx.cluster.node.id(),
        generation: vm.generation,
        phase,
        reason: reason.clone(),
        now_ms: now_ms(),
    };
    match tokio::time::timeout(REPORT_TIMEOUT, ctx.cluster.propose(command)).await {
        Ok(Ok(_)) => ctx
            .audit
            .record_vm(&vm.id(), &phase.to_string(), reason.as_deref()),
        Ok(Err(e)) => tracing::debug!(vm = %vm.id(), %phase, "report not recorded: {e}"),
        Err(_) => tracing::debug!(vm = %vm.id(), %phase, "report timed out"),
    }
}

/// Converges one VM assigned to this host.
async fn step(ctx: &Arc<Loops>, name: &str, vm: &Vm) -> Result<(), String> {
    let sup = &ctx.vms.supervisor;
    let dir = ctx
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
                let phase = running_phase(ctx, name, vm, record.as_ref());
                report(ctx, vm, phase, None).await;
                Ok(())
            } else if !want.running && !matches!(vm.phase, Phase::Stopped | Phase::Failed) {
                report(ctx, vm, Phase::Stopped, None).await;
                Ok(())
            } else {
                Ok(())
            }
        }
        Action::Stop => {
            report(ctx, vm, Phase::Stopping, None).await;
            if let Some(r) = record.as_mut() {
                r.stopped = true;
                write_record(&dir, r);
            }
            stop_local(ctx, name).await?;
            report(ctx, vm, Phase::Stopped, None).await;
            Ok(())
        }
        Action::Restart => {
            report(ctx, vm, Phase::Stopping, Some("restart requested".into())).await;
            stop_local(ctx, name).await?;
            start(ctx, name, &dir, vm, record, false).await
        }
        Action::Start => start(ctx, name, &dir, vm, record, true).await,
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
                last_lines(ctx, name, record.as_ref())
            );
            // One report per exit, not one per second of backoff. A clean exit (under
            // `--restart always`) is stopped, not failed.
            let phase = if clean { Phase::Stopped } else { Phase::Failed };
            if !matches!(vm.phase, Phase::Failed | Phase::Stopped) {
                report(ctx, vm, phase, Some(why)).await;
            }
            Ok(())
        }
        Action::Down { failed } => {
            let code = match state {
                VmState::Exited { code } => exit_text(code),
                _ => String::new(),
            };
            if failed {
                let why = format!("{code}{}", last_lines(ctx, name, record.as_ref()));
                report(ctx, vm, Phase::Failed, Some(why)).await;
                Ok(())
            } else {
                report(ctx, vm, Phase::Stopped, Some(code)).await;
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
fn this_run(ctx: &Loops, name: &str, record: Option<&Record>, lines: u32) -> Vec<String> {
    let Ok(path) = ctx.vms.supervisor.console_path(name) else {
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
fn last_lines(ctx: &Loops, name: &str, record: Option<&Record>) -> String {
    let lines = this_run(ctx, name, record, FAILURE_LINES as u32);
    if lines.is_empty() {
        String::new()
    } else {
        format!("; console: {}", lines.join(" | "))
    }
}

/// Starting until the runner has stayed up for [`SETTLE`]; then running, or ready once
/// the guest printed the VM's ready marker.
fn running_phase(ctx: &Loops, name: &str, vm: &Vm, record: Option<&Record>) -> Phase {
    if vm.phase == Phase::Ready {
        return Phase::Ready;
    }
    if let Some(marker) = &vm.spec.ready_marker {
        let seen = this_run(ctx, name, record, u32::MAX)
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
    ctx: &Arc<Loops>,
    name: &str,
    dir: &Path,
    vm: &Vm,
    record: Option<Record>,
    after_exit: bool,
) -> Result<(), String> {
    let Some(image) = ctx.cluster.node.state().image(&vm.spec.image).cloned() else {
        {
            report(
                ctx,
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
            report(ctx, vm, Phase::Failed, Some(why)).await;
            return Ok(());
        }
    }
    let base = image
        .root
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let runner_dir = ctx.vms.runner_store.join(&base);
    if !runner_dir.exists() {
        fetch_in_background(ctx, vm, &image).await?;
        return Ok(());
    }
    let runner = match Runner::new(&runner_dir) {
        Ok(r) => r,
        Err(e) => {
            report(ctx, vm, Phase::Failed, Some(e.to_string())).await;
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
    let console_from = ctx
        .vms
        .supervisor
        .console_path(name)
        .ok()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    // Taps and cgroups run commands and may retry: off the async workers.
    let (me, name2, vm2) = (ctx.clone(), name.to_string(), vm.clone());
    let started = tokio::task::spawn_blocking(move || me.vms.start(&name2, &runner, &vm2))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = started {
        {
            report(ctx, vm, Phase::Failed, Some(e)).await;
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
    report(ctx, vm, Phase::Starting, None).await;
    let (me, hook) = (ctx.clone(), hook_vm(&vm.spec, vm.node));
    tokio::spawn(async move { me.vms.hooks.after_vm_start(&hook).await });
    Ok(())
}

async fn fetch_in_background(
    ctx: &Arc<Loops>,
    vm: &Vm,
    image: &blixard_core::Image,
) -> Result<(), String> {
    let name = Vms::local_name(vm);
    let fresh = ctx
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
        report(ctx, vm, Phase::Fetching, None).await;
    }
    let me = ctx.clone();
    let (vm, image) = (vm.clone(), image.clone());
    tokio::spawn(async move {
        let result = me.images.pull_here(&image, ProgressSink::none()).await;
        if let Err(e) = result {
            tracing::warn!(vm = %name, "fetching image {}: {e}", image.name);
            let current = me.cluster.node.state().vm(&vm.id()).cloned();
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
