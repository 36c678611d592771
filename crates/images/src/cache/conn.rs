//! The cache's connections: the accept loop (admission up to `max_connections`; with few
//! file descriptors left, refusal at once; with none, a brief back-off), and one task per
//! connection whose watchdog enforces the header, idle and stalled-reader timeouts.
//!
//! Why a watchdog of our own rather than hyper's `header_read_timeout`: hyper starts that
//! clock again as soon as a response is written, so on a kept-alive connection the wait
//! for the next request counts against it. It cannot allow an idle connection 30 s and a
//! request head, once begun, 10 s; and hyper's HTTP/1 server has no idle timeout and no
//! timeout for a client that stops reading a response. The watchdog below knows where
//! each connection is (waiting for a head, answering, idle) from the bytes its socket
//! moves and from when hyper calls the service and drops the response body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::body::{CacheBody, NarBodyError};
use super::Cache;

/// Connections beyond `max_connections` still get an answer (503) while at most this many
/// are being refused at once; beyond that they are closed as soon as accepted.
const REFUSING_AT_ONCE: usize = 64;

/// How long the accept loop waits before trying again when the process has no file
/// descriptor (or kernel memory) left for a new connection.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Descriptors the cache leaves to the rest of the daemon (raft, the API, the blob
/// store): a connection accepted with fewer left is refused at once.
const FD_HEADROOM: u64 = 128;

/// At most one log line per this long about refused connections or streams.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// What a 503 tells the client to wait, in seconds.
pub(crate) const RETRY_AFTER_SECS: u64 = 1;

/// Serves `listener` until the task running this is aborted; aborting it also closes
/// every connection (they run in a `JoinSet` this owns).
pub(crate) async fn accept_loop(listener: TcpListener, cache: Arc<Cache>) {
    let admitted = Arc::new(Semaphore::new(cache.limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let mut conns = JoinSet::new();
    let mut short = Shortage::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if per_connection(&e) => {
                tracing::debug!("binary cache: accept: {e}");
                continue;
            }
            Err(e) => {
                short.note(|| {
                    if out_of_fds(&e) {
                        format!("out of file descriptors: cannot accept connections ({e}); they wait in the listen queue")
                    } else {
                        format!("cannot accept connections ({e}); they wait in the listen queue")
                    }
                });
                // Trying again at once would spin on the same error.
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if let Some((open, limit)) = near_fd_limit(stream.as_raw_fd()) {
            short.note(|| {
                format!("out of file descriptors: {open} of the {limit} this process may open are in use, and the cache leaves {FD_HEADROOM} to raft and the API; refusing connections")
            });
            // Best effort: the socket's buffer takes it, or the client sees a reset.
            let _ = stream.try_write(REFUSED_SHORT);
            continue;
        }
        short.over();
        let (permit, admit) = match admitted.clone().try_acquire_owned() {
            Ok(p) => (p, true),
            Err(_) => {
                cache.refused_connections.note();
                match refusing.clone().try_acquire_owned() {
                    Ok(p) => (p, false),
                    // Too many refusals in flight: close it unanswered.
                    Err(_) => continue,
                }
            }
        };
        let cache = cache.clone();
        conns.spawn(async move {
            connection(stream, peer, cache, admit).await;
            drop(permit);
        });
    }
}

/// The answer to a connection accepted with too few descriptors left to serve it.
const REFUSED_SHORT: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// A run of connections the accept loop could not take or serve for want of descriptors
/// (or kernel memory): logged once when it starts and once when it ends.
#[derive(Default)]
struct Shortage(Option<(Instant, u64)>);

impl Shortage {
    fn note(&mut self, why: impl FnOnce() -> String) {
        match &mut self.0 {
            Some((_, n)) => *n += 1,
            None => {
                tracing::warn!(
                    "binary cache: {}; raise the open-file limit, or lower images.cache_max_connections",
                    why()
                );
                self.0 = Some((Instant::now(), 1));
            }
        }
    }

    fn over(&mut self) {
        if let Some((since, refused)) = self.0.take() {
            tracing::info!(
                refused,
                "binary cache: accepting connections again after {} ms",
                since.elapsed().as_millis()
            );
        }
    }
}

/// If the socket `fd` was accepted with fewer than `FD_HEADROOM` descriptors left: how
/// many are open (at least), and the limit. Linux hands out the lowest free descriptor,
/// so all below `fd` are open.
fn near_fd_limit(fd: RawFd) -> Option<(u64, u64)> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
    let open = u64::try_from(fd).ok()?.saturating_add(1);
    (open.saturating_add(FD_HEADROOM) > limit).then_some((open, limit))
}

/// An accept error that concerns only the connection being accepted.
fn per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted
            | ConnectionReset
            | ConnectionRefused
            | PermissionDenied
            | TimedOut
            | Interrupted
            | WouldBlock
            | HostUnreachable
            | NetworkUnreachable
    )
}

fn out_of_fds(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(e),
        Some(Errno::MFILE) | Some(Errno::NFILE)
    )
}

/// Serves one connection until it ends or its watchdog closes it. A refused connection
/// (`admit` false) gets one 503 and is closed.
async fn connection(stream: TcpStream, peer: SocketAddr, cache: Arc<Cache>, admit: bool) {
    let timeouts = Timeouts {
        header: cache.limits.header_timeout,
        idle: cache.limits.idle_timeout,
    };
    // A response's last segment goes out at once instead of waiting (Nagle) for the
    // client's delayed ACK of the one before: up to 40 ms per NAR on a kept-alive
    // connection.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, "binary cache: cannot set TCP_NODELAY: {e}");
    }
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        io: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        service_fn(move |req: Request<Incoming>| {
            let (cache, activity) = (cache.clone(), activity.clone());
            async move {
                activity.request(Instant::now());
                let reply = if admit {
                    cache.answer(&req, peer)
                } else {
                    cache.metrics.request("refused", 503);
                    refused_connection()
                };
                let reply = reply.map(|body| Tracked { body, activity });
                Ok::<_, Infallible>(reply)
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watchdog times heads (see the module's comment); hyper's own clock is off.
    builder.header_read_timeout(None).keep_alive(admit);
    let conn = builder.serve_connection(io, service);
    let mut conn = pin!(conn);
    loop {
        let (deadline, _) = activity.deadline(&timeouts);
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, "binary cache: connection: {e}");
                }
                return;
            }
            () = tokio::time::sleep_until(deadline) => {}
            () = activity.changed.notified() => {}
        }
        let (deadline, why) = activity.deadline(&timeouts);
        if deadline <= Instant::now() {
            // Dropping the connection closes the socket: a response cut here is short
            // of its Content-Length, so the client sees it failed.
            tracing::debug!(%peer, "binary cache: closing the connection: {why}");
            return;
        }
    }
}

/// The answer on a connection beyond `max_connections`.
fn refused_connection() -> Response<CacheBody> {
    let mut r = super::text(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many connections to this binary cache; retry later\n",
    );
    super::retry_after(&mut r);
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}

/// The timeouts the watchdog enforces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    /// From the first byte of a request head (or the connection's start) to its end.
    pub header: Duration,
    /// Without a byte moving while the server waits on the client: for the next request
    /// on a kept-alive connection, or for the client to read more of a response.
    pub idle: Duration,
}

const HEAD: u8 = 0;
const ANSWERING: u8 = 1;
const IDLE: u8 = 2;

/// Where one connection is, for its watchdog. All of a connection (its socket, hyper,
/// the service and the response body) runs in one task, the watchdog's, so these values
/// are never raced; they are atomics only to be `Sync`.
pub(crate) struct Activity {
    base: Instant,
    phase: AtomicU8,
    /// When the phase began, in ms since `base`.
    since: AtomicU64,
    /// When a byte was last read or written, in ms since `base`.
    progress: AtomicU64,
    /// Wakes the watchdog when the phase changes (its deadline may move earlier).
    changed: Notify,
}

impl Activity {
    /// A new connection: waiting for its first request head.
    pub(crate) fn new() -> Self {
        Self::starting(Instant::now())
    }

    fn starting(base: Instant) -> Self {
        Self {
            base,
            phase: AtomicU8::new(HEAD),
            since: AtomicU64::new(0),
            progress: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    fn enter(&self, phase: u8, now: Instant) {
        self.since.store(self.ms(now), Ordering::Relaxed);
        self.phase.store(phase, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// `n` bytes came in.
    fn read(&self, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        self.progress.store(self.ms(now), Ordering::Relaxed);
        if self.phase.load(Ordering::Relaxed) == IDLE {
            self.enter(HEAD, now);
        }
    }

    /// `n` bytes went out.
    fn wrote(&self, n: usize, now: Instant) {
        if n > 0 {
            self.progress.store(self.ms(now), Ordering::Relaxed);
        }
    }

    /// hyper has a request head and calls the service.
    fn request(&self, now: Instant) {
        self.progress.store(self.ms(now), Ordering::Relaxed);
        self.enter(ANSWERING, now);
    }

    /// The response body is done (sent, or given up).
    fn answered(&self, now: Instant) {
        self.enter(IDLE, now);
    }

    /// When the connection is to be closed if nothing changes, and why.
    fn deadline(&self, t: &Timeouts) -> (Instant, &'static str) {
        let since = self.since.load(Ordering::Relaxed);
        let progress = self.progress.load(Ordering::Relaxed);
        let at = |ms: u64, d: Duration| self.base + Duration::from_millis(ms) + d;
        match self.phase.load(Ordering::Relaxed) {
            HEAD => (at(since, t.header), "no complete request head in time"),
            ANSWERING => (at(progress, t.idle), "the client stopped reading"),
            _ => (at(since.max(progress), t.idle), "idle"),
        }
    }
}

/// A socket that tells its connection's `Activity` about the bytes it moves.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.activity
                .read(buf.filled().len() - before, Instant::now());
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.activity.wrote(n, Instant::now());
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.activity.wrote(n, Instant::now());
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A response body that marks its connection idle when hyper drops it (after its last
/// byte, or when the connection ends).
struct Tracked {
    body: CacheBody,
    activity: Arc<Activity>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.activity.answered(Instant::now());
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = NarBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, NarBodyError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Counts refused requests of one kind and logs them in at most one line per
/// `REFUSAL_LOG_EVERY`: the first refusal of a burst at once, the rest as a count.
pub(crate) struct Refusals {
    /// What is refused, e.g. "connections".
    what: &'static str,
    /// The setting that limits it, and its value.
    setting: &'static str,
    limit: usize,
    /// When the last line was logged, and how many were refused since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Refusals {
    pub(crate) fn new(what: &'static str, setting: &'static str, limit: usize) -> Self {
        Self {
            what,
            setting,
            limit,
            state: Mutex::new((None, 0)),
        }
    }

    pub(crate) fn note(&self) {
        self.note_at(Instant::now());
    }

    fn note_at(&self, now: Instant) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.1 += 1;
        if state
            .0
            .is_none_or(|last| now.duration_since(last) >= REFUSAL_LOG_EVERY)
        {
            tracing::info!(
                refused = state.1,
                "binary cache: refusing {} beyond images.{} = {} (503 Service Unavailable, Retry-After: {RETRY_AFTER_SECS})",
                self.what,
                self.setting,
                self.limit
            );
            *state = (Some(now), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(30),
    };
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn each_phase_has_its_own_deadline() {
        let t0 = Instant::now();
        let a = Activity::starting(t0);
        // A new connection: the head within the header timeout.
        assert_eq!(a.deadline(&T).0, t0 + T.header);
        a.read(10, t0 + 2 * S);
        assert_eq!(
            a.deadline(&T).0,
            t0 + T.header,
            "bytes of a head do not extend it"
        );
        a.request(t0 + 2 * S);
        // Answering: the client must keep reading.
        assert_eq!(a.deadline(&T).0, t0 + 2 * S + T.idle);
        a.wrote(1000, t0 + 22 * S);
        assert_eq!(
            a.deadline(&T),
            (t0 + 22 * S + T.idle, "the client stopped reading")
        );
        a.wrote(0, t0 + 23 * S);
        assert_eq!(a.deadline(&T).0, t0 + 22 * S + T.idle);
        a.answered(t0 + 23 * S);
        // Idle: the next request may take the idle timeout to begin...
        assert_eq!(a.deadline(&T), (t0 + 23 * S + T.idle, "idle"));
        a.read(0, t0 + 48 * S);
        assert_eq!(a.deadline(&T), (t0 + 23 * S + T.idle, "idle"));
        // ...and, once begun, the header timeout to end.
        a.read(5, t0 + 48 * S);
        assert_eq!(
            a.deadline(&T),
            (t0 + 48 * S + T.header, "no complete request head in time")
        );
    }

    #[test]
    fn refusals_log_at_most_once_per_period() {
        let t0 = Instant::now();
        let r = Refusals::new("streams", "cache_max_streams", 2);
        r.note_at(t0);
        assert_eq!(
            r.state.lock().unwrap().1,
            0,
            "the first refusal is logged at once"
        );
        for i in 0..100 {
            r.note_at(t0 + Duration::from_millis(i * 10));
        }
        assert_eq!(r.state.lock().unwrap().1, 100, "the rest are counted");
        r.note_at(t0 + REFUSAL_LOG_EVERY);
        assert_eq!(
            r.state.lock().unwrap().1,
            0,
            "and logged with the next line"
        );
    }
}
