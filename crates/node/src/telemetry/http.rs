//! The OTLP exporter's HTTP client: one HTTP/1.1 request per batch over a fresh TCP
//! connection, run on the daemon's tokio runtime.
//!
//! Why not `opentelemetry-http`'s hyper client: the batch span processor exports from
//! its own thread with a plain `block_on`, where a tokio-based client finds no runtime;
//! this one spawns the request onto the runtime and waits for the task, which works
//! from any thread. It also keeps HTTP/2 (and `h2`) out of the build: a batch every few
//! seconds needs neither pooling nor multiplexing.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};

/// The most of a collector's answer that is read.
const MAX_ANSWER: usize = 1024 * 1024;

#[derive(Debug)]
pub(super) struct Client {
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl Client {
    pub(super) fn new(runtime: tokio::runtime::Handle, timeout: Duration) -> Self {
        Self { runtime, timeout }
    }
}

/// Where a request for `url` goes: its `host:port` (port 80 by default).
pub(super) fn target(url: &str) -> Result<String, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// endpoints are supported (run a collector for TLS)".into());
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or("no host")?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(80)))
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let timeout = self.timeout;
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, send(request)).await });
        let answer = match task.await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(format!("no answer within {} ms", timeout.as_millis()).into()),
            Err(e) => Err(Box::new(e) as HttpError),
        };
        match &answer {
            Ok(a) if a.status().is_success() => super::exported(Ok(())),
            Ok(a) => super::exported(Err(format!("the collector answered {}", a.status()))),
            Err(e) => super::exported(Err(e.to_string())),
        }
        answer
    }
}

async fn send(request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
    let (mut parts, body) = request.into_parts();
    let to = target(&parts.uri.to_string())?;
    let stream = tokio::net::TcpStream::connect(&to).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    // HTTP/1.1 wants the origin form and a Host header.
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()?;
    parts.uri = path;
    parts.headers.insert(hyper::header::HOST, to.parse()?);
    let answer = sender
        .send_request(hyper::Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = answer.into_parts();
    let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
    conn.abort();
    Ok(Response::from_parts(parts, body))
}
