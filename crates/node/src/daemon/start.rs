//! Start-up phase 4: everything that runs. The raft thread (with the peer book and the
//! transport), the image store and its binary cache, the VM machinery, the API behind the
//! choke point on the router (`blixard/raft/1`, `blixard/api/1`, and iroh-blobs behind
//! `blob:fetch`), the loops (janitor, scheduler, reconciler, declared VMs, the audit of
//! applied changes, address updates), `node.json`, and READY=1 to systemd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_core::{Command, NodeId};
use blixard_images::nix::StoreDir;
use blixard_images::ImageStore;
use blixard_net::client::ApiClient;
use blixard_net::raft_transport::{IrohTransport, PeerVersion, PeerVersions, RaftHandler};
use blixard_net::server::{ApiHandler, Gated};
use blixard_net::{key_of, API_ALPN, RAFT_ALPN};
use blixard_raft::{CoreConfig, RaftCore, RaftNode};
use blixard_store::NodeRecord;
use iroh::protocol::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::data_err;
use super::open::Opened;
use crate::api::Api;
use crate::audit::AuditLog;
use crate::cluster::ClusterHandle;
use crate::config::{self, Config};
use crate::datadir::{self, NodeInfo};
use crate::exit::{self, Failure};
use crate::gate::Gate;
use crate::images::Images;
use crate::metrics::stats::Stats;
use crate::metrics::{NodeMetrics, Sources};
use crate::peers::{Book, Seeds};
use crate::telemetry;
use crate::vms::Loops;

/// A node that serves, and what its shutdown must stop, in order.
pub(super) struct Running {
    pub record: NodeRecord,
    pub node: RaftNode,
    pub raft_thread: std::thread::JoinHandle<()>,
    pub router: Router,
    pub image_store: ImageStore,
    pub audit: Arc<AuditLog>,
    /// The audit of applied changes: it ends after the raft thread, with its last change.
    pub audit_changes: JoinHandle<()>,
    /// The loops and the binary cache, aborted at shutdown (VMs keep running).
    pub tasks: Vec<JoinHandle<()>>,
    /// A peer told this node it was removed.
    pub removed_by_peer: watch::Receiver<bool>,
    /// Asks the declared-VM loop to read its file again (SIGHUP).
    pub reload: Option<tokio::sync::mpsc::Sender<()>>,
}

pub(super) async fn start(
    data_dir: &Path,
    config: &Config,
    opened: Opened,
    record: NodeRecord,
    seeds: Seeds,
) -> Result<Running, Failure> {
    let Opened {
        store,
        ep,
        advertise,
        ..
    } = opened;
    let me = record.node_id;
    let cluster_id = record.cluster_id;
    let timeout = Duration::from_millis(config.request_timeout_ms.unwrap_or(10_000));

    // The raft thread, its transport and the peer book.
    let log_version = crate::version::log_version().map_err(|e| Failure::new(exit::CONFIG, e))?;
    let mut core_cfg = CoreConfig::new(me.0);
    core_cfg.log_version = log_version;
    core_cfg.election_tick = config.raft.election_ticks;
    core_cfg.heartbeat_tick = config.raft.heartbeat_ticks;
    core_cfg.snapshot_threshold = config.raft.snapshot_threshold;
    let mut core = RaftCore::open(store.clone(), core_cfg, &blixard_raft::tracing_logger())
        .map_err(data_err)?;
    // Traces, once this node knows its id (a joining node learns it from the leader).
    if let Some(url) = telemetry::traces_url(config.telemetry.otlp_endpoint.as_deref()) {
        let service = telemetry::Service {
            name: "blixard",
            instance: Some(format!("n{}", me.0)),
        };
        telemetry::start(Some(&url), service).map_err(|e| Failure::new(exit::CONFIG, e))?;
    }
    let traces = Arc::new(telemetry::EntryTraces::default());
    core.set_tracing(traces.clone());
    let solo = core.conf_state().voters == vec![me.0];
    let (removed_tx, removed_by_peer) = watch::channel(false);
    // Read once: the peer book dials the declared addresses, the API admits joins.
    let expected = match &config.expected_members {
        Some(f) => {
            Some(config::load_members(Path::new(f)).map_err(|e| Failure::new(exit::CONFIG, e))?)
        }
        None => None,
    };
    let book = Arc::new(Book {
        state: core.state(),
        seeds,
        declared: expected
            .iter()
            .flatten()
            .map(|m| (m.endpoint_id, m.socket_addrs()))
            .collect(),
        me,
        removed: Mutex::new(Some(removed_tx)),
    });
    let transport = IrohTransport::new(
        ep.clone(),
        cluster_id,
        me,
        book.clone(),
        tokio::runtime::Handle::current(),
    )
    .with_version(PeerVersion {
        log: log_version,
        release: crate::version::RELEASE.to_string(),
    });
    let versions = PeerVersions::default();
    let links = transport.links();
    let restarts = transport.restarts();
    // The peers learn at once that this process is new, and replace their connections
    // to the old one (raft_transport::Restarts).
    transport.greet(book.other_members());
    let metrics = NodeMetrics::default();
    // Every change applied from the first on is audited: the feed holds them until the
    // audit task below reads them (the raft thread waits for it when it is full).
    let (changes_tx, changes) = tokio::sync::mpsc::channel(crate::audit::CHANGE_FEED);
    let (node, raft_thread) = RaftNode::spawn(
        core,
        Arc::new(transport),
        Duration::from_millis(config.raft.tick_ms),
        Some(changes_tx),
    )
    .map_err(|e| Failure::new(exit::ERROR, format!("cannot start the raft thread: {e}")))?;
    if solo {
        node.campaign();
    }
    let cluster = Arc::new(ClusterHandle::new(
        node.clone(),
        cluster_id,
        ApiClient::new(ep.clone(), Some(cluster_id), timeout),
        versions.clone(),
        log_version,
        timeout,
    ));
    let mut tasks = Vec::new();
    let audit = Arc::new(
        AuditLog::new(data_dir, me, &audit_settings(config)).map_err(|e| {
            Failure::new(
                exit::ERROR,
                format!("cannot start the audit log writer: {e}"),
            )
        })?,
    );
    let gate = Arc::new(
        Gate::new(cluster.clone(), audit.clone()).map_err(|e| Failure::new(exit::ERROR, e))?,
    );

    // Images and the binary cache.
    let store_dir = StoreDir::new(&config.images.store_dir)
        .map_err(|e| Failure::new(exit::CONFIG, format!("images.store_dir: {e}")))?;
    let image_store = ImageStore::open(&datadir::blobs(data_dir), store_dir)
        .await
        .map_err(data_err)?;
    let mut cache_addr = None;
    let cache_url = match config.images.cache_listen {
        Some(addr) => {
            let (bound, task) = blixard_images::cache::serve(
                addr,
                image_store.clone(),
                StoreDir::default(),
                Arc::new(crate::images::StateKeys(node.clone())),
                config.images.cache_limits(),
                metrics.cache.clone(),
            )
            .await
            .map_err(|e| {
                Failure::new(
                    exit::CONFIG,
                    format!("cannot serve the binary cache on {addr}: {e}"),
                )
            })?;
            tracing::info!(%bound, "binary cache serving");
            tasks.push(task);
            cache_addr = Some(bound);
            Some(format!("http://{bound}"))
        }
        None => None,
    };
    let images = Arc::new(
        Images::new(
            gate.clone(),
            image_store.clone(),
            cache_url,
            config.images.cache_size_mib.map(|m| m << 20),
            (config.images.materialise == config::Materialise::Nix)
                .then(|| config.images.nix_store.clone()),
            config
                .images
                .import_paths
                .iter()
                .map(PathBuf::from)
                .collect(),
        )
        .counting(metrics.images.clone())
        .janitor_every(config.images.janitor_interval()),
    );

    // The audit log, the VM machinery, and the API on the router.
    let vms = Arc::new(vms_of(data_dir, config, &node, &audit)?);
    let sources = Arc::new(Sources {
        node: node.clone(),
        links,
        decisions: gate.decisions.clone(),
        audit: audit.clone(),
        data_dir: data_dir.to_path_buf(),
    });
    let api = Arc::new(
        Api::new(gate.clone(), images.clone(), vms.clone(), expected, timeout).counting(Stats {
            sources: sources.clone(),
            metrics: metrics.clone(),
        }),
    );
    let metrics_addr = match config.metrics.listen {
        Some(addr) => {
            let registry = Arc::new(crate::metrics::registry(&metrics, sources));
            let (bound, task) = crate::metrics::http::serve(addr, registry)
                .await
                .map_err(|e| {
                    Failure::new(
                        exit::CONFIG,
                        format!("cannot serve the metrics on {addr}: {e}"),
                    )
                })?;
            tracing::info!(%bound, "metrics serving at /metrics");
            tasks.push(task);
            Some(bound)
        }
        None => None,
    };
    let blobs = iroh_blobs::BlobsProtocol::new(image_store.blobs(), None);
    let router = Router::builder(ep.clone())
        .accept(
            RAFT_ALPN,
            RaftHandler::new(node.clone(), cluster_id, book.clone(), restarts, versions),
        )
        .accept(
            API_ALPN,
            ApiHandler::new(api.clone(), timeout, config.shutdown_timeout() / 2),
        )
        .accept(
            iroh_blobs::ALPN,
            Gated::new(api.clone(), blobs, "blob:fetch"),
        )
        .spawn();

    // The loops.
    let loops = Arc::new(Loops {
        cluster: cluster.clone(),
        gate: gate.clone(),
        vms,
        images: images.clone(),
        audit: audit.clone(),
        metrics: metrics.vms.clone(),
        traces,
    });
    tasks.push(tokio::spawn(crate::images::janitor(images)));
    if let Some(every) = config.raft.state_check_interval() {
        tasks.push(tokio::spawn(crate::gate::check_states(gate.clone(), every)));
    }
    tasks.push(tokio::spawn(crate::vms::scheduler::scheduler(
        loops.clone(),
    )));
    let audit_changes = tokio::spawn(audit_changes(
        changes,
        audit.clone(),
        cluster.events.clone(),
    ));
    let reload = match &config.vms.declared_file {
        Some(f) => {
            let declared =
                crate::declared::load(Path::new(f)).map_err(|e| Failure::new(exit::CONFIG, e))?;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tasks.push(tokio::spawn(crate::declared::watch(
                api.clone(),
                PathBuf::from(f),
                declared,
                rx,
            )));
            Some(tx)
        }
        None => None,
    };
    tasks.push(tokio::spawn(crate::vms::host::reconciler(loops)));
    tasks.push(tokio::spawn(keep_addrs_current(
        gate.clone(),
        me,
        advertise.clone(),
    )));

    // Serving: node.json for the CLI, READY=1 and watchdog pings for systemd.
    let info = NodeInfo {
        node_id: me,
        cluster_id,
        endpoint_id: key_of(&ep.id()),
        addrs: advertise.clone(),
        pid: std::process::id(),
        cache: cache_addr,
        metrics: metrics_addr,
        process: datadir::ProcessStamp::of(std::process::id()),
    };
    let info_json = serde_json::to_vec_pretty(&info).map_err(|e| Failure::new(exit::ERROR, e))?;
    datadir::write_atomic(&datadir::node_info(data_dir), &info_json)
        .map_err(|e| data_err(format!("cannot write node.json: {e}")))?;
    tracing::info!(node = %me, cluster = %cluster_id, endpoint = %ep.id(), addrs = ?advertise, "serving");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }));
    }
    Ok(Running {
        record,
        node,
        raft_thread,
        router,
        image_store,
        audit,
        audit_changes,
        tasks,
        removed_by_peer,
        reload,
    })
}

/// Writes every state change this node applies into its audit log, in order, none
/// skipped; ends once the raft thread has ended and its last change is recorded.
async fn audit_changes(
    mut changes: tokio::sync::mpsc::Receiver<blixard_raft::Change>,
    audit: Arc<AuditLog>,
    events: Arc<crate::events::Events>,
) {
    while let Some(c) = changes.recv().await {
        audit
            .record_change(c.index, c.kind, c.proposer, c.request)
            .await;
        if let Some(s) = c.subject {
            events.push(blixard_net::api::Event {
                index: c.index,
                at_ms: crate::cluster::now_ms(),
                kind: c.kind.to_string(),
                topic: s.topic,
                name: s.name,
                what: s.what,
            });
        }
    }
}

/// The audit log's settings, from the `[audit]` config.
fn audit_settings(config: &Config) -> crate::audit::Settings {
    let a = &config.audit;
    crate::audit::Settings {
        on_full: match a.on_full {
            config::OnFullConfig::Block => crate::audit::OnFull::Block,
            config::OnFullConfig::Fail => crate::audit::OnFull::Fail,
        },
        queue: a.queue,
        sync_interval: Duration::from_millis(a.sync_interval_ms),
    }
}

/// The node's VM machinery, from the `[vms]` config.
fn vms_of(
    data_dir: &Path,
    config: &Config,
    node: &RaftNode,
    audit: &Arc<AuditLog>,
) -> Result<crate::vms::Vms, Failure> {
    let v = &config.vms;
    let root = v
        .state_dir
        .as_ref()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| data_dir.join("vms"));
    let supervisor: Arc<dyn blixard_host::Supervisor> = match v.supervisor {
        config::SupervisorConfig::Process => Arc::new(
            blixard_host::ProcessSupervisor::new(&root, v.console_max_mib << 20)
                .map_err(|e| data_err(format!("vms.state_dir: {e}")))?,
        ),
        config::SupervisorConfig::Systemd => {
            let s = blixard_host::SystemdSupervisor::new(
                &root,
                v.console_max_mib << 20,
                Duration::from_millis(v.stop_timeout_ms),
            )
            .map_err(|e| data_err(format!("vms.state_dir: {e}")))?
            .with_properties(v.unit_properties.clone());
            s.check().map_err(|e| {
                Failure::new(
                    exit::CONFIG,
                    format!("vms.supervisor = \"systemd\", but no system manager answers: {e}"),
                )
            })?;
            Arc::new(s)
        }
    };
    let mut hooks = blixard_host::HookChain::new();
    hooks.push(Arc::new(crate::vms::hooks::QuotaAdmission(node.clone())));
    for h in &v.hooks {
        hooks.push(Arc::new(blixard_host::ExecHook::new(
            h.into(),
            Duration::from_millis(v.hook_timeout_ms),
        )));
    }
    hooks.push(Arc::new(crate::vms::hooks::AuditHook(audit.clone())));
    Ok(crate::vms::Vms {
        supervisor,
        runner_store: config.images.store_dir.clone().into(),
        hooks,
        scheduler: blixard_core::SchedulerConfig {
            strategy: match v.strategy {
                config::StrategyConfig::BinPack => blixard_core::Strategy::BinPack,
                config::StrategyConfig::Spread => blixard_core::Strategy::Spread,
            },
            cpu_overcommit_pct: v.cpu_overcommit_pct,
            memory_overcommit_pct: v.memory_overcommit_pct,
        },
        down_after: Duration::from_millis(v.down_timeout_ms),
        fence_after: Duration::from_millis(v.fence_timeout_ms),
        stop_timeout: Duration::from_millis(v.stop_timeout_ms),
        in_flight: Default::default(),
    })
}

/// Records this node's current addresses in cluster state if they changed (e.g. after a
/// restart on another port).
async fn keep_addrs_current(gate: Arc<Gate>, me: NodeId, addrs: Vec<SocketAddr>) {
    loop {
        let current = gate.cluster.state().member(me).map(|m| m.addrs.clone());
        match current {
            Some(a) if a == addrs => return,
            None => {}
            Some(_) => {
                let cmd = Command::UpdateAddrs {
                    node: me,
                    addrs: addrs.clone(),
                };
                match tokio::time::timeout(Duration::from_secs(5), gate.propose_as_host(cmd)).await
                {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => tracing::debug!("address update not yet applied: {e}"),
                    Err(_) => tracing::debug!("address update timed out"),
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
