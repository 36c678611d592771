//! The host agent's decisions, driven with fakes of the cluster and the supervisor: no
//! processes, no raft, a clock the test moves. Each case sets up what the cluster wants,
//! what the supervisor sees and what the host last did, runs a step or a round, and
//! checks what the agent did (starts, stops, reports, its record).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_core::{BlobHash, Desired, Image, NodeId, Phase, RestartPolicy, Vm, VmSpec};
use blixard_host::agent::{local_name, Agent, AgentConfig, Cluster, Round, SETTLE};
use blixard_host::reconcile::Record;
use blixard_host::{HostError, Limits, Runner, Supervisor, VmDir, VmState};

const ME: NodeId = NodeId(2);
const T0: u64 = 1_000_000;

/// What the agent told the cluster.
#[derive(Clone, Debug, PartialEq)]
struct Report {
    vm: String,
    phase: Phase,
    reason: Option<String>,
}

/// Cluster state as the agent sees it, and what it reported.
struct FakeCluster {
    now: AtomicU64,
    vms: Mutex<BTreeMap<String, Vm>>,
    images: Mutex<HashMap<String, Image>>,
    leader: AtomicBool,
    syncs: AtomicBool,
    reports: Mutex<Vec<Report>>,
    runners: PathBuf,
    /// A fetch makes the image's runner (a runner that prints `fetched`).
    fetches: Mutex<Vec<String>>,
    fetch_fails: AtomicBool,
    after_starts: Mutex<Vec<String>>,
    /// The after-start hooks never finish (a hung hook).
    hooks_hang: AtomicBool,
}

impl FakeCluster {
    fn new(runners: &Path) -> Self {
        Self {
            now: AtomicU64::new(T0),
            vms: Mutex::new(BTreeMap::new()),
            images: Mutex::new(HashMap::new()),
            leader: AtomicBool::new(true),
            syncs: AtomicBool::new(true),
            reports: Mutex::new(Vec::new()),
            runners: runners.to_owned(),
            fetches: Mutex::new(Vec::new()),
            fetch_fails: AtomicBool::new(false),
            after_starts: Mutex::new(Vec::new()),
            hooks_hang: AtomicBool::new(false),
        }
    }

    fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    fn reports(&self) -> Vec<Report> {
        std::mem::take(&mut *self.reports.lock().unwrap())
    }

    fn put(&self, vm: Vm) {
        self.vms.lock().unwrap().insert(vm.id(), vm);
    }

    fn get(&self, key: &str) -> Vm {
        self.vms.lock().unwrap()[key].clone()
    }
}

impl Cluster for FakeCluster {
    fn now_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
    fn assigned(&self) -> BTreeMap<String, Vm> {
        self.vms
            .lock()
            .unwrap()
            .values()
            .filter(|v| v.node == Some(ME))
            .map(|v| (local_name(v), v.clone()))
            .collect()
    }
    fn known(&self) -> BTreeSet<String> {
        self.vms.lock().unwrap().keys().cloned().collect()
    }
    fn vm(&self, key: &str) -> Option<Vm> {
        self.vms.lock().unwrap().get(key).cloned()
    }
    fn image(&self, name: &str) -> Option<Image> {
        self.images.lock().unwrap().get(name).cloned()
    }
    fn has_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }
    async fn sync(&self) -> bool {
        self.syncs.load(Ordering::SeqCst)
    }
    async fn report(&self, vm: &Vm, phase: Phase, reason: Option<String>) {
        // The cluster records it: the next step sees the VM in that phase.
        if let Some(v) = self.vms.lock().unwrap().get_mut(&vm.id()) {
            v.phase = phase;
            v.reason = reason.clone();
        }
        self.reports.lock().unwrap().push(Report {
            vm: vm.id(),
            phase,
            reason,
        });
    }
    fn runner_dir(&self, image: &Image) -> PathBuf {
        self.runners.join(&image.name)
    }
    type FetchError = std::io::Error;
    async fn fetch(&self, image: &Image) -> Result<(), std::io::Error> {
        self.fetches.lock().unwrap().push(image.name.clone());
        if self.fetch_fails.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("no holder answered"));
        }
        runner(&self.runners, &image.name);
        Ok(())
    }
    async fn after_start(&self, vm: &Vm) {
        self.after_starts.lock().unwrap().push(vm.id());
        if self.hooks_hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

/// A supervisor that only remembers: what runs, what exited with which code.
#[derive(Debug)]
struct FakeSupervisor {
    root: PathBuf,
    states: Mutex<HashMap<String, VmState>>,
    starts: Mutex<Vec<(String, PathBuf, u32)>>,
    stops: Mutex<Vec<String>>,
    start_fails: AtomicBool,
}

impl FakeSupervisor {
    fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            states: Mutex::new(HashMap::new()),
            starts: Mutex::new(Vec::new()),
            stops: Mutex::new(Vec::new()),
            start_fails: AtomicBool::new(false),
        }
    }
    fn set(&self, name: &str, state: VmState) {
        self.states.lock().unwrap().insert(name.into(), state);
    }
    fn starts(&self) -> Vec<String> {
        std::mem::take(&mut *self.starts.lock().unwrap())
            .into_iter()
            .map(|(n, _, _)| n)
            .collect()
    }
    fn stops(&self) -> Vec<String> {
        std::mem::take(&mut *self.stops.lock().unwrap())
    }
}

impl Supervisor for FakeSupervisor {
    fn dir(&self, name: &str) -> Result<VmDir, HostError> {
        VmDir::in_root(&self.root, name)
    }
    fn start_with(
        &self,
        name: &str,
        runner: &Runner,
        limits: Option<&Limits>,
    ) -> Result<u32, HostError> {
        if self.start_fails.load(Ordering::SeqCst) {
            return Err(HostError::Runner(runner.dir.clone(), "no such tap".into()));
        }
        let dir = self.dir(name)?;
        dir.create()?;
        dir.link_current(runner)?;
        dir.link_booted(runner)?;
        self.starts.lock().unwrap().push((
            name.into(),
            runner.dir.clone(),
            limits.map_or(0, |l| l.vcpus),
        ));
        self.set(name, VmState::Running { pid: 4242 });
        Ok(4242)
    }
    fn state(&self, name: &str) -> Result<VmState, HostError> {
        Ok(self
            .states
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or(VmState::Absent))
    }
    fn running(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = self
            .states
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(n, s)| match s {
                VmState::Running { pid } => Some((n.clone(), *pid)),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }
    fn local_dirs(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect()
    }
    fn stop(&self, name: &str, _timeout: Duration) -> Result<VmState, HostError> {
        self.stops.lock().unwrap().push(name.into());
        let exited = VmState::Exited { code: None };
        self.set(name, exited.clone());
        Ok(exited)
    }
    fn trim_console(&self, _name: &str) -> Result<(), HostError> {
        Ok(())
    }
}

/// Waits (on the test's runtime, so spawned tasks go on) until `ready` holds.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A runner dir named `name` under `root`.
fn runner(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let run = dir.join("bin/microvm-run");
    std::fs::write(&run, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    dir
}

fn image(name: &str) -> Image {
    Image {
        name: name.into(),
        manifest: BlobHash([7; 32]),
        root: format!("/nix/store/00000000000000000000000000000000-{name}"),
        store_dir: "/nix/store".into(),
        nar_count: 1,
        nar_size: 1,
        holders: [NodeId(1)].into(),
        pinned: false,
        tenant: None,
        created_at_ms: 0,
    }
}

fn vm(name: &str, restart: RestartPolicy) -> Vm {
    let spec = VmSpec {
        name: name.into(),
        tenant: "default".into(),
        image: "web".into(),
        vcpus: 2,
        memory_mib: 128,
        labels: BTreeMap::new(),
        constraints: BTreeMap::new(),
        anti_affinity: None,
        restart,
        ready_marker: None,
    };
    Vm {
        spec,
        manifest: BlobHash([7; 32]),
        desired: Desired::Running,
        node: Some(ME),
        generation: 3,
        phase: Phase::Scheduled,
        reason: None,
        restarts: 0,
        history: Vec::new(),
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

/// A host: the fakes, the agent, and the temp dirs they live in.
struct Host {
    cluster: Arc<FakeCluster>,
    sup: Arc<FakeSupervisor>,
    agent: Arc<Agent<FakeCluster>>,
    root: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let (states, runners) = (root.path().join("vms"), root.path().join("store"));
        std::fs::create_dir_all(&states).unwrap();
        std::fs::create_dir_all(&runners).unwrap();
        let cluster = Arc::new(FakeCluster::new(&runners));
        cluster
            .images
            .lock()
            .unwrap()
            .insert("web".into(), image("web"));
        let sup = Arc::new(FakeSupervisor::new(&states));
        let config = AgentConfig {
            fence_after: Duration::from_secs(15),
            stop_timeout: Duration::from_secs(1),
        };
        let agent = Arc::new(Agent::new(cluster.clone(), sup.clone(), config));
        Self {
            cluster,
            sup,
            agent,
            root,
        }
    }

    fn runner_here(&self) {
        runner(&self.root.path().join("store"), "web");
    }

    fn dir(&self, name: &str) -> VmDir {
        self.sup.dir(name).unwrap()
    }

    /// Steps VM `key` as cluster state has it now.
    async fn step(&self, key: &str) {
        let v = self.cluster.get(key);
        self.agent.step(&local_name(&v), &v).await.unwrap();
    }

    fn phases(&self) -> Vec<(Phase, String)> {
        self.cluster
            .reports()
            .into_iter()
            .map(|r| (r.phase, r.reason.unwrap_or_default()))
            .collect()
    }
}

fn ran(generation: u64, started_at_ms: u64) -> Record {
    Record {
        generation,
        started_at_ms,
        ..Record::default()
    }
}

/// One step from one situation. `exited`: the supervisor's state; `record`: what the host
/// last did; what must follow: starts, stops, reports (phase and a piece of the reason).
struct Case {
    name: &'static str,
    restart: RestartPolicy,
    desired: Desired,
    observed: VmState,
    record: Option<Record>,
    runner_here: bool,
    image: Option<Image>,
    starts: usize,
    stops: usize,
    reports: &'static [(Phase, &'static str)],
}

#[tokio::test]
async fn one_step_from_each_situation() {
    let web = image("web");
    let mut other_closure = image("web");
    other_closure.manifest = BlobHash([8; 32]);
    let running = VmState::Running { pid: 4242 };
    let crashed = VmState::Exited { code: Some(1) };
    let clean = VmState::Exited { code: Some(0) };
    use Phase::*;
    let cases = [
        Case {
            name: "a new placement starts",
            restart: RestartPolicy::OnFailure,
            desired: Desired::Running,
            observed: VmState::Absent,
            record: None,
            runner_here: true,
            image: Some(web.clone()),
            starts: 1,
            stops: 0,
            reports: &[(Starting, "")],
        },
        Case {
            name: "a runner not here is fetched first",
            restart: RestartPolicy::OnFailure,
            desired: Desired::Running,
            observed: VmState::Absent,
            record: None,
            runner_here: false,
            image: Some(web.clone()),
            starts: 0,
            stops: 0,
            reports: &[(Fetching, "")],
        },
        Case {
            name: "an image gone fails the VM",
            restart: RestartPolicy::OnFailure,
            desired: Desired::Running,
            observed: VmState::Absent,
            record: None,
            runner_here: true,
            image: None,
            starts: 0,
            stops: 0,
            reports: &[(Failed, "image web is gone")],
        },
        Case {
            name: "an image naming another closure fails the VM",
            restart: RestartPolicy::OnFailure,
            desired: Desired::Running,
            observed: VmState::Absent,
            record: None,
            runner_here: true,
            image: Some(other_closure),
            starts: 0,
            stops: 0,
            reports: &[(Failed, "another closure")],
        },
        Case {
            name: "a running VM that settled is running",
            restart: RestartPolicy::OnFailure,
            desired: Desired::Running,
            observed: running.clone(),
            record: Some(ran(3, T0 - 5_000)),
            runner_here: true,
            image: Some(web.clone()),
            starts: 0,
            stops: 0,
            reports: &[(Running, "")],
        },
        Case {
            name: "a runner up for less than a second is starting",
            restart: RestartPolicy::OnFailure,
            desired: Desired::Running,
            observed: running.clone(),
            record: Some(ran(3, T0 - 100)),
            runner_here: true,
            image: Some(web.clone()),
            starts: 0,
            stops: 0,
            reports: &[(Starting, "")],
        },
        Case {
            name: "a runner found without a record is adopted",
            restart: RestartPolicy::OnFailure,
            desired: Desired::Running,
            observed: running.clone(),
            record: None,
            runner_here: true,
            image: Some(web.clone()),
            starts: 0,
            stops: 0,
            reports: &[(Running, "")],
        },
        Case {
            name: "a crash under on-failure backs off",
            restart: RestartPolicy::OnFailure,
            desired: Desired::Running,
            observed: crashed.clone(),
            record: Some(ran(3, T0 - 100)),
            runner_here: true,
            image: Some(web.clone()),
            starts: 0,
            stops: 0,
            reports: &[(Failed, "exited with code 1; restarting in 1s (attempt 1)")],
        },
        Case {
            name: "a clean exit under always backs off as stopped",
            restart: RestartPolicy::Always,
            desired: Desired::Running,
            observed: clean.clone(),
            record: Some(ran(3, T0 - 100)),
            runner_here: true,
            image: Some(web.clone()),
            starts: 0,
            stops: 0,
            reports: &[(Stopped, "exited with code 0; restarting in 1s")],
        },
        Case {
            name: "a clean exit under on-failure stays down",
            restart: RestartPolicy::OnFailure,
            desired: Desired::Running,
            observed: clean.clone(),
            record: Some(ran(3, T0 - 100)),
            runner_here: true,
            image: Some(web.clone()),
            starts: 0,
            stops: 0,
            reports: &[(Stopped, "exited with code 0")],
        },
        Case {
            name: "a crash under never fails the VM",
            restart: RestartPolicy::Never,
            desired: Desired::Running,
            observed: crashed.clone(),
            record: Some(ran(3, T0 - 100)),
            runner_here: true,
            image: Some(web.clone()),
            starts: 0,
            stops: 0,
            reports: &[(Failed, "exited with code 1")],
        },
        Case {
            name: "an exit left from an earlier placement starts the new one",
            restart: RestartPolicy::Never,
            desired: Desired::Running,
            observed: crashed.clone(),
            record: Some(ran(2, T0 - 100)),
            runner_here: true,
            image: Some(web.clone()),
            starts: 1,
            stops: 0,
            reports: &[(Starting, "")],
        },
        Case {
            name: "a stop request stops it",
            restart: RestartPolicy::Always,
            desired: Desired::Stopped,
            observed: running.clone(),
            record: Some(ran(3, T0 - 5_000)),
            runner_here: true,
            image: Some(web.clone()),
            starts: 0,
            stops: 1,
            reports: &[(Stopping, ""), (Stopped, "")],
        },
        Case {
            name: "a stopped VM that stays stopped is reported once",
            restart: RestartPolicy::Always,
            desired: Desired::Stopped,
            observed: VmState::Absent,
            record: None,
            runner_here: true,
            image: Some(web.clone()),
            starts: 0,
            stops: 0,
            reports: &[(Stopped, "")],
        },
    ];
    for c in cases {
        let host = Host::new();
        if c.runner_here {
            host.runner_here();
        }
        {
            let mut images = host.cluster.images.lock().unwrap();
            images.clear();
            if let Some(i) = c.image.clone() {
                images.insert("web".into(), i);
            }
        }
        let mut v = vm("web", c.restart);
        v.desired = c.desired;
        host.cluster.put(v.clone());
        let name = local_name(&v);
        host.sup.set(&name, c.observed.clone());
        if let Some(r) = c.record {
            host.dir(&name).write_record(&r).unwrap();
        }
        host.step("default/web").await;
        assert_eq!(host.sup.starts().len(), c.starts, "{}: starts", c.name);
        assert_eq!(host.sup.stops().len(), c.stops, "{}: stops", c.name);
        let got = host.phases();
        assert_eq!(got.len(), c.reports.len(), "{}: reports {got:?}", c.name);
        for ((phase, reason), (want_phase, want)) in got.iter().zip(c.reports) {
            assert_eq!(phase, want_phase, "{}: {got:?}", c.name);
            assert!(
                reason.contains(want),
                "{}: {reason:?} lacks {want:?}",
                c.name
            );
        }
    }
}

#[tokio::test]
async fn a_started_vm_gets_its_record_limits_and_after_start_hooks() {
    let host = Host::new();
    host.runner_here();
    host.cluster.put(vm("web", RestartPolicy::Always));
    host.step("default/web").await;
    let (name, runner, vcpus) = host.sup.starts.lock().unwrap()[0].clone();
    assert_eq!(name, "default@web");
    assert!(runner.ends_with("store/web"));
    assert_eq!(vcpus, 2);
    let r = host.dir("default@web").record().unwrap();
    assert_eq!((r.generation, r.failures, r.started_at_ms), (3, 0, T0));
    // The hooks run in a task of their own, after the start.
    until("the after-start hook", || {
        host.cluster.after_starts.lock().unwrap().as_slice() == ["default/web"]
    })
    .await;
}

#[tokio::test]
async fn a_crashing_runner_is_restarted_after_a_growing_backoff_and_says_why() {
    let host = Host::new();
    host.runner_here();
    host.cluster.put(vm("web", RestartPolicy::OnFailure));
    host.step("default/web").await;
    assert_eq!(host.sup.starts(), ["default@web"]);
    host.phases();
    // It prints, then crashes 100 ms after its start.
    let dir = host.dir("default@web");
    std::fs::write(dir.console(), "booting\nkernel panic\n").unwrap();
    host.cluster.advance(Duration::from_millis(100));
    host.sup
        .set("default@web", VmState::Exited { code: Some(1) });
    host.step("default/web").await;
    let got = host.phases();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, Phase::Failed);
    assert!(
        got[0]
            .1
            .contains("restarting in 1s (attempt 1); console: booting | kernel panic"),
        "{got:?}"
    );
    // Within the backoff nothing happens, and the failure is not reported again.
    host.cluster.advance(Duration::from_millis(500));
    host.step("default/web").await;
    assert!(host.sup.starts().is_empty());
    assert!(host.phases().is_empty());
    // After it: started again, one failure in a row counted.
    host.cluster.advance(Duration::from_millis(600));
    host.step("default/web").await;
    assert_eq!(host.sup.starts(), ["default@web"]);
    assert_eq!(host.dir("default@web").record().unwrap().failures, 1);
    // A second quick crash waits twice as long.
    host.phases();
    host.cluster.advance(Duration::from_millis(100));
    host.sup
        .set("default@web", VmState::Exited { code: Some(1) });
    host.step("default/web").await;
    assert!(host.phases()[0].1.contains("restarting in 2s (attempt 2)"));
}

#[tokio::test]
async fn a_restart_request_restarts_a_running_vm_once() {
    let host = Host::new();
    host.runner_here();
    let mut v = vm("web", RestartPolicy::Always);
    host.cluster.put(v.clone());
    host.step("default/web").await;
    host.sup.starts();
    host.phases();
    v.restarts = 1;
    v.phase = Phase::Running;
    host.cluster.put(v);
    host.step("default/web").await;
    assert_eq!(host.sup.stops(), ["default@web"]);
    assert_eq!(host.sup.starts(), ["default@web"]);
    let got = host.phases();
    assert_eq!(got[0], (Phase::Stopping, "restart requested".into()));
    assert_eq!(got[1].0, Phase::Starting);
    // Carried out: the next step keeps it.
    host.cluster.advance(SETTLE);
    host.step("default/web").await;
    assert!(host.sup.stops().is_empty() && host.sup.starts().is_empty());
}

#[tokio::test]
async fn the_ready_marker_makes_a_vm_ready() {
    let host = Host::new();
    host.runner_here();
    let mut v = vm("web", RestartPolicy::Always);
    v.spec.ready_marker = Some("login:".into());
    host.cluster.put(v);
    host.step("default/web").await;
    host.phases();
    std::fs::write(host.dir("default@web").console(), "x\nweb login: \n").unwrap();
    host.step("default/web").await;
    assert_eq!(host.phases(), [(Phase::Ready, String::new())]);
}

#[tokio::test]
async fn a_failed_start_and_a_bad_runner_fail_the_vm_with_the_reason() {
    let host = Host::new();
    host.runner_here();
    host.sup.start_fails.store(true, Ordering::SeqCst);
    host.cluster.put(vm("web", RestartPolicy::Always));
    host.step("default/web").await;
    let got = host.phases();
    assert_eq!(got[0].0, Phase::Failed);
    assert!(got[0].1.contains("no such tap"), "{got:?}");
    // A runner dir without bin/microvm-run.
    let host = Host::new();
    std::fs::create_dir_all(host.root.path().join("store/web")).unwrap();
    host.cluster.put(vm("web", RestartPolicy::Always));
    host.step("default/web").await;
    let got = host.phases();
    assert_eq!(got[0].0, Phase::Failed);
    assert!(got[0].1.contains("microvm-run"), "{got:?}");
}

#[tokio::test]
async fn an_image_is_fetched_once_and_a_failed_fetch_says_why_and_retries() {
    let host = Host::new();
    host.cluster.fetch_fails.store(true, Ordering::SeqCst);
    host.cluster.put(vm("web", RestartPolicy::Always));
    host.step("default/web").await;
    // A second step while the fetch runs does not start another.
    host.step("default/web").await;
    until("the fetch's failure", || {
        host.cluster.reports.lock().unwrap().iter().any(|r| {
            r.reason
                .as_deref()
                .is_some_and(|w| w.contains("fetching image web: no holder answered; retrying"))
        })
    })
    .await;
    assert_eq!(host.cluster.fetches.lock().unwrap().len(), 1);
    assert_eq!(host.cluster.get("default/web").phase, Phase::Fetching);
    assert!(host.sup.starts().is_empty());
}

#[tokio::test]
async fn a_fetched_image_is_started_on_the_next_step() {
    let host = Host::new();
    host.cluster.put(vm("web", RestartPolicy::Always));
    host.step("default/web").await;
    assert_eq!(host.phases()[0].0, Phase::Fetching);
    // Once the fetch has made the runner, the next step starts it.
    until("the fetch", || {
        host.root.path().join("store/web/bin/microvm-run").exists()
    })
    .await;
    host.step("default/web").await;
    let started = host.sup.starts();
    assert_eq!(started, ["default@web"]);
}

#[tokio::test]
async fn rounds_stop_what_is_no_longer_here_and_sweep_deleted_vms() {
    let host = Host::new();
    host.runner_here();
    host.cluster.put(vm("web", RestartPolicy::Always));
    host.cluster.put(vm("db", RestartPolicy::Always));
    assert_eq!(host.agent.round(false).await, Round::Full);
    let mut starts = host.sup.starts();
    starts.sort();
    assert_eq!(starts, ["default@db", "default@web"]);
    // db moves to another host; web is deleted.
    let mut db = host.cluster.get("default/db");
    db.node = Some(NodeId(3));
    host.cluster.put(db);
    host.cluster.vms.lock().unwrap().remove("default/web");
    assert_eq!(host.agent.round(false).await, Round::Full);
    let mut stops = host.sup.stops();
    stops.sort();
    assert_eq!(stops, ["default@db", "default@web"]);
    // The deleted VM's state dir is gone; the moved one's stays (it still exists).
    assert!(!host.root.path().join("vms/default@web").exists());
    assert!(host.root.path().join("vms/default@db").exists());
}

#[tokio::test]
async fn a_quick_round_steps_only_what_changed() {
    let host = Host::new();
    host.runner_here();
    host.cluster.put(vm("web", RestartPolicy::Always));
    assert_eq!(host.agent.round(false).await, Round::Full);
    host.sup.starts();
    host.cluster.put(vm("db", RestartPolicy::Always));
    assert_eq!(host.agent.round(true).await, Round::Quick);
    assert_eq!(host.sup.starts(), ["default@db"]);
    // A VM gone from this host needs a full round.
    host.cluster.vms.lock().unwrap().remove("default/db");
    assert_eq!(host.agent.round(true).await, Round::Full);
}

#[tokio::test]
async fn without_a_leader_for_the_fence_timeout_every_vm_stops() {
    let host = Host::new();
    host.runner_here();
    host.cluster.put(vm("web", RestartPolicy::Always));
    assert_eq!(host.agent.round(false).await, Round::Full);
    host.sup.starts();
    host.cluster.leader.store(false, Ordering::SeqCst);
    // Within the fence timeout a host without a leader goes on as it was.
    host.cluster.advance(Duration::from_secs(14));
    assert_eq!(host.agent.round(false).await, Round::Full);
    assert!(host.sup.stops().is_empty());
    host.cluster.advance(Duration::from_secs(1));
    assert_eq!(host.agent.round(false).await, Round::Fenced);
    assert_eq!(host.sup.stops(), ["default@web"]);
    assert!(host.dir("default@web").record().unwrap().stopped);
    // A leader again: nothing until this host has caught up with it.
    host.cluster.leader.store(true, Ordering::SeqCst);
    host.cluster.syncs.store(false, Ordering::SeqCst);
    assert_eq!(host.agent.round(false).await, Round::Waiting);
    assert!(host.sup.starts().is_empty());
    host.cluster.syncs.store(true, Ordering::SeqCst);
    assert_eq!(host.agent.round(false).await, Round::Full);
    assert_eq!(host.sup.starts(), ["default@web"]);
}

#[tokio::test]
async fn a_host_that_starts_without_a_leader_waits() {
    let host = Host::new();
    host.runner_here();
    host.cluster.leader.store(false, Ordering::SeqCst);
    host.cluster.put(vm("web", RestartPolicy::Always));
    assert_eq!(host.agent.round(false).await, Round::Waiting);
    assert!(host.sup.starts().is_empty());
}

#[tokio::test]
async fn a_hung_after_start_hook_holds_up_nothing() {
    let host = Host::new();
    host.runner_here();
    host.cluster.hooks_hang.store(true, Ordering::SeqCst);
    host.cluster.put(vm("web", RestartPolicy::Always));
    host.cluster.put(vm("db", RestartPolicy::Always));
    host.step("default/web").await;
    host.step("default/db").await;
    assert_eq!(host.sup.starts(), ["default@web", "default@db"]);
    until("both hooks to have been called", || {
        host.cluster.after_starts.lock().unwrap().len() == 2
    })
    .await;
    // The VM goes on to running while its hook hangs.
    host.cluster.advance(SETTLE);
    host.phases();
    host.step("default/web").await;
    assert_eq!(host.phases(), [(Phase::Running, String::new())]);
}
