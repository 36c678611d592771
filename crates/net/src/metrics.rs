//! The API's metrics: `blixard_api_requests_total{kind,outcome}` and
//! `blixard_api_request_duration_seconds{kind}`, counted at the choke point (the
//! server's `answer`) for every request that reaches authorization, from the network or
//! from the node's own configuration. Labels are the request kind (the [`Request`] variant,
//! a fixed set) and the outcome ([`ApiError::code`] or `ok`): no names, no ids.
//!
//! [`Request`]: crate::api::Request

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::api::ApiError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

fn request_histogram() -> Histogram {
    // 0.5 ms to ~65 s: reads answer in milliseconds, image imports take minutes.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// The API's request counters and latency histograms. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    /// Totals across kinds, for `node stats`.
    ok: Counter,
    failed: Counter,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(request_histogram),
            ok: Counter::default(),
            failed: Counter::default(),
        }
    }
}

impl ApiMetrics {
    /// Counts one answered request of `kind` that took `seconds`.
    pub fn observe<T>(&self, kind: &'static str, result: &Result<T, ApiError>, seconds: f64) {
        let outcome = match result {
            Ok(_) => {
                self.ok.inc();
                "ok"
            }
            Err(e) => {
                self.failed.inc();
                e.code()
            }
        };
        self.requests
            .get_or_create(&RequestLabels { kind, outcome })
            .inc();
        self.duration
            .get_or_create(&KindLabels { kind })
            .observe(seconds);
    }

    /// Requests answered with a result, and with an error, since the node started.
    pub fn totals(&self) -> (u64, u64) {
        (self.ok.get(), self.failed.get())
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "api_requests",
            "API requests answered, by request kind and outcome (ok or the error's code)",
            self.requests.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "Time from authorization to the answer of an API request, by request kind",
            self.duration.clone(),
        );
    }
}
