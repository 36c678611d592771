//! The node's metrics: one Prometheus registry with every family the node exports
//! (`docs/monitoring.md` lists them), served on `[metrics] listen` at `GET /metrics`
//! ([`http`]), and read by `blixard node stats` ([`stats`]).
//!
//! Two kinds of figures: counters and histograms that the code paths update as they go
//! (the raft thread, the API's choke point, the binary cache, the host agent, image
//! fetches), and gauges read from cluster state and the process when scraped
//! ([`collect`]). Labels stay low-cardinality: request kinds, phases, tenants, member
//! roles and peers' node ids; never VM names or request ids.

mod collect;
pub mod http;
mod process;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blixard_authz::DecisionCounts;
use blixard_images::cache::CacheMetrics;
use blixard_net::metrics::ApiMetrics;
use blixard_net::raft_transport::Links;
use blixard_raft::RaftNode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::audit::AuditLog;

/// The metrics the node's code paths update. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct NodeMetrics {
    pub api: ApiMetrics,
    pub cache: CacheMetrics,
    pub images: ImageMetrics,
    pub vms: VmMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Image pulls on this node.
#[derive(Clone, Debug)]
pub struct ImageMetrics {
    fetch_bytes: Family<SourceLabels, Counter>,
    fetch_duration: Histogram,
}

impl Default for ImageMetrics {
    fn default() -> Self {
        Self {
            fetch_bytes: Family::default(),
            // 10 ms to ~20 min.
            fetch_duration: Histogram::new(exponential_buckets(0.01, 2.0, 17)),
        }
    }
}

impl ImageMetrics {
    /// One pull of an image of `total` bytes, of which `fetched` came from peers (the rest
    /// was here already), taking `took` to fetch (zero when nothing was fetched).
    pub fn pulled(&self, total: u64, fetched: u64, took: Option<Duration>) {
        self.fetch_bytes
            .get_or_create(&SourceLabels { source: "peer" })
            .inc_by(fetched);
        self.fetch_bytes
            .get_or_create(&SourceLabels { source: "local" })
            .inc_by(total.saturating_sub(fetched));
        if let Some(took) = took {
            self.fetch_duration.observe(took.as_secs_f64());
        }
    }

    fn register(&self, r: &mut Registry) {
        // Both sources from the start, so a rate over them is defined before a pull.
        for source in ["peer", "local"] {
            let _ = self.fetch_bytes.get_or_create(&SourceLabels { source });
        }
        r.register(
            "image_fetch_bytes",
            "Bytes of images pulled to this node, by where they came from (peer: fetched from other nodes; local: already here)",
            self.fetch_bytes.clone(),
        );
        r.register(
            "image_fetch_duration_seconds",
            "Time to fetch an image's missing blobs from its holders",
            self.fetch_duration.clone(),
        );
    }
}

/// The host agent's starts and rounds.
#[derive(Clone, Debug)]
pub struct VmMetrics {
    starts: Family<OutcomeLabels, Counter>,
    restarts: Counter,
    start_duration: Histogram,
    reconcile_duration: Histogram,
}

impl Default for VmMetrics {
    fn default() -> Self {
        Self {
            starts: Family::default(),
            restarts: Counter::default(),
            // 50 ms to ~30 min: a first start includes the image's fetch.
            start_duration: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            // 0.1 ms to ~3 s.
            reconcile_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
        }
    }
}

impl VmMetrics {
    /// A runner start: exec'd or not; a restart; for a first start, the time since the
    /// VM was created.
    pub fn started(&self, ok: bool, restart: bool, since_create: Option<Duration>) {
        let outcome = if ok { "ok" } else { "failed" };
        self.starts.get_or_create(&OutcomeLabels { outcome }).inc();
        if ok && restart {
            self.restarts.inc();
        }
        if let (true, false, Some(d)) = (ok, restart, since_create) {
            self.start_duration.observe(d.as_secs_f64());
        }
    }

    /// Runner starts that were exec'd, and that failed.
    pub fn totals(&self) -> (u64, u64) {
        let get = |outcome| {
            self.starts
                .get(&OutcomeLabels { outcome })
                .map_or(0, |c| c.get())
        };
        (get("ok"), get("failed"))
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    fn register(&self, r: &mut Registry) {
        for outcome in ["ok", "failed"] {
            let _ = self.starts.get_or_create(&OutcomeLabels { outcome });
        }
        r.register(
            "vm_starts",
            "VM runner starts on this host, by outcome (ok: exec'd; failed: could not be started)",
            self.starts.clone(),
        );
        r.register(
            "vm_restarts",
            "VM runners started again on this host after an exit or a restart request",
            self.restarts.clone(),
        );
        r.register(
            "vm_start_duration_seconds",
            "Time from a VM's creation being accepted to its runner being exec'd (first starts)",
            self.start_duration.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time of one round of the host agent's reconciler",
            self.reconcile_duration.clone(),
        );
    }
}

/// What the scrape-time gauges read.
#[derive(Clone)]
pub struct Sources {
    pub node: RaftNode,
    pub links: Links,
    pub decisions: Arc<DecisionCounts>,
    pub audit: Arc<AuditLog>,
    pub data_dir: PathBuf,
}

/// The registry of everything the node exports: the `blixard_` families and the
/// standard process collector's `process_` ones.
pub fn registry(metrics: &NodeMetrics, sources: Arc<Sources>) -> Registry {
    let mut root = Registry::default();
    {
        let r = root.sub_registry_with_prefix("blixard");
        sources.node.metrics().register(r);
        metrics.api.register(r);
        metrics.cache.register(r);
        metrics.images.register(r);
        metrics.vms.register(r);
        crate::telemetry::register_metrics(r);
        r.register_collector(Box::new(collect::State::new(sources)));
    }
    root.register_collector(Box::new(process::Process));
    root
}
