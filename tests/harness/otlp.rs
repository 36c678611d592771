//! A small OTLP/HTTP trace receiver, as a collector would be: it takes `POST /v1/traces`
//! with a protobuf `ExportTraceServiceRequest`, decodes it with the OpenTelemetry protobuf
//! definitions, answers 200, and keeps every span with its resource's attributes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message as _;

/// One received span.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a trace's root.
    pub parent: String,
    pub name: String,
    /// The resource's `service.name`, `service.instance.id`, `host.name`.
    pub service: String,
    pub instance: Option<String>,
    pub host: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Requests refused (wrong path or type, undecodable body).
    refused: Vec<String>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    received: Arc<Mutex<Received>>,
}

impl Receiver {
    /// Listens on an ephemeral loopback port, serving each connection on a thread.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let shared = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &shared);
                });
            }
        });
        Self { addr, received }
    }

    /// The base endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` style).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// How many spans have arrived.
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().spans.len()
    }

    pub fn refused(&self) -> Vec<String> {
        self.received.lock().unwrap().refused.clone()
    }
}

fn serve(stream: TcpStream, received: &Mutex<Received>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request = line.trim().to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        let ok = request.starts_with("POST /v1/traces ")
            && headers.get("content-type").map(String::as_str) == Some("application/x-protobuf");
        let decoded = ok
            .then(|| ExportTraceServiceRequest::decode(&body[..]).ok())
            .flatten();
        let status = match decoded {
            Some(export) => {
                received.lock().unwrap().spans.extend(spans_of(export));
                "200 OK"
            }
            None => {
                received
                    .lock()
                    .unwrap()
                    .refused
                    .push(format!("{request} {headers:?} ({len} bytes)"));
                "400 Bad Request"
            }
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        )?;
        out.flush()?;
    }
}

fn text(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn spans_of(export: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in export.resource_spans {
        let resource = text(&rs.resource.map(|r| r.attributes).unwrap_or_default());
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    name: s.name.clone(),
                    service: resource.get("service.name").cloned().unwrap_or_default(),
                    instance: resource.get("service.instance.id").cloned(),
                    host: resource.get("host.name").cloned(),
                    attributes: text(&s.attributes),
                });
            }
        }
    }
    out
}
