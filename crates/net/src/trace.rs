//! Trace context across nodes: the W3C `traceparent` of the current span, as it travels
//! in API frames (the request frame's `trace`) and raft entries, and spans made children
//! of one that came over the wire.
//!
//! Spans that belong in traces use the target [`TARGET`]: the log output leaves them out
//! (its lines stay as they were), and the OpenTelemetry layer, when the node exports
//! traces, takes them (see `blixard_node::telemetry`). Without that layer every function
//! here is a cheap no-op: spans are disabled and no context is sent.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The `tracing` target of every span that is part of a trace.
pub const TARGET: &str = "blixard_trace";

/// The longest `traceparent` accepted from the wire (version 00 is 55 bytes; later
/// versions may append fields).
pub const MAX_TRACEPARENT: usize = 256;

/// The current span's context as a W3C `traceparent`, when it belongs to a sampled trace.
pub fn current() -> Option<String> {
    traceparent(&tracing::Span::current())
}

/// `span`'s context as a W3C `traceparent`, when it belongs to a sampled trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The trace id of `span`'s trace (32 hex digits), when it has one.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Makes `span` a child of the remote span `traceparent` names. A malformed or oversized
/// value is ignored (the span starts a trace of its own), as W3C Trace Context asks.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(value) = traceparent.filter(|v| v.len() <= MAX_TRACEPARENT) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_string(), value.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        // Fails only for a span no layer records: then there is nothing to parent.
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_exporting_layer_nothing_is_sent_or_parented() {
        let span = tracing::info_span!(target: TARGET, "test");
        assert_eq!(traceparent(&span), None);
        assert_eq!(trace_id(&span), None);
        // Malformed and oversized values are ignored, never a panic.
        set_parent(&span, Some("not a traceparent"));
        set_parent(&span, Some(&"0".repeat(MAX_TRACEPARENT + 1)));
        set_parent(
            &span,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        assert_eq!(current(), None);
    }
}
