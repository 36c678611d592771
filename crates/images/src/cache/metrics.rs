//! The binary cache's metrics: `blixard_cache_requests_total{kind,code}` and
//! `blixard_cache_sent_bytes_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    kind: &'static str,
    code: u16,
}

/// Requests answered by kind and status, and NAR bytes sent. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    requests: Family<Labels, Counter>,
    pub(super) sent_bytes: Counter,
}

/// The kind of a request path, as the `kind` label names it: a fixed set.
pub(super) fn kind_of(path: &str) -> &'static str {
    if path == "/nix-cache-info" {
        "cache_info"
    } else if path.ends_with(".narinfo") {
        "narinfo"
    } else if path.starts_with("/nar/") {
        "nar"
    } else {
        "other"
    }
}

impl CacheMetrics {
    pub(super) fn request(&self, kind: &'static str, code: u16) {
        self.requests.get_or_create(&Labels { kind, code }).inc();
    }

    /// NAR bytes sent since the node started.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.get()
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cache_requests",
            "Binary cache requests answered, by kind (cache_info, narinfo, nar, other, refused) and HTTP status",
            self.requests.clone(),
        );
        registry.register(
            "cache_sent_bytes",
            "NAR bytes the binary cache handed to its clients",
            self.sent_bytes.clone(),
        );
    }
}
