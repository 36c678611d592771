//! `blixard node run`: start (or resume) a node and serve until told to stop.
//!
//! Shutdown order on SIGTERM/SIGINT: stop accepting connections and let in-flight API
//! requests finish (the router's shutdown does both, then closes the endpoint), stop the
//! raft thread after its current step, and remove `node.json`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_core::{Capacity, ClusterId, Command, NewMember, NodeId, State};
use blixard_images::nix::StoreDir;
use blixard_images::ImageStore;
use blixard_net::api::{ApiError, JoinCluster, Joined};
use blixard_net::client::{ApiClient, ClientError};
use blixard_net::raft_transport::{IrohTransport, RaftHandler};
use blixard_net::server::{ApiHandler, Gated};
use blixard_net::ticket::JoinTicket;
use blixard_net::{endpoint, key_of, keys, member_addr, API_ALPN, RAFT_ALPN};
use blixard_raft::{CoreConfig, RaftCore, RaftNode};
use blixard_store::{NodeRecord, Store, StoreError};
use iroh::protocol::Router;
use tokio::sync::watch;

use crate::config::Config;
use crate::datadir::{self, NodeInfo};
use crate::exit::{self, Failure};
use crate::service::{now_ms, Book, NodeService, Seeds};

/// How `blixard node run` was asked to start (its command line, the CLI's parsing aside).
#[derive(Clone, Debug, Default)]
pub struct RunArgs {
    /// Address to listen on (UDP).
    pub listen: Option<SocketAddr>,
    /// Start a new cluster with this node as its first member; ignored (with a note) when
    /// the data dir already holds this node's cluster.
    pub init: bool,
    /// Name of the new cluster (with `init`).
    pub cluster_name: String,
    /// A join ticket, as text.
    pub join: Option<String>,
    /// A file holding the join ticket.
    pub join_file: Option<PathBuf>,
    /// Config file (default: DATA_DIR/blixard.toml when it exists).
    pub config: Option<PathBuf>,
    /// This node's name (default: the host name).
    pub name: Option<String>,
    /// Node labels.
    pub labels: Vec<(String, String)>,
    /// An Iroh relay URL (relays are off by default).
    pub relay_url: Option<String>,
    /// Compact the raft log past this many entries.
    pub snapshot_threshold: Option<u64>,
    /// Unpack image closures into this store dir.
    pub store_dir: Option<String>,
    /// Where the binary cache listens, or off.
    pub cache_listen: Option<CacheListen>,
}

/// `--cache-listen`: an address, or `off`.
#[derive(Clone, Debug)]
pub enum CacheListen {
    Off,
    At(SocketAddr),
}

fn data_err(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::DATA_DIR, e)
}

fn store_err(e: StoreError) -> Failure {
    data_err(e)
}

fn load_config(data_dir: &Path, args: &RunArgs) -> Result<Config, Failure> {
    let cfg_err = |e: crate::config::ConfigError| Failure::new(exit::CONFIG, e);
    let mut config = match &args.config {
        Some(p) => Config::load(p).map_err(cfg_err)?,
        None => {
            let p = data_dir.join("blixard.toml");
            if p.exists() {
                Config::load(&p).map_err(cfg_err)?
            } else {
                Config::default()
            }
        }
    };
    if args.listen.is_some() {
        config.listen = args.listen;
    }
    if args.name.is_some() {
        config.name.clone_from(&args.name);
    }
    if args.relay_url.is_some() {
        config.relay_url.clone_from(&args.relay_url);
    }
    if let Some(t) = args.snapshot_threshold {
        config.raft.snapshot_threshold = t;
    }
    for (k, v) in &args.labels {
        config.labels.insert(k.clone(), v.clone());
    }
    if let Some(dir) = &args.store_dir {
        config.images.store_dir.clone_from(dir);
    }
    match &args.cache_listen {
        Some(CacheListen::Off) => config.images.cache_listen = None,
        Some(CacheListen::At(a)) => config.images.cache_listen = Some(*a),
        None => {}
    }
    config
        .validate()
        .map_err(|e| Failure::new(exit::CONFIG, format!("invalid config: {e}")))?;
    if let Some(f) = &config.expected_members {
        crate::config::load_members(Path::new(f)).map_err(|e| Failure::new(exit::CONFIG, e))?;
    }
    // A bad declared-VM file stops the daemon before it joins anything.
    if let Some(f) = &config.vms.declared_file {
        crate::declared::load(Path::new(f)).map_err(|e| Failure::new(exit::CONFIG, e))?;
    }
    Ok(config)
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

fn detect_capacity(config: &Config) -> Capacity {
    let vcpus = config.capacity.vcpus.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let memory_mib = config.capacity.memory_mib.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(0)
    });
    Capacity { vcpus, memory_mib }
}

/// Where the join ticket comes from (`--join` or `--join-file`). It is read only when the
/// data dir holds no cluster yet: a node that has joined keeps its identity and membership
/// in its data dir and never needs the ticket again, so a missing, empty or used-up ticket
/// (`/run/keys` is empty after a reboot) does not keep it from starting.
#[derive(Clone, Copy, Debug)]
enum TicketArg<'a> {
    None,
    Inline(&'a str),
    File(&'a Path),
}

/// Why no ticket could be had from a [`TicketArg`].
#[derive(Debug, thiserror::Error)]
enum TicketReadError {
    #[error("cannot read the join ticket file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the join ticket file {0} is empty")]
    Empty(PathBuf),
    #[error("the join ticket {origin} is damaged: {source}")]
    Damaged {
        origin: String,
        source: blixard_net::ticket::TicketError,
    },
}

impl<'a> TicketArg<'a> {
    fn of(args: &'a RunArgs) -> Self {
        match (&args.join, &args.join_file) {
            (Some(t), _) => Self::Inline(t),
            (None, Some(p)) => Self::File(p),
            (None, None) => Self::None,
        }
    }

    /// The ticket, `Ok(None)` when none was given.
    fn read(self) -> Result<Option<JoinTicket>, TicketReadError> {
        let (text, origin) = match self {
            Self::None => return Ok(None),
            Self::Inline(t) => (t.to_string(), "given with --join".to_string()),
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| {
                    TicketReadError::Unreadable {
                        path: path.to_owned(),
                        source,
                    }
                })?;
                if text.trim().is_empty() {
                    return Err(TicketReadError::Empty(path.to_owned()));
                }
                (text, format!("in {}", path.display()))
            }
        };
        text.parse::<JoinTicket>()
            .map(Some)
            .map_err(|source| TicketReadError::Damaged { origin, source })
    }
}

/// How to get a ticket, for errors on a node that needs one.
const NEW_TICKET: &str = "create one on a member with `blixard cluster token create` and pass it with --join or --join-file (NixOS: services.blixard.joinTicketFile)";

pub async fn run(data_dir: &Path, args: RunArgs) -> Result<(), Failure> {
    let config = load_config(data_dir, &args)?;
    datadir::ensure(data_dir).map_err(|e| {
        data_err(format!(
            "cannot create data dir {}: {e}",
            data_dir.display()
        ))
    })?;
    let store = Store::open(&datadir::db(data_dir)).map_err(store_err)?;
    let record = store.node_record().map_err(store_err)?;
    if let Some(r) = record.as_ref().filter(|r| r.removed) {
        return Err(data_err(format!(
            "node {} was removed from cluster {}; this data dir cannot rejoin (start with an empty data dir and a new join ticket)",
            r.node_id, r.cluster_id
        )));
    }

    let listen = config
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7000)));
    let relay = match &config.relay_url {
        Some(u) => Some(
            u.parse()
                .map_err(|e| Failure::new(exit::CONFIG, format!("relay_url: {e}")))?,
        ),
        None => None,
    };
    // A node that is already a member must keep its identity: a lost key is an error,
    // never a fresh identity the cluster would not recognise.
    let key_path = datadir::node_key(data_dir);
    let secret = if record.is_some() {
        keys::load(&key_path).map_err(|e| {
            data_err(format!(
                "{e}; this node's identity is gone, so it cannot rejoin as itself (remove it with `cluster leave` and join again with an empty data dir)"
            ))
        })?
    } else {
        keys::load_or_create(&key_path).map_err(data_err)?
    };
    let ep = endpoint::bind(
        secret,
        listen,
        relay,
        vec![
            RAFT_ALPN.to_vec(),
            API_ALPN.to_vec(),
            iroh_blobs::ALPN.to_vec(),
        ],
    )
    .await
    .map_err(|e| Failure::new(exit::CONFIG, e))?;
    let result = serve(data_dir, &args, &config, store, record, listen, ep.clone()).await;
    if result.is_err() {
        // Close the endpoint on the way out, so the error stays the one line we print.
        ep.close().await;
    }
    result
}

/// Everything after the endpoint is bound: resume, initialise or join, then serve.
#[allow(clippy::too_many_arguments)]
async fn serve(
    data_dir: &Path,
    args: &RunArgs,
    config: &Config,
    store: Store,
    record: Option<NodeRecord>,
    listen: SocketAddr,
    ep: iroh::Endpoint,
) -> Result<(), Failure> {
    let advertise: Vec<SocketAddr> = if listen.ip().is_unspecified() {
        ep.bound_sockets()
    } else {
        vec![listen]
    };
    let timeout = Duration::from_millis(config.request_timeout_ms.unwrap_or(10_000));
    let name = config.name.clone().unwrap_or_else(host_name);
    let capacity = detect_capacity(config);

    // Who are we: resume, initialise, or join.
    let (record, seeds): (NodeRecord, Seeds) = match record {
        Some(r) => {
            match TicketArg::of(args).read() {
                Ok(Some(t)) if t.cluster_id != r.cluster_id => {
                    return Err(data_err(format!(
                        "data dir {} belongs to cluster {}, but the join ticket is for cluster {}",
                        data_dir.display(),
                        r.cluster_id,
                        t.cluster_id
                    )));
                }
                Ok(Some(_)) => tracing::info!(
                    "already a member of cluster {}; ignoring the join ticket",
                    r.cluster_id
                ),
                Ok(None) => {}
                Err(e) => tracing::info!(
                    "already a member of cluster {}; the join ticket is not needed ({e})",
                    r.cluster_id
                ),
            }
            if args.init {
                tracing::info!("cluster {} already initialised; resuming", r.cluster_id);
            }
            (r, Vec::new())
        }
        None if args.init => {
            let admin = keys::create(&datadir::admin_key(data_dir)).map_err(data_err)?;
            let cluster_id = ClusterId(rand::random());
            let mut state = State::new();
            state
                .apply(&Command::Bootstrap {
                    cluster_id,
                    name: args.cluster_name.clone(),
                    member: NewMember {
                        name: name.clone(),
                        endpoint: key_of(&ep.id()),
                        addrs: advertise.clone(),
                        labels: config.labels.clone(),
                        capacity,
                    },
                    admin: key_of(&admin.public()),
                    now_ms: now_ms(),
                })
                .map_err(|e| Failure::new(exit::ERROR, e))?;
            store.bootstrap(&state, &[1]).map_err(store_err)?;
            let r = NodeRecord {
                cluster_id,
                node_id: NodeId(1),
                removed: false,
            };
            store.set_node_record(&r).map_err(store_err)?;
            tracing::info!(%cluster_id, "initialised a new cluster");
            (r, Vec::new())
        }
        None => {
            let ticket = match TicketArg::of(args).read() {
                Ok(Some(t)) => t,
                Ok(None) => {
                    return Err(data_err(format!(
                        "data dir {} holds no cluster: pass --init to start one, or a join ticket to join one ({NEW_TICKET})",
                        data_dir.display()
                    )))
                }
                Err(e @ TicketReadError::Damaged { .. }) => {
                    return Err(Failure::new(exit::USAGE, format!("{e}; {NEW_TICKET}")))
                }
                Err(e) => {
                    return Err(Failure::new(
                        exit::CONFIG,
                        format!(
                            "data dir {} holds no cluster, so this node needs a join ticket, but {e}; {NEW_TICKET}",
                            data_dir.display()
                        ),
                    ))
                }
            };
            let admin = keys::load_or_create(&datadir::admin_key(data_dir)).map_err(data_err)?;
            let client = ApiClient::new(ep.clone(), Some(ticket.cluster_id), timeout);
            let request = JoinCluster {
                secret: ticket.secret,
                endpoint: key_of(&ep.id()),
                name: name.clone(),
                addrs: advertise.clone(),
                labels: config.labels.clone(),
                capacity,
                admin: key_of(&admin.public()),
            };
            let joined = join(&client, &ticket, request).await?;
            let r = NodeRecord {
                cluster_id: joined.cluster_id,
                node_id: joined.node,
                removed: false,
            };
            store.set_node_record(&r).map_err(store_err)?;
            tracing::info!(node = %joined.node, cluster = %joined.cluster_id, "joined the cluster");
            (r, joined.members)
        }
    };
    let me = record.node_id;
    let cluster_id = record.cluster_id;

    let mut core_cfg = CoreConfig::new(me.0);
    core_cfg.election_tick = config.raft.election_ticks;
    core_cfg.heartbeat_tick = config.raft.heartbeat_ticks;
    core_cfg.snapshot_threshold = config.raft.snapshot_threshold;
    let core = RaftCore::open(store.clone(), core_cfg, &blixard_raft::tracing_logger())
        .map_err(data_err)?;
    let solo = core.conf_state().voters == vec![me.0];
    let (removed_tx, mut removed_by_peer) = watch::channel(false);
    // Read once: the peer book dials the declared addresses, the service admits joins.
    let expected = match &config.expected_members {
        Some(f) => Some(
            crate::config::load_members(Path::new(f)).map_err(|e| Failure::new(exit::CONFIG, e))?,
        ),
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
    );
    let (node, raft_thread) = RaftNode::spawn(
        core,
        Arc::new(transport),
        Duration::from_millis(config.raft.tick_ms),
    )
    .map_err(|e| Failure::new(exit::ERROR, format!("cannot start the raft thread: {e}")))?;
    if solo {
        node.campaign();
    }
    let store_dir = StoreDir::new(&config.images.store_dir)
        .map_err(|e| Failure::new(exit::CONFIG, format!("images.store_dir: {e}")))?;
    let image_store = ImageStore::open(&datadir::blobs(data_dir), store_dir)
        .await
        .map_err(data_err)?;
    let cache = match config.images.cache_listen {
        Some(addr) => {
            let (bound, task) = blixard_images::cache::serve(
                addr,
                image_store.clone(),
                StoreDir::default(),
                Arc::new(crate::images::StateKeys(node.clone())),
            )
            .await
            .map_err(|e| {
                Failure::new(
                    exit::CONFIG,
                    format!("cannot serve the binary cache on {addr}: {e}"),
                )
            })?;
            tracing::info!(%bound, "binary cache serving");
            Some((bound, task))
        }
        None => None,
    };
    let images = crate::images::Images::new(
        image_store.clone(),
        cache.as_ref().map(|(a, _)| format!("http://{a}")),
        config.images.cache_size_mib.map(|m| m << 20),
        (config.images.materialise == crate::config::Materialise::Nix)
            .then(|| config.images.nix_store.clone()),
        config
            .images
            .import_paths
            .iter()
            .map(std::path::PathBuf::from)
            .collect(),
    );
    let audit = Arc::new(crate::audit::AuditLog::new(data_dir, me).map_err(|e| {
        Failure::new(
            exit::ERROR,
            format!("cannot start the audit log writer: {e}"),
        )
    })?);
    let vms = vms_of(data_dir, config, &node, &audit)?;
    let service = Arc::new(
        NodeService::new(
            node.clone(),
            cluster_id,
            ApiClient::new(ep.clone(), Some(cluster_id), timeout),
            audit,
            images,
            vms,
            expected,
        )
        .map_err(|e| Failure::new(exit::ERROR, e))?,
    );
    let blobs = iroh_blobs::BlobsProtocol::new(image_store.blobs(), None);
    let router = Router::builder(ep.clone())
        .accept(
            RAFT_ALPN,
            RaftHandler::new(node.clone(), cluster_id, book.clone()),
        )
        .accept(API_ALPN, ApiHandler::new(service.clone(), timeout))
        .accept(
            iroh_blobs::ALPN,
            Gated::new(service.clone(), blobs, "blob:fetch"),
        )
        .spawn();
    let janitor = tokio::spawn(crate::images::janitor(service.clone()));
    let scheduler = tokio::spawn(crate::agent::scheduler(service.clone()));
    let auditor = tokio::spawn(audit_changes(node.changes(), service.audit.clone()));
    // SIGHUP re-reads the declared-VM file (and nothing else); without one it is noted.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let declarer = match &config.vms.declared_file {
        Some(f) => {
            let vms =
                crate::declared::load(Path::new(f)).map_err(|e| Failure::new(exit::CONFIG, e))?;
            let admin = keys::load(&datadir::admin_key(data_dir)).map_err(data_err)?;
            Some(tokio::spawn(crate::declared::watch(
                service.clone(),
                key_of(&admin.public()),
                PathBuf::from(f),
                vms,
                reload_rx,
            )))
        }
        None => None,
    };
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| Failure::new(exit::ERROR, format!("cannot install signal handler: {e}")))?;
    let declares = declarer.is_some();
    let hup = tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            if declares {
                tracing::info!("SIGHUP: reading the declared VMs again");
                // A reload already pending covers this one too.
                let _ = reload_tx.try_send(());
            } else {
                tracing::info!("SIGHUP: no declared-VM file to reload (vms.declared_file)");
            }
        }
    });
    let reconciler = tokio::spawn(crate::agent::reconciler(service.clone()));

    let info = NodeInfo {
        node_id: me,
        cluster_id,
        endpoint_id: key_of(&ep.id()),
        addrs: advertise.clone(),
        pid: std::process::id(),
    };
    let info_json = serde_json::to_vec_pretty(&info).map_err(|e| Failure::new(exit::ERROR, e))?;
    datadir::write_atomic(&datadir::node_info(data_dir), &info_json)
        .map_err(|e| data_err(format!("cannot write node.json: {e}")))?;
    tokio::spawn(keep_addrs_current(node.clone(), me, advertise.clone()));
    tracing::info!(node = %me, cluster = %cluster_id, endpoint = %ep.id(), addrs = ?advertise, "serving");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }

    let mut removed_by_raft = node.removed();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::new(exit::ERROR, format!("cannot install signal handler: {e}")))?;
    let removed = tokio::select! {
        _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); false }
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); false }
        _ = removed_by_raft.wait_for(|r| *r) => true,
        _ = removed_by_peer.wait_for(|r| *r) => true,
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    janitor.abort();
    // The VMs keep running: a restarted daemon adopts them.
    scheduler.abort();
    reconciler.abort();
    auditor.abort();
    hup.abort();
    if let Some(d) = declarer {
        d.abort();
    }
    if let Some((_, task)) = cache {
        task.abort();
    }
    // The router's shutdown also closes the blob store (through the blobs handler).
    if let Err(e) = router.shutdown().await {
        tracing::warn!("router shutdown: {e}");
    }
    image_store.shutdown().await;
    node.shutdown();
    let _ = tokio::task::spawn_blocking(move || raft_thread.join()).await;
    // Every line recorded so far goes to disk before the process exits.
    let audit = service.audit.clone();
    let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
    let _ = std::fs::remove_file(datadir::node_info(data_dir));
    if removed {
        store
            .set_node_record(&NodeRecord {
                removed: true,
                ..record
            })
            .map_err(store_err)?;
        return Err(data_err(format!(
            "node {me} was removed from cluster {cluster_id}; it has stopped and its data dir cannot rejoin"
        )));
    }
    tracing::info!("stopped");
    Ok(())
}

/// Writes every state change this node applies into its audit log.
async fn audit_changes(
    mut changes: tokio::sync::broadcast::Receiver<blixard_raft::Change>,
    audit: Arc<crate::audit::AuditLog>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match changes.recv().await {
            Ok(c) => audit.record_change(c.index, c.kind, c.proposer),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!("the audit log missed {n} state changes (they are in the raft log)");
                audit.record_change(0, &format!("{n} changes not recorded (lagged)"), None);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// The node's VM machinery, from the `[vms]` config.
fn vms_of(
    data_dir: &Path,
    config: &Config,
    node: &RaftNode,
    audit: &Arc<crate::audit::AuditLog>,
) -> Result<crate::vms::Vms, Failure> {
    let v = &config.vms;
    let root = v
        .state_dir
        .as_ref()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| data_dir.join("vms"));
    let supervisor: Arc<dyn blixard_host::Supervisor> = match v.supervisor {
        crate::config::SupervisorConfig::Process => Arc::new(
            blixard_host::ProcessSupervisor::new(&root, v.console_max_mib << 20)
                .map_err(|e| data_err(format!("vms.state_dir: {e}")))?,
        ),
        crate::config::SupervisorConfig::Systemd => {
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
    hooks.push(Arc::new(crate::vms::QuotaAdmission(node.clone())));
    for h in &v.hooks {
        hooks.push(Arc::new(blixard_host::ExecHook::new(
            h.into(),
            Duration::from_millis(v.hook_timeout_ms),
        )));
    }
    hooks.push(Arc::new(crate::vms::AuditHook(audit.clone())));
    Ok(crate::vms::Vms {
        supervisor,
        root,
        runner_store: config.images.store_dir.clone().into(),
        hooks,
        scheduler: blixard_core::SchedulerConfig {
            strategy: match v.strategy {
                crate::config::StrategyConfig::BinPack => blixard_core::Strategy::BinPack,
                crate::config::StrategyConfig::Spread => blixard_core::Strategy::Spread,
            },
            cpu_overcommit_pct: v.cpu_overcommit_pct,
            memory_overcommit_pct: v.memory_overcommit_pct,
        },
        down_after: Duration::from_millis(v.down_timeout_ms),
        fence_after: Duration::from_millis(v.fence_timeout_ms),
        stop_timeout: Duration::from_millis(v.stop_timeout_ms),
        fetching: Default::default(),
        wake: tokio::sync::Notify::new(),
    })
}

/// Tries each member in the ticket until one admits us.
async fn join(
    client: &ApiClient,
    ticket: &JoinTicket,
    request: JoinCluster,
) -> Result<Joined, Failure> {
    let mut last = None;
    for (key, addrs) in &ticket.members {
        let Some(addr) = member_addr(key, addrs) else {
            continue;
        };
        match client.call(&addr, request.clone()).await {
            Ok(joined) => return Ok(joined),
            // A used, expired or unknown token (a node whose data dir was lost, say):
            // only a new ticket helps.
            Err(ClientError::Api(ApiError::Rejected(m))) if m.contains("join token") => {
                return Err(Failure::new(
                    exit::REFUSED,
                    format!("the cluster refused the join ticket: {m}; a ticket admits one node, once, before it expires: {NEW_TICKET}"),
                ));
            }
            Err(e @ ClientError::Api(_)) => return Err(Failure::from(e)),
            Err(e) => {
                tracing::warn!("join via {key}: {e}");
                last = Some(e);
            }
        }
    }
    Err(match last {
        Some(e) => Failure::new(
            exit::UNREACHABLE,
            format!("could not reach any member of the cluster: {e}"),
        ),
        None => Failure::new(exit::USAGE, "the join ticket lists no members"),
    })
}

/// Records this node's current addresses in cluster state if they changed (e.g. after a
/// restart on another port).
async fn keep_addrs_current(node: RaftNode, me: NodeId, addrs: Vec<SocketAddr>) {
    loop {
        let current = node.state().member(me).map(|m| m.addrs.clone());
        match current {
            Some(a) if a == addrs => return,
            None => {}
            Some(_) => {
                let cmd = Command::UpdateAddrs {
                    node: me,
                    addrs: addrs.clone(),
                };
                match tokio::time::timeout(Duration::from_secs(5), node.propose(cmd)).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => tracing::debug!("address update not yet applied: {e}"),
                    Err(_) => tracing::debug!("address update timed out"),
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
