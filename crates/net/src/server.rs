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
use tracing::Instrument as _;

use crate::api::{
    undecodable_frame, ApiError, ProgressSink, RequestFrame, ResponseFrame, ResponseItem,
    API_VERSION,
};
use crate::authz::{authorize, is_mutating, Decision, Lookup, Principal};
use crate::frame::{self, FrameError};
use crate::key_of;

/// One audited event: an authorization decision (every denial, and every decision on a
/// mutating request), and its outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AuditEvent {
    pub principal: String,
    pub key: String,
    pub request: &'static str,
    pub decision: Decision,
    /// `None` for the decision itself (and a denial); else what became of the request:
    /// "ok", the error, or why it did not run or finish.
    pub outcome: Option<String>,
}

/// The audit log had no room and is set to refuse rather than wait (`on_full = "fail"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the audit log is behind ([audit] on_full = \"fail\")")]
pub struct AuditBehind;

/// Room in the audit log for lines not yet written. It is taken before the event it is for
/// happens, so recording the event never waits and never fails for lack of room; room not
/// used is given back when the value is dropped.
pub trait AuditRoom: Send {
    /// Records `event` in one line of this room.
    fn record(&mut self, event: &AuditEvent);
}

/// The audit log as the choke point uses it (the node's `AuditLog`).
pub trait Audit: Send + Sync {
    type Room: AuditRoom;
    /// Room for `lines` lines of a caller's records: at once when the log keeps up;
    /// otherwise it waits for room or, set to refuse (`on_full = "fail"`), says
    /// [`AuditBehind`] at once.
    fn room(&self, lines: u32) -> impl Future<Output = Result<Self::Room, AuditBehind>> + Send;
    /// Room for `lines` lines, waiting for it whatever `on_full` says: for records that
    /// must be written though nobody is left to refuse (a refusal already answered, the
    /// node's own changes).
    fn wait_room(&self, lines: u32) -> impl Future<Output = Self::Room> + Send;
}

/// What a node does with authorized requests.
pub trait Service: Lookup + Send + Sync + 'static {
    type Audit: Audit;
    /// The cluster this node belongs to.
    fn cluster_id(&self) -> Option<ClusterId>;
    /// Who the caller is, from its authenticated key.
    fn principal(&self, caller: &EndpointKey) -> Principal;
    /// The policies in force.
    fn authorizer(&self) -> Arc<blixard_authz::Authorizer>;
    /// Where audited events go.
    fn audit(&self) -> &Self::Audit;
    /// Where the choke point counts requests (`None`: not counted).
    fn api_metrics(&self) -> Option<&crate::metrics::ApiMetrics> {
        None
    }
    /// Handles an authorized request; long-running ones report through `progress`.
    fn handle(
        &self,
        principal: Principal,
        frame: RequestFrame,
        progress: ProgressSink,
    ) -> impl Future<Output = ResponseFrame> + Send;
}

/// A request's answer, and the record of its refusal when that is written after the
/// answer (see [`answer`]).
type Answered = (ResponseFrame, Option<AuditEvent>);

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
    let (response, later) = tokio::select! {
        r = work => match r {
            Some(r) => r,
            None => return,
        },
        _ = cancel.cancelled() => (Err(ApiError::Unavailable("the node is shutting down".into())), None),
    };
    if let Err(e) = &response {
        tracing::debug!(%caller, "request failed: {e}");
    }
    // A backup is the whole state in one answer; every other answer keeps the usual limit.
    let limit = match &response {
        Ok(crate::api::Response::ClusterBackup(_)) => frame::MAX_BACKUP_FRAME,
        _ => frame::MAX_FRAME,
    };
    if let Err(e) = frame::write_limited(&mut send, &ResponseItem::Done(response), limit).await {
        tracing::debug!(%caller, "could not answer: {e}");
    }
    let _ = send.finish();
    // A refusal answered before its record was queued (`on_full = "fail"`): the request
    // stays in flight until the record is, so at most `MAX_IN_FLIGHT` such records wait.
    if let Some(event) = later {
        tokio::select! {
            mut room = service.audit().wait_room(1) => room.record(&event),
            // A stop gave up on it; the audit log counts what was abandoned.
            _ = cancel.cancelled() => {}
        }
    }
    // Let the peer read the answer before the stream is dropped (not past a shutdown).
    let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped());
    tokio::select! {
        _ = stopped => {}
        _ = cancel.cancelled() => {}
    }
}

/// Why a request frame could not be read.
enum Unread {
    Frame(FrameError),
    /// It did not decode, and its prefix says why (`api::undecodable_frame`).
    Api(ApiError),
}

impl From<FrameError> for Unread {
    fn from(e: FrameError) -> Self {
        Unread::Frame(e)
    }
}

async fn read_request(recv: &mut frame::Reader<RecvStream>) -> Result<RequestFrame, Unread> {
    let body = recv.read_raw().await?.ok_or(FrameError::Closed)?;
    frame::decode(&body).map_err(|e| match undecodable_frame(&body) {
        Some(why) => Unread::Api(why),
        None => Unread::Frame(e),
    })
}

/// Reads one request and answers it, sending progress as it goes; `None` when the caller
/// closed the stream without a request.
async fn serve_request<S: Service>(
    service: &S,
    caller: EndpointKey,
    send: &mut SendStream,
    recv: &mut frame::Reader<RecvStream>,
    timeout: Duration,
) -> Option<Answered> {
    let answered = match tokio::time::timeout(timeout, read_request(recv)).await {
        Err(_) => (Err(ApiError::Timeout(timeout.as_millis() as u64)), None),
        Ok(Err(Unread::Frame(FrameError::Closed))) => return None,
        Ok(Err(Unread::Frame(e))) => (Err(ApiError::BadRequest(e.to_string())), None),
        Ok(Err(Unread::Api(why))) => (Err(why), None),
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
    Some(answered)
}

/// The choke point: version, cluster and authorization checks, then the handler.
async fn dispatch<S: Service>(
    service: &S,
    caller: EndpointKey,
    frame: RequestFrame,
    timeout: Duration,
    progress: ProgressSink,
) -> Answered {
    if frame.version != API_VERSION {
        return (Err(ApiError::Version(frame.version)), None);
    }
    if let (Some(expected), Some(actual)) = (frame.cluster, service.cluster_id()) {
        if expected != actual {
            let wrong = ApiError::WrongCluster {
                expected: expected.to_string(),
                actual: actual.to_string(),
            };
            return (Err(wrong), None);
        }
    }
    let principal = service.principal(&caller);
    answer(service, principal, frame, timeout, progress).await
}

/// The choke point for a caller already known: authorization (the request kind names one
/// Cedar action and one resource, the cluster's policies decide), an audit record of every
/// denial and of the decision and outcome of every mutating request, then the handler,
/// within `timeout` (an hour for long-running requests). Requests from the network come
/// here once their caller's key is mapped to a principal; in-process callers (a host's
/// own configuration) come here directly. There is no other way into [`Service::handle`].
pub async fn call<S: Service>(
    service: &S,
    principal: Principal,
    frame: RequestFrame,
    timeout: Duration,
    progress: ProgressSink,
) -> ResponseFrame {
    let (response, later) = answer(service, principal, frame, timeout, progress).await;
    if let Some(event) = later {
        service.audit().wait_room(1).await.record(&event);
    }
    response
}

/// [`call`], but a refusal's record that found no room in an audit log set to refuse
/// (`on_full = "fail"`) is handed back, to be written after the answer: the caller is
/// answered at once, and the record is not lost. Allowed reads are not recorded. Every
/// answer is counted in the service's [`crate::metrics::ApiMetrics`].
async fn answer<S: Service>(
    service: &S,
    principal: Principal,
    frame: RequestFrame,
    timeout: Duration,
    progress: ProgressSink,
) -> Answered {
    let kind = frame.request.kind();
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        target: crate::trace::TARGET,
        "request",
        otel.name = %format_args!("api {kind}"),
        otel.kind = "server",
        blixard.principal = %principal,
        blixard.forwarded = frame.forwarded,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    crate::trace::set_parent(&span, frame.trace.as_deref());
    let answered = decide_and_run(service, principal, frame, timeout, progress)
        .instrument(span.clone())
        .await;
    if let Err(e) = &answered.0 {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", e.to_string());
    }
    if let Some(m) = service.api_metrics() {
        m.observe(kind, &answered.0, started.elapsed().as_secs_f64());
    }
    answered
}

async fn decide_and_run<S: Service>(
    service: &S,
    principal: Principal,
    frame: RequestFrame,
    timeout: Duration,
    progress: ProgressSink,
) -> Answered {
    let caller = *principal.key();
    let context = blixard_authz::RequestContext::now(caller.to_string());
    let authorizer = service.authorizer();
    let decision = match authorize(
        &authorizer,
        &principal,
        &frame.request,
        frame.forwarded,
        &context,
        service,
    ) {
        Ok(decision) => decision,
        Err(e) => return (Err(e), None),
    };
    if decision.allowed && !is_mutating(&frame.request) {
        return (
            run(service, principal, frame, timeout, progress).await,
            None,
        );
    }
    let event = |outcome: Option<String>| AuditEvent {
        principal: principal.to_string(),
        key: caller.to_string(),
        request: frame.request.kind(),
        decision: decision.clone(),
        outcome,
    };
    // Room first: for a denial's line, or for a mutation's decision and outcome, so that
    // the request runs only once its outcome can be recorded without waiting.
    let lines = if decision.allowed { 2 } else { 1 };
    let mut room = match service.audit().room(lines).await {
        Ok(room) => room,
        Err(behind) if decision.allowed => {
            let record = event(Some(format!("not run: {behind}")));
            let refused = ApiError::Unavailable(format!("not run: {behind}; try again"));
            return (Err(refused), Some(record));
        }
        Err(_) => return (Err(decision.refusal(&principal)), Some(event(None))),
    };
    room.record(&event(None));
    if !decision.allowed {
        return (Err(decision.refusal(&principal)), None);
    }
    let outcome = Outcome {
        room,
        event: Some(event(None)),
    };
    let result = run(service, principal, frame, timeout, progress).await;
    outcome.finish(&result);
    (result, None)
}

/// Hands an authorized request to the handler, within its timeout.
async fn run<S: Service>(
    service: &S,
    principal: Principal,
    frame: RequestFrame,
    timeout: Duration,
    progress: ProgressSink,
) -> ResponseFrame {
    tracing::debug!(%principal, kind = frame.request.kind(), "request");
    let timeout = if frame.request.is_long_running() {
        timeout.max(crate::api::LONG_REQUEST)
    } else {
        timeout
    };
    match tokio::time::timeout(timeout, service.handle(principal, frame, progress)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::Timeout(timeout.as_millis() as u64)),
    }
}

/// The outcome of a request or command that runs, in room taken before it ran: recorded
/// by [`Outcome::finish`], or, if the run is dropped before it finishes (a stop that gives
/// up on it, a caller's own timeout), as cancelled.
struct Outcome<R: AuditRoom> {
    room: R,
    /// The decision's event, until its outcome is recorded.
    event: Option<AuditEvent>,
}

impl<R: AuditRoom> Outcome<R> {
    fn finish<T>(mut self, result: &Result<T, ApiError>) {
        if let Some(event) = self.event.take() {
            let outcome = match result {
                Ok(_) => "ok".to_string(),
                Err(e) => e.to_string(),
            };
            self.room.record(&AuditEvent {
                outcome: Some(outcome),
                ..event
            });
        }
    }
}

impl<R: AuditRoom> Drop for Outcome<R> {
    fn drop(&mut self) {
        if let Some(event) = self.event.take() {
            self.room.record(&AuditEvent {
                outcome: Some(CANCELLED.into()),
                ..event
            });
        }
    }
}

/// The outcome of a run dropped before it finished.
const CANCELLED: &str =
    "cancelled before it finished: its result is unknown here (a change it proposed may still be applied)";

/// The choke point for a change a node makes for itself, outside any request (its
/// scheduler's placements, its agent's reports, its janitor's holdings, its addresses):
/// authorization as `principal` (a [`Principal::Host`]; the command kind names one Cedar
/// action and one resource, see [`crate::authz::command_action`]), an audit record of the
/// decision and outcome, then `propose`. Commands that only requests make are refused.
/// Room for both records is taken first, waiting for it (there is no caller to refuse):
/// a command dropped while it waits has done nothing, and one dropped later is recorded
/// as cancelled.
pub async fn command<T, F, A: Audit>(
    authorizer: &blixard_authz::Authorizer,
    lookup: &(dyn Lookup + Sync),
    audit: &A,
    principal: &Principal,
    command: blixard_core::Command,
    propose: impl FnOnce(blixard_core::Command) -> F,
) -> Result<T, ApiError>
where
    F: Future<Output = Result<T, ApiError>>,
{
    let mut room = audit.wait_room(2).await;
    let key = principal.key().to_string();
    let context = blixard_authz::RequestContext::now(key.clone());
    let decision =
        crate::authz::authorize_command(authorizer, principal, &command, &context, lookup)?;
    let event = AuditEvent {
        principal: principal.to_string(),
        key,
        request: command.kind(),
        decision,
        outcome: None,
    };
    room.record(&event);
    if !event.decision.allowed {
        return Err(event.decision.refusal(principal));
    }
    let outcome = Outcome {
        room,
        event: Some(event),
    };
    let result = propose(command).await;
    outcome.finish(&result);
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
            let event = AuditEvent {
                principal: principal.to_string(),
                key: caller.to_string(),
                request: "Connect",
                decision,
                outcome: None,
            };
            let audit = self.service.audit();
            match audit.room(1).await {
                Ok(mut room) => {
                    room.record(&event);
                    conn.close(1u32.into(), b"not authorized");
                }
                // `on_full = "fail"`: closed at once, recorded once there is room.
                Err(_) => {
                    conn.close(1u32.into(), b"not authorized");
                    audit.wait_room(1).await.record(&event);
                }
            }
            return Ok(());
        }
        self.inner.accept(conn).await
    }

    /// Stops taking connections (the router's part). What the guarded protocol holds,
    /// e.g. iroh-blobs' store, is its owner's to close, in the owner's order: after the
    /// router, so no connection still reads from it.
    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::Mutex;
    use std::task::{Context, Waker};

    use blixard_core::{Command, NodeId, Phase, User};

    use super::*;

    /// An audit log that keeps what it is given, always with room.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<Vec<AuditEvent>>>);

    impl AuditRoom for Recorded {
        fn record(&mut self, event: &AuditEvent) {
            self.0.lock().unwrap().push(event.clone());
        }
    }

    impl Audit for Recorded {
        type Room = Recorded;
        async fn room(&self, _: u32) -> Result<Recorded, AuditBehind> {
            Ok(self.clone())
        }
        async fn wait_room(&self, _: u32) -> Recorded {
            self.clone()
        }
    }

    struct Nothing;
    impl Lookup for Nothing {
        fn user(&self, _: &str) -> Option<User> {
            None
        }
        fn image(&self, _: &str) -> Option<blixard_core::Image> {
            None
        }
        fn vm(&self, _: &str) -> Option<blixard_core::Vm> {
            None
        }
        fn node_labels(&self, _: NodeId) -> Option<std::collections::BTreeMap<String, String>> {
            None
        }
    }

    /// A host's own change dropped while it is proposed (a loop's timeout, a stop) has its
    /// decision and an outcome in the log.
    #[test]
    fn a_command_dropped_while_it_runs_is_recorded_as_cancelled() {
        let authorizer = blixard_authz::Authorizer::with_defaults().unwrap();
        let audit = Recorded::default();
        let host = Principal::Host(NodeId(3), EndpointKey([3; 32]));
        let report = Command::ReportVm {
            key: "acme/web".into(),
            node: NodeId(3),
            generation: 1,
            phase: Phase::Running,
            reason: None,
            now_ms: 0,
        };
        {
            let never = |_| std::future::pending::<Result<(), ApiError>>();
            let mut run = pin!(command(&authorizer, &Nothing, &audit, &host, report, never));
            let poll = run.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert!(poll.is_pending());
        }
        let events = audit.0.lock().unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(events[0].decision.allowed);
        assert_eq!(events[0].outcome, None);
        assert_eq!(events[1].outcome.as_deref(), Some(CANCELLED));
    }
}
