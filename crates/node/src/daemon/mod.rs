//! `blixard node run`: start (or resume) a node and serve until told to stop, in named
//! phases:
//!
//! 1. [`settings`]: the configuration (file, environment, flags), checked;
//! 2. [`open`]: the data dir, its store, this node's key, the endpoint;
//! 3. [`identity`]: resume the cluster the data dir holds, start one, or join one;
//! 4. [`start`]: raft, images, VMs, the API on the router, the loops; then READY=1;
//! 5. [`wait`]: until SIGTERM/SIGINT, or this node is removed (SIGHUP reloads the
//!    declared VMs meanwhile);
//! 6. [`shutdown`], within `shutdown_timeout_ms` ([`stop`]), in order: stop the loops
//!    (VMs keep running), stop accepting connections and let in-flight API requests
//!    finish for half the bound, then answer the rest "shutting down" (the router's
//!    shutdown does both, then closes the endpoint), close the blob store, stop the raft
//!    thread after its current step, audit the changes it applied up to its last, flush
//!    (and fsync) the audit log, send the trace spans still queued (at most 1 s), remove
//!    `node.json`.
//!
//! The signal handlers are in place before phase 1, so no signal is lost or fatal while
//! the node starts: SIGTERM or SIGINT during phase 3 (a join may wait long for an
//! answer) stops it at once with exit 0; one during phase 4 lets the start finish and is
//! then acted on, with the shutdown in order; a SIGHUP is kept for phase 5.

mod identity;
mod open;
mod recover;
mod settings;
mod start;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use blixard_store::CheckReport;
use blixard_store::{NodeRecord, StoreError};
pub use recover::{read_backup, restore, RestoreArgs, Restored};

use crate::datadir;
use crate::exit::{self, Failure};
use start::Running;

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
    pub cache_listen: Option<Listen>,
    /// Where the metrics endpoint listens, or off.
    pub metrics_listen: Option<Listen>,
    /// Turn this member's replica into a one-voter cluster first (its majority is gone
    /// for good; docs/operations.md).
    pub force_new_cluster: bool,
}

/// `--cache-listen`, `--metrics-listen`: an address, or `off`.
#[derive(Clone, Debug)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

fn data_err(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::DATA_DIR, e)
}

fn store_err(e: StoreError) -> Failure {
    data_err(e)
}

/// `node check-data`: opens a stopped node's data file as the daemon would and checks
/// every page, the log against the hard state, and the state rows (exit 7 if it fails).
pub fn check_data(data_dir: &Path) -> Result<CheckReport, Failure> {
    let path = datadir::db(data_dir);
    if !path.exists() {
        return Err(data_err(format!("{} does not exist", path.display())));
    }
    let store = blixard_store::Store::open(&path).map_err(store_err)?;
    store.check_with_digest().map_err(store_err)
}

pub async fn run(data_dir: &Path, args: RunArgs) -> Result<(), Failure> {
    // First of all, so that no signal during start-up is lost or, for SIGHUP (a reload
    // right after READY=1), fatal: the streams keep what arrives until `wait` reads it.
    let mut signals = Signals::install()?;
    // The blob store needs an absolute path; a relative --data-dir is the caller's cwd.
    let data_dir = &std::path::absolute(data_dir)
        .map_err(|e| data_err(format!("{}: {e}", data_dir.display())))?;
    let config = settings::load(data_dir, &args)?;
    raise_fd_limit();
    let opened = open::open(data_dir, &config).await?;
    if args.force_new_cluster {
        recover::force_new_cluster(&opened.store, opened.record.as_ref())?;
    }
    let ep = opened.ep.clone();
    let result = async {
        // Joining may wait for a long time; a stop signal ends it (nothing runs yet).
        let (record, seeds) = tokio::select! {
            r = identity::establish(data_dir, &args, &config, &opened) => r?,
            s = signals.stop() => {
                tracing::info!("{s} while starting: stopping");
                opened.ep.close().await;
                return Ok(());
            }
        };
        let store = opened.store.clone();
        let mut running = start::start(data_dir, &config, opened, record, seeds).await?;
        let ended = wait(&mut running, &mut signals).await?;
        let bound = config.shutdown_timeout();
        let removed = matches!(ended, Ended::Removed);
        let stopped = stop(data_dir, running, removed, &store, bound, &mut signals).await;
        match ended {
            Ended::Halted(why) => Err(data_err(format!("raft stopped: {why}"))),
            _ => stopped,
        }
    }
    .await;
    if result.is_err() {
        // Close the endpoint on the way out, so the error stays the one line we print.
        ep.close().await;
    }
    result
}

/// Raises this process's open-file limit to its hard limit. The soft limit (often 1024)
/// is meant for programs that never ask; the daemon holds a descriptor per binary-cache
/// connection (up to `images.cache_max_connections`), per open blob and per VM runner's
/// pipes, and a cache that ran out would refuse connections (it backs off and says so).
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current == now.maximum {
        return;
    }
    let raised = Rlimit {
        current: now.maximum,
        maximum: now.maximum,
    };
    let show = |l: Option<u64>| l.map_or("unlimited".to_string(), |n| n.to_string());
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(
            "open-file limit raised from {} to {}",
            show(now.current),
            show(now.maximum)
        ),
        Err(e) => tracing::warn!(
            "cannot raise the open-file limit from {} to {}: {e}",
            show(now.current),
            show(now.maximum)
        ),
    }
}

/// The signals the daemon acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, Failure> {
        use tokio::signal::unix::{signal, SignalKind};
        let installed = |e: std::io::Error| {
            Failure::new(exit::ERROR, format!("cannot install signal handler: {e}"))
        };
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(installed)?,
            int: signal(SignalKind::interrupt()).map_err(installed)?,
            hup: signal(SignalKind::hangup()).map_err(installed)?,
        })
    }

    /// Waits for SIGTERM or SIGINT; says which.
    async fn stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Why the daemon stops serving.
enum Ended {
    /// SIGTERM or SIGINT.
    Signal,
    /// This node was removed from its cluster.
    Removed,
    /// The raft thread stopped on its own ([`blixard_raft::RaftNode::halted`]): the
    /// daemon shuts down and exits with the reason.
    Halted(String),
}

/// Serves until SIGTERM or SIGINT, until this node is removed from its cluster, or until
/// its raft thread stops; reloads the declared VMs on every SIGHUP meanwhile.
async fn wait(running: &mut Running, signals: &mut Signals) -> Result<Ended, Failure> {
    let mut removed_by_raft = running.node.removed();
    let mut halted = running.node.halted();
    loop {
        tokio::select! {
            _ = signals.term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(Ended::Signal) }
            _ = signals.int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(Ended::Signal) }
            _ = removed_by_raft.wait_for(|r| *r) => return Ok(Ended::Removed),
            _ = running.removed_by_peer.wait_for(|r| *r) => return Ok(Ended::Removed),
            why = halted.wait_for(Option::is_some) => {
                let why = why.map(|w| w.clone().unwrap_or_default()).unwrap_or_default();
                tracing::error!("shutting down: raft stopped: {why}");
                return Ok(Ended::Halted(why));
            }
            _ = signals.hup.recv() => match &running.reload {
                Some(reload) => {
                    tracing::info!("SIGHUP: reading the declared VMs again");
                    // A reload already pending covers this one too.
                    let _ = reload.try_send(());
                }
                None => tracing::info!("SIGHUP: no declared-VM file to reload (vms.declared_file)"),
            },
        }
    }
}

/// Where a shutdown is, for the message when it takes too long.
#[derive(Default)]
struct Step(std::sync::Mutex<&'static str>);

impl Step {
    fn set(&self, step: &'static str) {
        tracing::debug!("shutdown: {step}");
        if let Ok(mut s) = self.0.lock() {
            *s = step;
        }
    }

    fn get(&self) -> &'static str {
        self.0.lock().map(|s| *s).unwrap_or("unknown")
    }
}

/// The shutdown, bounded: done within `bound`, or the daemon exits anyway (exit 1, naming
/// the step it was at); a second SIGTERM or SIGINT exits at once.
async fn stop(
    data_dir: &Path,
    running: Running,
    removed: bool,
    store: &blixard_store::Store,
    bound: std::time::Duration,
    signals: &mut Signals,
) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let step = Step::default();
    let result = tokio::select! {
        r = tokio::time::timeout(bound, shutdown(data_dir, running, removed, store, &step, started + bound, (bound / 4).min(std::time::Duration::from_secs(1)))) => match r {
            Ok(r) => r,
            Err(_) => Err(Failure::new(
                exit::ERROR,
                format!(
                    "the shutdown took longer than {} ms (at: {}); exiting anyway",
                    bound.as_millis(),
                    step.get()
                ),
            )),
        },
        s = signals.stop() => Err(Failure::new(
            exit::ERROR,
            format!("{s} again while stopping (at: {}): exiting at once", step.get()),
        )),
    };
    if result.is_ok() {
        tracing::info!("stopped in {} ms", started.elapsed().as_millis());
    }
    result
}

/// The shutdown order (see the module doc).
async fn shutdown(
    data_dir: &Path,
    running: Running,
    removed: bool,
    store: &blixard_store::Store,
    step: &Step,
    deadline: std::time::Instant,
    after_close: std::time::Duration,
) -> Result<(), Failure> {
    // `after_close` is kept for the steps after closing the connections (blob store,
    // raft, audit, traces); the close gets the rest of the bound.
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // The VMs keep running: a restarted daemon adopts them.
    step.set("stopping the loops");
    for task in &running.tasks {
        task.abort();
    }
    step.set("closing connections and finishing requests");
    // Closing the endpoint waits for peers to acknowledge (QUIC's close): for peers that
    // are gone, until its timeouts (about 3 s). It gets what the bound leaves; then it is
    // given up on, and those peers time the connections out on their side.
    let close_within = left().saturating_sub(after_close);
    let endpoint = running.router.endpoint().clone();
    match tokio::time::timeout(close_within, running.router.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("router shutdown: {e}"),
        Err(_) => {
            tracing::info!(
                "stopped waiting for unreachable peers to acknowledge the close after {} ms",
                close_within.as_millis()
            );
            // The process exits within the bound; the endpoint's unfinished close goes
            // with it. Dropped before, it would abort it and log an error about it.
            std::mem::forget(endpoint);
        }
    }
    step.set("closing the blob store");
    running.image_store.shutdown().await;
    step.set("stopping raft and writing its queue");
    running.node.shutdown();
    let raft_thread = running.raft_thread;
    let _ = tokio::task::spawn_blocking(move || raft_thread.join()).await;
    // Every change raft applied, then every line recorded, goes to disk before the
    // process exits.
    step.set("writing the audit log");
    let _ = running.audit_changes.await;
    running.audit.flush().await;
    step.set("sending the last traces");
    crate::telemetry::flush(left().min(std::time::Duration::from_secs(1))).await;
    let _ = std::fs::remove_file(datadir::node_info(data_dir));
    let record = running.record;
    if removed {
        store
            .set_node_record(&NodeRecord {
                removed: true,
                ..record
            })
            .map_err(store_err)?;
        return Err(data_err(format!(
            "node {} was removed from cluster {}; it has stopped and its data dir cannot rejoin",
            record.node_id, record.cluster_id
        )));
    }
    Ok(())
}
