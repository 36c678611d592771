//! The API client: used by the CLI, by nodes to forward requests to the leader, and by
//! joining nodes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use blixard_core::{ClusterId, RequestId};
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr, EndpointId};
use tracing::Instrument as _;

use crate::api::{
    ApiError, ProgressSink, ProgressUpdate, Request, RequestFrame, ResponseFrame, ResponseItem, Rpc,
};
use crate::frame;
use crate::API_ALPN;

/// How long a request's bytes may go unacknowledged by the peer's QUIC stack (which
/// acknowledges within its ack delay, 25 ms, busy or not) before the connection is taken
/// for one to a process that is gone: killed, or restarted (its successor drops the old
/// connection's packets without a word, and QUIC itself would notice only at its idle
/// timeout, [`crate::endpoint::IDLE_TIMEOUT_SECS`]). The request is then sent again on a
/// new connection ([`ApiClient`]'s retry rules).
pub const UNACKED: Duration = Duration::from_secs(1);

/// The close code of a connection dropped because the peer did not acknowledge a request.
const SILENT_CODE: u32 = 3;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach node {node}: {detail}")]
    Connect { node: String, detail: String },
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("protocol error talking to {node}: {detail}")]
    Protocol { node: String, detail: String },
    #[error("no answer from {node} within {ms} ms")]
    Timeout { node: String, ms: u64 },
    /// The peer did not acknowledge the request within [`UNACKED`]: its process is gone.
    /// The request did not reach it, or reached a process that is gone now.
    #[error("node {node} did not acknowledge the request within {} ms", UNACKED.as_millis())]
    Silent { node: String },
}

/// Calls the API of other nodes, reusing one connection per node.
#[derive(Debug)]
pub struct ApiClient {
    endpoint: Endpoint,
    cluster: Option<ClusterId>,
    timeout: Duration,
    conns: Mutex<HashMap<EndpointId, Connection>>,
}

impl ApiClient {
    pub fn new(endpoint: Endpoint, cluster: Option<ClusterId>, timeout: Duration) -> Self {
        Self {
            endpoint,
            cluster,
            timeout,
            conns: Mutex::new(HashMap::new()),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends a typed request and returns its typed response.
    pub async fn call<R: Rpc>(
        &self,
        to: &EndpointAddr,
        request: R,
    ) -> Result<R::Response, ClientError> {
        self.call_with_progress(to, request, |_| {}).await
    }

    /// Like [`ApiClient::call`], handing progress updates of a long-running request to
    /// `on_progress` as they arrive.
    pub async fn call_with_progress<R: Rpc>(
        &self,
        to: &EndpointAddr,
        request: R,
        on_progress: impl FnMut(&ProgressUpdate) + Send,
    ) -> Result<R::Response, ClientError> {
        let mut frame = RequestFrame::new(self.cluster, request.into());
        if crate::authz::is_mutating(&frame.request) {
            frame.id = Some(RequestId(rand::random()));
        }
        let response = self.exchange_retrying(to, frame, on_progress).await??;
        R::from_response(response).ok_or_else(|| ClientError::Protocol {
            node: to.id.fmt_short().to_string(),
            detail: "response of the wrong kind".into(),
        })
    }

    /// Forwards a request (node to leader, or to the node a pull is for) under the
    /// caller's request id, passing its progress on.
    pub async fn forward(
        &self,
        to: &EndpointAddr,
        request: Request,
        id: Option<RequestId>,
        progress: &ProgressSink,
    ) -> Result<ResponseFrame, ClientError> {
        let span = tracing::info_span!(
            target: crate::trace::TARGET,
            "forward",
            otel.name = %format_args!("forward {}", request.kind()),
            otel.kind = "client",
            blixard.to = %to.id.fmt_short(),
        );
        let mut frame = span.in_scope(|| RequestFrame::new(self.cluster, request));
        frame.forwarded = true;
        frame.id = id;
        self.exchange(to, frame, &mut |p| {
            progress.report(&p.phase, p.done, p.total)
        })
        .instrument(span)
        .await
    }

    async fn connection(&self, to: &EndpointAddr) -> Result<Connection, ClientError> {
        if let Ok(conns) = self.conns.lock() {
            if let Some(c) = conns.get(&to.id) {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
            }
        }
        let node = to.id.fmt_short().to_string();
        // Connected on a task of its own: the connection's tasks outlive this request and
        // would otherwise keep its trace span (the caller's) open for their whole life.
        let (endpoint, addr) = (self.endpoint.clone(), to.clone());
        let connect = tokio::spawn(async move { endpoint.connect(addr, API_ALPN).await });
        let conn = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| ClientError::Timeout {
                node: node.clone(),
                ms: self.timeout.as_millis() as u64,
            })?
            .map_err(|e| ClientError::Connect {
                node: node.clone(),
                detail: e.to_string(),
            })?
            .map_err(|e| ClientError::Connect {
                node,
                detail: e.to_string(),
            })?;
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(to.id, conn.clone());
        }
        Ok(conn)
    }

    /// Sends a framed request and returns the answer, ignoring progress.
    pub async fn call_frame(
        &self,
        to: &EndpointAddr,
        request: RequestFrame,
    ) -> Result<ResponseFrame, ClientError> {
        self.exchange(to, request, &mut |_| {}).await
    }

    /// [`Self::exchange`], sent again under the same request id while the answer is
    /// ambiguous (no answer, a broken connection, no leader) and the client's timeout
    /// allows: the cluster applies the write once, and a retry of an applied write
    /// gets the first one's result. Requests without an id are sent once.
    async fn exchange_retrying(
        &self,
        to: &EndpointAddr,
        request: RequestFrame,
        mut on_progress: impl FnMut(&ProgressUpdate) + Send,
    ) -> Result<ResponseFrame, ClientError> {
        let started = std::time::Instant::now();
        // Retries stay within the caller's own timeout, also for long-running requests.
        let budget = self.timeout;
        let mut pause = Duration::from_millis(100);
        // A write whose outcome one attempt left unknown stays unknown: a later "no
        // leader" says only that the later attempt did nothing.
        let mut unknown: Option<Result<ResponseFrame, ClientError>> = None;
        loop {
            let mut result = self.exchange(to, request.clone(), &mut on_progress).await;
            if request.id.is_some() {
                match &result {
                    Ok(Err(ApiError::Timeout(_) | ApiError::OutcomeUnknown(_)))
                    | Err(ClientError::Timeout { .. } | ClientError::Silent { .. }) => {
                        unknown = Some(result.clone());
                    }
                    Ok(Err(ApiError::NoLeader)) => {
                        if let Some(u) = &unknown {
                            result = u.clone();
                        }
                    }
                    _ => {}
                }
            }
            // Ambiguous: the request may not have arrived, its answer was lost, or the
            // cluster had no leader to apply it. Any other error is the request's answer.
            let ambiguous = matches!(
                &result,
                Err(ClientError::Connect { .. }
                    | ClientError::Protocol { .. }
                    | ClientError::Silent { .. })
                    | Ok(Err(ApiError::Timeout(_)
                        | ApiError::NoLeader
                        | ApiError::OutcomeUnknown(_)))
            );
            // A request the peer never acknowledged is sent again on a new connection,
            // reads too: the peer may have restarted, and a read changes nothing.
            let again = if request.id.is_some() {
                ambiguous
            } else {
                matches!(result, Err(ClientError::Silent { .. }))
            };
            if !again || started.elapsed() + pause >= budget {
                return result;
            }
            tracing::debug!(id = ?request.id, "no clear answer; sending the write again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// How long one request may take.
    fn timeout_for(&self, request: &RequestFrame) -> Duration {
        if request.request.is_long_running() {
            self.timeout.max(crate::api::LONG_REQUEST)
        } else {
            self.timeout
        }
    }

    async fn exchange(
        &self,
        to: &EndpointAddr,
        request: RequestFrame,
        on_progress: &mut (dyn FnMut(&ProgressUpdate) + Send),
    ) -> Result<ResponseFrame, ClientError> {
        let node = to.id.fmt_short().to_string();
        let timeout = self.timeout_for(&request);
        let ms = timeout.as_millis() as u64;
        let attempt = async {
            let conn = self.connection(to).await?;
            let protocol = |e: frame::FrameError| ClientError::Protocol {
                node: node.clone(),
                detail: e.to_string(),
            };
            let (mut send, recv) = conn.open_bi().await.map_err(|e| ClientError::Connect {
                node: node.clone(),
                detail: e.to_string(),
            })?;
            frame::write(&mut send, &request).await.map_err(protocol)?;
            let _ = send.finish();
            let limit = match request.request {
                Request::ClusterBackup(_) => frame::MAX_BACKUP_FRAME,
                _ => frame::MAX_FRAME,
            };
            let mut recv = frame::Reader::with_limit(recv, limit);
            let answer = async {
                loop {
                    match recv.read::<ResponseItem>().await.map_err(protocol)? {
                        ResponseItem::Progress(p) => on_progress(&p),
                        ResponseItem::Done(answer) => return Ok(answer),
                    }
                }
            };
            // Once the peer acknowledged the request (or stopped the stream, or the
            // connection failed: the read says how), only the answer is awaited.
            let unacked = async {
                if tokio::time::timeout(UNACKED, send.stopped()).await.is_ok() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                r = answer => r,
                () = unacked => {
                    tracing::debug!(peer = %node, "request not acknowledged; dropping the connection");
                    conn.close(SILENT_CODE.into(), b"request not acknowledged");
                    Err(ClientError::Silent { node: node.clone() })
                }
            }
        };
        // The server applies the request timeout itself; allow a little more here.
        match tokio::time::timeout(timeout + Duration::from_secs(2), attempt).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout { node, ms }),
        }
    }
}
