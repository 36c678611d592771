//! The `blixard/api/1` server: reads a request, passes it through the choke point, hands
//! it to the node's [`Service`], and writes the answer.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blixard_core::{ClusterId, EndpointKey};
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, ProgressSink, RequestFrame, ResponseFrame, ResponseItem, API_VERSION};
use crate::authz::{authorize, is_mutating, Decision, Lookup, Principal};
use crate::frame::{self, FrameError};
use crate::key_of;

/// One audited event: an authorization decision for a mutating request, and its outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AuditEvent {
    pub principal: String,
    pub key: String,
    pub request: &'static str,
    pub decision: Decision,
    /// `None` when the request was refused before it ran; else "ok" or the error.
    pub outcome: Option<String>,
}

/// What a node does with authorized requests.
pub trait Service: Lookup + Send + Sync + 'static {
    /// The cluster this node belongs to.
    fn cluster_id(&self) -> Option<ClusterId>;
    /// Who the caller is, from its authenticated key.
    fn principal(&self, caller: &EndpointKey) -> Principal;
    /// The policies in force.
    fn authorizer(&self) -> Arc<blixard_authz::Authorizer>;
    /// Records an audited event.
    fn audit(&self, event: AuditEvent);
    /// Handles an authorized request; long-running ones report through `progress`.
    fn handle(
        &self,
        principal: Principal,
        frame: RequestFrame,
        progress: ProgressSink,
    ) -> impl Future<Output = ResponseFrame> + Send;
}

/// The most requests handled at once per node.
const MAX_IN_FLIGHT: u32 = 1024;

/// The protocol handler registered for [`crate::API_ALPN`].
pub struct ApiHandler<S> {
    service: Arc<S>,
    timeout: Duration,
    /// How long a shutdown lets requests in flight finish before it cancels them.
    grace: Duration,
    in_flight: Arc<Semaphore>,
    closing: Arc<AtomicBool>,
    /// Cancels the requests still in flight when the grace is over.
    cancel: CancellationToken,
}

impl<S> std::fmt::Debug for ApiHandler<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiHandler").finish_non_exhaustive()
    }
}

impl<S: Service> ApiHandler<S> {
    /// Serves `service`, each request within `timeout`; a shutdown lets requests in
    /// flight finish for up to `grace`, then answers them "shutting down".
    pub fn new(service: Arc<S>, timeout: Duration, grace: Duration) -> Self {
        Self {
            service,
            timeout,
            grace,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize)),
            closing: Arc::new(AtomicBool::new(false)),
            cancel: CancellationToken::new(),
        }
    }
}

impl<S: Service> ProtocolHandler for ApiHandler<S> {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let caller = key_of(&conn.remote_id());
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(streams) => streams,
                Err(_) => return Ok(()),
            };
            if self.closing.load(Ordering::Relaxed) {
                return Ok(());
            }
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return Ok(());
            };
            let service = self.service.clone();
            let timeout = self.timeout;
            let cancel = self.cancel.clone();
            tokio::spawn(async move {
                serve_stream(service, caller, send, recv, timeout, cancel).await;
                drop(permit);
            });
        }
    }

    /// Stops taking requests, lets those in flight finish for up to the grace, then
    /// answers the rest "shutting down" (a long image pull, say) and waits for them to go.
    async fn shutdown(&self) {
        self.closing.store(true, Ordering::Relaxed);
        let all = || self.in_flight.acquire_many(MAX_IN_FLIGHT);
        if tokio::time::timeout(self.grace, all()).await.is_ok() {
            return;
        }
        let left = MAX_IN_FLIGHT as usize - self.in_flight.available_permits();
        tracing::info!(
            "shutdown: cancelling {left} request(s) still running after {:?}",
            self.grace
        );
        self.cancel.cancel();
        // Each answers at once; its caller gets a moment to read the answer.
        let _ = tokio::time::timeout(Duration::from_secs(1), all()).await;
    }
}

async fn serve_stream<S: Service>(
    service: Arc<S>,
    caller: EndpointKey,
    mut send: SendStream,
    recv: RecvStream,
    timeout: Duration,
    cancel: CancellationToken,
) {
    let mut recv = frame::Reader::new(recv);
    let work = serve_request(&*service, caller, &mut send, &mut recv, timeout);
    let response = tokio::select! {
        r = work => match r {
            Some(r) => r,
            None => return,
        },
        _ = cancel.cancelled() => Err(ApiError::Unavailable("the node is shutting down".into())),
    };
    if let Err(e) = &response {
        tracing::debug!(%caller, "request failed: {e}");
    }
    if let Err(e) = frame::write(&mut send, &ResponseItem::Done(response)).await {
        tracing::debug!(%caller, "could not answer: {e}");
    }
    let _ = send.finish();
    // Let the peer read the answer before the stream is dropped (not past a shutdown).
    let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped());
    tokio::select! {
        _ = stopped => {}
        _ = cancel.cancelled() => {}
    }
}

/// Reads one request and answers it, sending progress as it goes; `None` when the caller
/// closed the stream without a request.
async fn serve_request<S: Service>(
    service: &S,
    caller: EndpointKey,
    send: &mut SendStream,
    recv: &mut frame::Reader<RecvStream>,
    timeout: Duration,
) -> Option<ResponseFrame> {
    let response = match tokio::time::timeout(timeout, recv.read::<RequestFrame>()).await {
        Err(_) => Err(ApiError::Timeout(timeout.as_millis() as u64)),
        Ok(Err(FrameError::Closed)) => return None,
        Ok(Err(e)) => Err(ApiError::BadRequest(e.to_string())),
        // Short requests report no progress: no channel, no second task on the hot path.
        Ok(Ok(frame)) if !frame.request.is_long_running() => {
            dispatch(service, caller, frame, timeout, ProgressSink::none()).await
        }
        Ok(Ok(frame)) => {
            // Progress updates go out while the request runs.
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            let work = dispatch(service, caller, frame, timeout, ProgressSink::new(tx));
            tokio::pin!(work);
            loop {
                tokio::select! {
                    r = &mut work => break r,
                    Some(update) = rx.recv() => {
                        let item = ResponseItem::Progress(update);
                        if frame::write(send, &item).await.is_err() {
                            tracing::debug!(%caller, "caller gone while its request runs");
                        }
                    }
                }
            }
        }
    };
    Some(response)
}

/// The choke point: version, cluster and authorization checks, then the handler.
async fn dispatch<S: Service>(
    service: &S,
    caller: EndpointKey,
    frame: RequestFrame,
    timeout: Duration,
    progress: ProgressSink,
) -> ResponseFrame {
    if frame.version != API_VERSION {
        return Err(ApiError::Version(frame.version));
    }
    if let (Some(expected), Some(actual)) = (frame.cluster, service.cluster_id()) {
        if expected != actual {
            return Err(ApiError::WrongCluster {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
    }
    let principal = service.principal(&caller);
    call(service, principal, frame, timeout, progress).await
}

/// The choke point for a caller already known: authorization (the request kind names one
/// Cedar action and one resource, the cluster's policies decide), an audit record of the
/// decision and outcome for mutating requests, then the handler, within `timeout` (an
/// hour for long-running requests). Requests from the network come here once their
/// caller's key is mapped to a principal; in-process callers (a host's own
/// configuration) come here directly. There is no other way into [`Service::handle`].
pub async fn call<S: Service>(
    service: &S,
    principal: Principal,
    frame: RequestFrame,
    timeout: Duration,
    progress: ProgressSink,
) -> ResponseFrame {
    let caller = *principal.key();
    let context = blixard_authz::RequestContext::now(caller.to_string());
    let authorizer = service.authorizer();
    let decision = authorize(
        &authorizer,
        &principal,
        &frame.request,
        frame.forwarded,
        &context,
        service,
    )?;
    let kind = frame.request.kind();
    let audited = is_mutating(&frame.request);
    let event = |outcome: Option<String>| AuditEvent {
        principal: principal.to_string(),
        key: caller.to_string(),
        request: kind,
        decision: decision.clone(),
        outcome,
    };
    if !decision.allowed {
        if audited {
            service.audit(event(None));
        }
        return Err(decision.refusal(&principal));
    }
    tracing::debug!(%principal, kind, "request");
    let timeout = if frame.request.is_long_running() {
        timeout.max(crate::api::LONG_REQUEST)
    } else {
        timeout
    };
    let result =
        match tokio::time::timeout(timeout, service.handle(principal.clone(), frame, progress))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout(timeout.as_millis() as u64)),
        };
    if audited {
        service.audit(event(Some(match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        })));
    }
    result
}

/// The choke point for a change a node makes for itself, outside any request (its
/// scheduler's placements, its agent's reports, its janitor's holdings, its addresses):
/// authorization as `principal` (a [`Principal::Host`]; the command kind names one Cedar
/// action and one resource, see [`crate::authz::command_action`]), an audit record of the
/// decision and outcome, then `propose`. Commands that only requests make are refused.
pub async fn command<T, F>(
    authorizer: &blixard_authz::Authorizer,
    lookup: &(dyn Lookup + Sync),
    audit: &(dyn Fn(AuditEvent) + Send + Sync),
    principal: &Principal,
    command: blixard_core::Command,
    propose: impl FnOnce(blixard_core::Command) -> F,
) -> Result<T, ApiError>
where
    F: Future<Output = Result<T, ApiError>>,
{
    let key = principal.key().to_string();
    let context = blixard_authz::RequestContext::now(key.clone());
    let decision =
        crate::authz::authorize_command(authorizer, principal, &command, &context, lookup)?;
    let event = |outcome: Option<String>| AuditEvent {
        principal: principal.to_string(),
        key: key.clone(),
        request: command.kind(),
        decision: decision.clone(),
        outcome,
    };
    if !decision.allowed {
        audit(event(None));
        return Err(decision.refusal(principal));
    }
    let refused = event(None);
    let result = propose(command.clone()).await;
    audit(AuditEvent {
        outcome: Some(match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        }),
        ..refused
    });
    result
}

/// Guards another protocol (the iroh-blobs ALPN) with the same choke point: a connection
/// is handed to `inner` only if its caller may do `action` on the cluster. Refusals are
/// audited and close the connection with code 1. `inner`'s own shutdown is not called.
pub struct Gated<S, H> {
    service: Arc<S>,
    inner: H,
    action: &'static str,
}

impl<S, H> std::fmt::Debug for Gated<S, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gated")
            .field("action", &self.action)
            .finish_non_exhaustive()
    }
}

impl<S: Service, H: ProtocolHandler> Gated<S, H> {
    pub fn new(service: Arc<S>, inner: H, action: &'static str) -> Self {
        Self {
            service,
            inner,
            action,
        }
    }
}

impl<S: Service, H: ProtocolHandler> ProtocolHandler for Gated<S, H> {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let caller = key_of(&conn.remote_id());
        let principal = self.service.principal(&caller);
        let decision = crate::authz::authorize_connection(
            &self.service.authorizer(),
            &principal,
            self.action,
            &caller,
        );
        if !decision.allowed {
            self.service.audit(AuditEvent {
                principal: principal.to_string(),
                key: caller.to_string(),
                request: "Connect",
                decision,
                outcome: None,
            });
            conn.close(1u32.into(), b"not authorized");
            return Ok(());
        }
        self.inner.accept(conn).await
    }

    /// Stops taking connections (the router's part). What the guarded protocol holds,
    /// e.g. iroh-blobs' store, is its owner's to close, in the owner's order: after the
    /// router, so no connection still reads from it.
    async fn shutdown(&self) {}
}
