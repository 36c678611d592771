//! Logs and traces: the `tracing` subscriber every `blixard` process installs, and the
//! export of trace spans over OTLP/HTTP (`[telemetry] otlp_endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`; docs/monitoring.md).
//!
//! Spans that belong in traces use the target [`blixard_net::trace::TARGET`]. The log
//! output never shows them, and they are enabled only once [`start`] has an exporter, so
//! a node that exports nothing pays nothing for them. The subscriber is global and set
//! before the daemon knows who it is (a joining node learns its id from the leader), so
//! the exporter is plugged in later: the tracer provider hands finished spans to a
//! processor that [`start`] installs once, with the node's resource attributes.
//!
//! Trace context crosses nodes in API frames ([`blixard_net::trace`]) and in raft
//! entries ([`EntryTraces`]), so one request is one trace across the cluster.

mod entries;
mod http;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

pub use entries::EntryTraces;

use blixard_net::trace::TARGET;

/// The log filter when `BLIXARD_LOG` is unset.
const DEFAULT_LOG: &str = "info,iroh=warn,noq=warn,noq_proto=warn,raft=info";
/// How long one export may take before it is dropped (the exporter does not retry).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// Set once [`start`] installed an exporter: trace spans are enabled from then on.
static EXPORTING: AtomicBool = AtomicBool::new(false);
/// The batch processor [`start`] installs.
static PROCESSOR: OnceLock<BatchSpanProcessor> = OnceLock::new();
/// The provider the subscriber's tracer belongs to (kept for the process's life).
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Trace export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP endpoint {0:?}: {1}")]
    Endpoint(String, String),
    #[error("cannot start the OTLP exporter: {0}")]
    Exporter(String),
}

/// Installs the process's subscriber: log lines on stderr (filtered by `BLIXARD_LOG`)
/// when `logs`, and the OpenTelemetry layer for trace spans (idle until [`start`]).
/// A second call changes nothing.
pub fn init(logs: bool) {
    use std::io::IsTerminal as _;
    let fmt = logs.then(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("BLIXARD_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
        let filter = match format!("{TARGET}=off").parse() {
            Ok(directive) => filter.add_directive(directive),
            Err(_) => filter,
        };
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_filter(filter)
    });
    let provider = PROVIDER.get_or_init(|| {
        SdkTracerProvider::builder()
            .with_span_processor(Deferred)
            .build()
    });
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("blixard"))
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target() == TARGET && EXPORTING.load(Ordering::Relaxed)
        }));
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
}

/// Where traces go: the OTLP/HTTP URL spans are posted to, from the configured base
/// endpoint (`/v1/traces` appended, as for `OTEL_EXPORTER_OTLP_ENDPOINT`), else from the
/// standard environment variables; `None` when none is set (no traces).
pub fn traces_url(configured: Option<&str>) -> Option<String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let base = |b: String| format!("{}/v1/traces", b.trim_end_matches('/'));
    configured
        .map(|b| base(b.to_string()))
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT").map(base))
}

/// Checks a configured endpoint: an `http://` URL with a host (TLS is a collector's job
/// on the same host; docs/monitoring.md).
pub fn check_endpoint(endpoint: &str) -> Result<(), TelemetryError> {
    http::target(endpoint)
        .map(|_| ())
        .map_err(|e| TelemetryError::Endpoint(endpoint.to_string(), e))
}

/// Who exports: the standard resource attributes.
#[derive(Clone, Debug)]
pub struct Service {
    /// `service.name`: `blixard` for nodes, `blixard-cli` for the CLI.
    pub name: &'static str,
    /// `service.instance.id`: the node id (`n3`); none for the CLI.
    pub instance: Option<String>,
}

/// Turns trace spans on, exporting them to `url` (from [`traces_url`]) when given; a
/// second call changes nothing. Without a `url` spans still get trace ids and carry
/// them to the nodes called (`blixard --trace` with no endpoint of its own). Needs a
/// tokio runtime: exports run on it.
pub fn start(url: Option<&str>, service: Service) -> Result<(), TelemetryError> {
    let Some(url) = url else {
        enable();
        return Ok(());
    };
    if PROCESSOR.get().is_some() {
        return Ok(());
    }
    check_endpoint(url)?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http::Client::new(runtime, EXPORT_TIMEOUT))
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let mut attributes = vec![KeyValue::new("host.name", host_name())];
    if let Some(id) = service.instance {
        attributes.push(KeyValue::new("service.instance.id", id));
    }
    let resource = Resource::builder()
        .with_service_name(service.name)
        .with_attributes(attributes)
        .build();
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    processor.set_resource(&resource);
    if PROCESSOR.set(processor).is_ok() {
        enable();
        tracing::info!(url, "exporting traces");
    }
    Ok(())
}

fn enable() {
    EXPORTING.store(true, Ordering::Relaxed);
    // Callsites already seen were disabled: check them again.
    tracing::callsite::rebuild_interest_cache();
}

/// Sends the spans still queued, waiting at most `bound` (at shutdown, and at the end of
/// a CLI command).
pub async fn flush(bound: Duration) {
    let Some(processor) = PROCESSOR.get() else {
        return;
    };
    // The processor's flush blocks until its thread has exported, which runs the
    // export on this runtime: off the async workers.
    let flushed = tokio::task::spawn_blocking(move || processor.force_flush());
    match tokio::time::timeout(bound, flushed).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!("could not send the last traces: {e}"),
        Ok(Err(e)) => tracing::warn!("could not send the last traces: {e}"),
        Err(_) => tracing::warn!(
            "the last traces were not sent within {} ms",
            bound.as_millis()
        ),
    }
}

/// The outcome of trace exports (`blixard_trace_exports_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExportLabels {
    outcome: &'static str,
}

static EXPORTS: LazyLock<Family<ExportLabels, Counter>> = LazyLock::new(Family::default);
/// When a failed export was last logged.
static WARNED: Mutex<Option<Instant>> = Mutex::new(None);
/// At most one warning about failing exports per this interval.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Counts one export (a batch of spans posted to the collector), and logs a failure
/// (at most once a minute: a collector that is down fails every batch).
fn exported(result: Result<(), String>) {
    let outcome = if result.is_ok() { "ok" } else { "failed" };
    EXPORTS.get_or_create(&ExportLabels { outcome }).inc();
    if let Err(e) = result {
        let Ok(mut last) = WARNED.lock() else { return };
        if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!("exporting traces failed (spans of this batch are lost): {e}");
        }
    }
}

/// Registers `trace_exports` (under the caller's `blixard` prefix).
pub fn register_metrics(r: &mut prometheus_client::registry::Registry) {
    for outcome in ["ok", "failed"] {
        let _ = EXPORTS.get_or_create(&ExportLabels { outcome });
    }
    r.register(
        "trace_exports",
        "Batches of trace spans sent to the OTLP endpoint, by outcome (failed: the batch is lost)",
        EXPORTS.clone(),
    );
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The provider's processor: hands spans to the one [`start`] installed, if any.
#[derive(Debug)]
struct Deferred;

impl SpanProcessor for Deferred {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        if let Some(p) = PROCESSOR.get() {
            p.on_start(span, cx);
        }
    }

    fn on_end(&self, span: SpanData) {
        if let Some(p) = PROCESSOR.get() {
            p.on_end(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        PROCESSOR
            .get()
            .map_or(Ok(()), BatchSpanProcessor::force_flush)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        PROCESSOR
            .get()
            .map_or(Ok(()), |p| p.shutdown_with_timeout(timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_comes_from_the_config_first_and_gets_its_path() {
        assert_eq!(
            traces_url(Some("http://collector:4318/")).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert!(check_endpoint("http://collector:4318/v1/traces").is_ok());
        for bad in [
            "https://collector:4318",
            "collector:4318",
            "http://",
            "ftp://x",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
