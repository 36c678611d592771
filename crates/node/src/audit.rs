//! The audit log: one JSON line per audited event in `DATA_DIR/audit.log`, fsync'd in
//! batches and rotated by size, and no line lost on the way.
//!
//! Callers format a line and hand it to one thread ("audit") that owns the file. The queue
//! between them is bounded, in lines, by two counters of room (semaphores): one for the
//! records of callers (requests, and the node's own commands: `[audit] queue` lines, the
//! part `on_full` applies to), one for the node's own lines (applied changes, VM
//! lifecycle, the leader's decisions: [`NODE_QUEUE`] lines). A caller takes room before the
//! event it records happens, and the writer gives the room back once the line is in its
//! buffer. With room free that is one atomic operation and no await that yields; without
//! it a caller waits (an async wait: no runtime thread is blocked) or, with
//! `on_full = "fail"`, is told [`AuditBehind`] at once. The node's own lines always wait:
//! nobody can be refused in their place.
//!
//! The writer writes its buffer out whenever the queue is empty (so `audit tail` sees a
//! line within milliseconds), fsyncs the file (`sync_data`) at most `sync_interval` after
//! the first line not yet synced or once [`SYNC_LINES`] lines are waiting for a sync, on
//! every [`AuditLog::flush`] and when it stops. A write that fails is retried, the line
//! keeping its room meanwhile, until it succeeds or the log is dropped. Rotation: see
//! [`LogFile::rotate`].
//!
//! `audit.log` may be a named pipe (or another file that is not a regular one) that a log
//! shipper reads: it is then neither fsync'd nor rotated, and a reader that falls behind
//! holds the writer up like a slow disk does: callers wait for room (or are refused), and
//! no line is lost.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blixard_core::{NodeId, RequestId};
use blixard_net::server::{Audit, AuditBehind, AuditEvent, AuditRoom};
use serde::Serialize;
use tokio::sync::Semaphore;

/// Rotate when the log passes this size; keep this many old files (`audit.log.1` …).
const MAX_BYTES: u64 = 8 * 1024 * 1024;
const KEEP: u32 = 3;
/// Room for the node's own lines (applied changes, VM lifecycle, the leader's decisions).
pub const NODE_QUEUE: usize = 1024;
/// Applied changes the raft thread may hand on before it waits for the audit log.
pub const CHANGE_FEED: usize = 4096;
/// Lines written but not yet fsync'd after which the writer syncs without waiting for the
/// interval.
pub const SYNC_LINES: u64 = 4096;
/// The writer's buffer: what one write() carries at most under load.
const BUFFER: usize = 64 * 1024;
/// How long `flush` waits for the writer before giving up.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one warning about a log that is behind (or cannot be written) per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit.log")
}

/// What a caller does when the callers' part of the queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFull {
    /// Wait for room.
    #[default]
    Block,
    /// Be refused at once ([`AuditBehind`]); the refusal is recorded once there is room.
    Fail,
}

/// How the log behaves (the `[audit]` config section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub on_full: OnFull,
    /// Lines of callers' records that may wait for the writer (at least 2).
    pub queue: usize,
    /// The longest a written line waits for an fsync.
    pub sync_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            on_full: OnFull::Block,
            queue: 4096,
            sync_interval: Duration::from_secs(1),
        }
    }
}

/// Every line: when, and which node wrote it, then what happened.
#[derive(Serialize)]
struct Stamped<T> {
    time: String,
    time_ms: u64,
    node: NodeId,
    #[serde(flatten)]
    body: T,
}

impl<T: Serialize> Stamped<T> {
    fn now(node: NodeId, body: T) -> Self {
        let (time, time_ms) = now();
        Self {
            time,
            time_ms,
            node,
            body,
        }
    }
}

#[derive(Serialize)]
struct EventLine<'a> {
    #[serde(flatten)]
    event: &'a AuditEvent,
    allowed: bool,
}

#[derive(Serialize)]
struct VmLine<'a> {
    vm: &'a str,
    lifecycle: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct ChangeLine<'a> {
    /// The raft log index that made it.
    index: u64,
    change: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    proposer: Option<NodeId>,
    /// The client request it was made for (a retried request is applied once).
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<RequestId>,
}

#[derive(Serialize)]
struct NodeLine<'a> {
    host: NodeId,
    change: &'a str,
}

/// Which part of the queue a line's room came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// Requests and the node's own commands: `[audit] queue`, where `on_full` applies.
    Callers,
    /// The node's own lines, which always wait.
    Node,
}

/// What callers hand the writer.
enum Msg {
    /// One formatted line (with its newline), and the room it holds (`None`: none, which
    /// only a bug produces; written anyway).
    Line { text: String, lane: Option<Lane> },
    /// Write and fsync everything queued before this, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Write what is queued, fsync and end.
    Stop,
}

/// What the handles, the room they hand out and the writer share.
struct Shared {
    path: PathBuf,
    node: NodeId,
    on_full: OnFull,
    tx: Sender<Msg>,
    callers: Semaphore,
    own: Semaphore,
    /// Set when the log is dropped: a writer retrying a failed write gives up.
    stopping: AtomicBool,
    /// Records given up while they waited for room (their futures were dropped: a stop
    /// that cancelled the requests in flight), not yet reported.
    abandoned: AtomicU64,
    /// Every record lost since the start: given up while waiting, or queued after the
    /// writer stopped (`blixard_audit_records_dropped_total`).
    dropped: AtomicU64,
    behind: Behind,
}

impl Shared {
    fn lane(&self, lane: Lane) -> &Semaphore {
        match lane {
            Lane::Callers => &self.callers,
            Lane::Node => &self.own,
        }
    }
}

/// Counts of callers who met a full queue, reported in the daemon's log at most once per
/// [`WARN_EVERY`].
struct Behind {
    epoch: Instant,
    /// Milliseconds after `epoch` before which no other warning is logged.
    next_warn_ms: AtomicU64,
    waited: AtomicU64,
    refused: AtomicU64,
}

impl Behind {
    fn note(&self, path: &Path, count: &AtomicU64) {
        count.fetch_add(1, Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        let next = self.next_warn_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_warn_ms
                .compare_exchange(
                    next,
                    now + WARN_EVERY.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            let waited = self.waited.swap(0, Ordering::Relaxed);
            let refused = self.refused.swap(0, Ordering::Relaxed);
            tracing::warn!(
                "the audit log {} is behind: {waited} records waited for room, {refused} requests were refused (since the last warning)",
                path.display()
            );
        }
    }
}

/// Room for lines not yet written (see [`AuditRoom`]); given back when dropped unused.
pub struct Room {
    shared: Arc<Shared>,
    lane: Lane,
    lines: u32,
}

impl Room {
    fn put(&mut self, line: &impl Serialize) {
        let text = match serde_json::to_string(&Stamped::now(self.shared.node, line)) {
            Ok(mut text) => {
                text.push('\n');
                text
            }
            Err(e) => {
                tracing::error!("cannot format an audit line: {e}");
                return;
            }
        };
        let lane = if self.lines > 0 {
            self.lines -= 1;
            Some(self.lane)
        } else {
            tracing::error!("an audit line without room was queued (a bug)");
            None
        };
        if self.shared.tx.send(Msg::Line { text, lane }).is_err() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!("the audit log writer has stopped; a line is lost");
        }
    }
}

impl AuditRoom for Room {
    fn record(&mut self, event: &AuditEvent) {
        self.put(&EventLine {
            event,
            allowed: event.decision.allowed,
        });
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if self.lines > 0 {
            self.shared.lane(self.lane).add_permits(self.lines as usize);
        }
    }
}

/// Counts a wait for room given up before it got any.
struct Waiting<'a> {
    shared: &'a Shared,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.abandoned.fetch_add(1, Ordering::Relaxed);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Appends audit lines, losing none (see the module doc).
pub struct AuditLog {
    shared: Arc<Shared>,
    writer: Option<Running>,
}

/// The writer thread, running.
struct Running {
    handle: JoinHandle<()>,
    /// Closed when the thread ends (in a mutex only to be `Sync`).
    done: std::sync::Mutex<Receiver<()>>,
}

impl Running {
    /// Waits for the thread to end, for at most `within`: a write that blocks for ever (a
    /// named pipe nobody reads) must not hold the daemon's exit up.
    fn join(self, within: Duration) -> Result<(), String> {
        let done = self.done.into_inner().unwrap_or_else(|e| e.into_inner());
        match done.recv_timeout(within) {
            Err(RecvTimeoutError::Timeout) => Err(format!("it did not stop within {within:?}")),
            _ => self.handle.join().map_err(|_| "it panicked".to_string()),
        }
    }
}

impl AuditLog {
    /// Starts the writer thread of `DATA_DIR/audit.log` (opened with the first line).
    pub fn new(data_dir: &Path, node: NodeId, settings: &Settings) -> std::io::Result<Self> {
        let (mut log, writer) = Self::unstarted(&path(data_dir), node, settings, MAX_BYTES, KEEP);
        log.writer = Some(writer.spawn()?);
        Ok(log)
    }

    /// A log whose writer is not running yet: lines queue up (and callers wait) until it is
    /// spawned.
    fn unstarted(
        path: &Path,
        node: NodeId,
        settings: &Settings,
        max_bytes: u64,
        keep: u32,
    ) -> (Self, Writer) {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            node,
            on_full: settings.on_full,
            tx,
            callers: Semaphore::new(settings.queue),
            own: Semaphore::new(NODE_QUEUE),
            stopping: AtomicBool::new(false),
            abandoned: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            behind: Behind {
                epoch: Instant::now(),
                next_warn_ms: AtomicU64::new(0),
                waited: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            },
        });
        let writer = Writer {
            rx,
            shared: shared.clone(),
            sync_interval: settings.sync_interval,
            file: LogFile {
                path: path.to_owned(),
                max_bytes,
                keep,
                open: None,
                unsynced_lines: 0,
                unsynced_since: None,
                pending: Vec::new(),
            },
            failing_since: None,
            error_logged: None,
        };
        (
            Self {
                shared,
                writer: None,
            },
            writer,
        )
    }

    /// Room for `lines` lines, at once if there is some.
    fn try_take(&self, lane: Lane, lines: u32) -> Option<Room> {
        let permit = self.shared.lane(lane).try_acquire_many(lines).ok()?;
        permit.forget();
        Some(Room {
            shared: self.shared.clone(),
            lane,
            lines,
        })
    }

    /// Room for `lines` lines, waiting for it.
    async fn take(&self, lane: Lane, lines: u32) -> Room {
        if let Some(room) = self.try_take(lane, lines) {
            return room;
        }
        self.shared
            .behind
            .note(&self.shared.path, &self.shared.behind.waited);
        let mut waiting = Waiting {
            shared: &self.shared,
            done: false,
        };
        let acquired = self.shared.lane(lane).acquire_many(lines).await;
        waiting.done = true;
        let lines = match acquired {
            Ok(permit) => {
                permit.forget();
                lines
            }
            // Never closed; were it, the line goes without room rather than not at all.
            Err(_) => 0,
        };
        Room {
            shared: self.shared.clone(),
            lane,
            lines,
        }
    }

    /// Records a VM lifecycle event (a hook point, or a phase this host reported).
    pub async fn record_vm(&self, vm: &str, event: &str, reason: Option<&str>) {
        self.take(Lane::Node, 1).await.put(&VmLine {
            vm,
            lifecycle: event,
            reason,
        });
    }

    /// Records a change the leader made to a host (marked down or up).
    pub async fn record_node(&self, host: NodeId, change: &str) {
        self.take(Lane::Node, 1)
            .await
            .put(&NodeLine { host, change });
    }

    /// Records a state change this node applied (every node records every change).
    pub async fn record_change(
        &self,
        index: u64,
        change: &str,
        proposer: Option<NodeId>,
        request: Option<RequestId>,
    ) {
        self.take(Lane::Node, 1).await.put(&ChangeLine {
            index,
            change,
            proposer,
            request,
        });
    }

    /// Records lost since the start (given up while they waited, or queued after the
    /// writer stopped).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued before the call is in the file and fsync'd (or the
    /// writer failed to write it and said so), for at most a few seconds. Call it before
    /// the process exits.
    pub async fn flush(&self) {
        let (ack, done) = tokio::sync::oneshot::channel();
        if self.shared.tx.send(Msg::Flush(ack)).is_err() {
            tracing::error!("the audit log writer has stopped");
            return;
        }
        if !matches!(tokio::time::timeout(FLUSH_TIMEOUT, done).await, Ok(Ok(()))) {
            tracing::error!(
                "the audit log writer did not write {} within {FLUSH_TIMEOUT:?}",
                self.shared.path.display()
            );
        }
        let abandoned = self.shared.abandoned.swap(0, Ordering::Relaxed);
        if abandoned > 0 {
            tracing::error!(
                "{abandoned} audit records were given up while they waited for room in {} (requests a stop cancelled before they ran or were recorded)",
                self.shared.path.display()
            );
        }
    }
}

impl Audit for AuditLog {
    type Room = Room;

    async fn room(&self, lines: u32) -> Result<Room, AuditBehind> {
        match self.shared.on_full {
            OnFull::Block => Ok(self.take(Lane::Callers, lines).await),
            OnFull::Fail => self.try_take(Lane::Callers, lines).ok_or_else(|| {
                let behind = &self.shared.behind;
                behind.note(&self.shared.path, &behind.refused);
                AuditBehind
            }),
        }
    }

    async fn wait_room(&self, lines: u32) -> Room {
        self.take(Lane::Callers, lines).await
    }
}

impl Drop for AuditLog {
    /// Stops the writer after it has written what is queued.
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let _ = self.shared.tx.send(Msg::Stop);
        if let Some(writer) = self.writer.take() {
            if let Err(e) = writer.join(FLUSH_TIMEOUT) {
                tracing::error!(
                    "the audit log writer of {}: {e}; what it has not written is lost",
                    self.shared.path.display()
                );
            }
        }
    }
}

/// The writer thread's side: the only owner of the file.
struct Writer {
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    sync_interval: Duration,
    file: LogFile,
    /// Since when writing has failed, and when that was last logged.
    failing_since: Option<Instant>,
    error_logged: Option<Instant>,
}

impl Writer {
    fn spawn(self) -> std::io::Result<Running> {
        let (ended, done) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                // Dropped when the thread ends, however it ends.
                let _ended = ended;
                self.run();
            })?;
        Ok(Running {
            handle,
            done: std::sync::Mutex::new(done),
        })
    }

    /// Writes lines as they come, writes the buffer out whenever the queue is empty and
    /// syncs when a sync is due; ends, synced, at [`Msg::Stop`].
    fn run(mut self) {
        loop {
            let msg = match self.rx.try_recv() {
                Ok(msg) => msg,
                Err(TryRecvError::Empty) => {
                    self.retry(LogFile::flush);
                    match self.next() {
                        Some(msg) => msg,
                        None => break,
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            };
            match msg {
                Msg::Line { text, lane } => self.line(&text, lane),
                Msg::Flush(ack) => {
                    self.sync();
                    let _ = ack.send(());
                }
                Msg::Stop => break,
            }
        }
        // Lines from room that outlived the log, if any.
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Line { text, lane } = msg {
                self.line(&text, lane);
            }
        }
        self.sync();
    }

    fn line(&mut self, text: &str, lane: Option<Lane>) {
        self.retry(|file| file.append(text));
        if let Some(lane) = lane {
            self.shared.lane(lane).add_permits(1);
        }
        if self
            .file
            .sync_due(self.sync_interval)
            .is_some_and(|due| due <= Instant::now())
        {
            self.sync();
        }
    }

    /// The next message, syncing meanwhile when a sync falls due; `None` if every sender
    /// is gone.
    fn next(&mut self) -> Option<Msg> {
        loop {
            let Some(due) = self.file.sync_due(self.sync_interval) else {
                return self.rx.recv().ok();
            };
            match self
                .rx
                .recv_timeout(due.saturating_duration_since(Instant::now()))
            {
                Ok(msg) => return Some(msg),
                Err(RecvTimeoutError::Timeout) => self.sync(),
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Writes the buffer out and fsyncs the file.
    fn sync(&mut self) {
        self.retry(LogFile::flush);
        if let Err(e) = self.file.sync() {
            // Retrying would not help: after a failed fsync the kernel may have dropped
            // the pages it could not write.
            tracing::error!(
                "cannot fsync the audit log {}: {e}",
                self.file.path.display()
            );
        }
    }

    /// Runs `op` until it succeeds, pausing longer each time, unless the log is being
    /// dropped. Meanwhile the line being written keeps its room, so callers wait (or are
    /// refused) instead of lines being lost.
    fn retry(&mut self, mut op: impl FnMut(&mut LogFile) -> std::io::Result<()>) {
        let mut pause = Duration::from_millis(10);
        loop {
            let e = match op(&mut self.file) {
                Ok(()) => {
                    self.error_logged = None;
                    if let Some(since) = self.failing_since.take() {
                        tracing::info!(
                            "the audit log {} is written again, after {} ms",
                            self.file.path.display(),
                            since.elapsed().as_millis()
                        );
                    }
                    return;
                }
                Err(e) => e,
            };
            if self.shared.stopping.load(Ordering::Relaxed) {
                tracing::error!(
                    "cannot write the audit log {}: {e}; the log is stopping, so what is not written yet is lost",
                    self.file.path.display()
                );
                return;
            }
            let now = Instant::now();
            self.failing_since.get_or_insert(now);
            if self
                .error_logged
                .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
            {
                tracing::error!(
                    "cannot write the audit log {}: {e}; retrying (callers wait for room meanwhile, or are refused with on_full = \"fail\")",
                    self.file.path.display()
                );
                self.error_logged = Some(now);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

/// The current file, rotated by size.
struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    /// Old files kept (`audit.log.1` … `.keep`).
    keep: u32,
    /// `None` before the first line, and between moving a full file aside and opening the
    /// next.
    open: Option<Open>,
    /// Lines written since the last fsync, and when the first of them was.
    unsynced_lines: u64,
    unsynced_since: Option<Instant>,
    /// What a named pipe's reader did not read before it went away: written first to the
    /// pipe once it is opened again.
    pending: Vec<u8>,
}

/// The open file and its size, known from the open and our own writes (no `stat` per
/// line).
struct Open {
    file: BufWriter<File>,
    size: u64,
    /// A regular file: fsync'd and rotated. Not one (a named pipe): neither.
    regular: bool,
}

impl LogFile {
    /// Appends one line, moving the file aside first if the line would take it past
    /// `max_bytes`. After an error it can be called again with the same line: a line is
    /// written once (the buffer keeps what it could not write out).
    fn append(&mut self, text: &str) -> std::io::Result<()> {
        let appended = self.try_append(text);
        self.after(appended)
    }

    fn try_append(&mut self, text: &str) -> std::io::Result<()> {
        let len = text.len() as u64;
        if self.open.is_none() {
            let open = self.open.insert(open_file(&self.path)?);
            if !self.pending.is_empty() {
                let pending = std::mem::take(&mut self.pending);
                open.file.write_all(&pending)?;
            }
        }
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.regular && o.size > 0 && o.size + len > self.max_bytes)
        {
            self.rotate()?;
        }
        let Some(open) = self.open.as_mut() else {
            return Err(std::io::Error::other("the audit log is not open"));
        };
        open.file.write_all(text.as_bytes())?;
        open.size += len;
        self.unsynced_lines += 1;
        self.unsynced_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Writes the buffer out to the file (not fsync'd).
    fn flush(&mut self) -> std::io::Result<()> {
        let flushed = match &mut self.open {
            Some(open) => open.file.flush(),
            None => Ok(()),
        };
        self.after(flushed)
    }

    /// After a failed write to a named pipe whose reader went away: closes it, keeping
    /// what was not written, so that the next attempt opens it again (waiting for a
    /// reader) instead of failing for ever.
    fn after(&mut self, result: std::io::Result<()>) -> std::io::Result<()> {
        if let Err(e) = &result {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                if let Some(open) = self.open.take_if(|o| !o.regular) {
                    let (_, unwritten) = open.file.into_parts();
                    self.pending = unwritten.unwrap_or_default();
                }
            }
        }
        result
    }

    /// Fsyncs what was written out.
    fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced_since.is_none() {
            return Ok(());
        }
        self.unsynced_lines = 0;
        self.unsynced_since = None;
        match &self.open {
            Some(open) if open.regular => open.file.get_ref().sync_data(),
            _ => Ok(()),
        }
    }

    /// When the lines not yet fsync'd must be: `sync_interval` after the first of them,
    /// or now once there are [`SYNC_LINES`]. `None` when all are.
    fn sync_due(&self, sync_interval: Duration) -> Option<Instant> {
        let since = self.unsynced_since?;
        if self.unsynced_lines >= SYNC_LINES {
            Some(since)
        } else {
            Some(since + sync_interval)
        }
    }

    fn numbered(&self, i: u32) -> PathBuf {
        self.path.with_extension(format!("log.{i}"))
    }

    /// Moves the full file aside and starts the next, so that each line is in exactly one
    /// file, across a crash too:
    /// 1. the full file's buffer is written out and fsync'd;
    /// 2. `audit.log.{keep-1}` … `.1` move up one (the oldest is replaced) and `audit.log`
    ///    becomes `audit.log.1`, each an atomic rename;
    /// 3. a new `audit.log` is created and the directory fsync'd (by [`open_file`]),
    ///    before any line is written to it.
    ///
    /// A crash leaves the full file's lines, complete, under one of its two names, and the
    /// new file holds only lines written after it. After an error it can be called again:
    /// it goes on from the step that failed (a free `.1` means the others moved already).
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(open) = &mut self.open {
            open.file.flush()?;
            if open.regular {
                open.file.get_ref().sync_data()?;
            }
        }
        self.unsynced_lines = 0;
        self.unsynced_since = None;
        if self.numbered(1).exists() {
            for i in (1..self.keep).rev() {
                let from = self.numbered(i);
                if from.exists() {
                    std::fs::rename(&from, self.numbered(i + 1))?;
                }
            }
        }
        match std::fs::rename(&self.path, self.numbered(1)) {
            // Moved already, or removed by hand while it was open.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r?,
        }
        self.open = None;
        self.open = Some(open_file(&self.path)?);
        Ok(())
    }
}

/// Opens (or creates, mode 0600) the log for appending, and fsyncs its directory so that
/// a new file's name is durable before lines go to it.
fn open_file(path: &Path) -> std::io::Result<Open> {
    let mut opts = OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    // A named pipe: this waits until its reader has opened it (lines queue meanwhile).
    let file = opts.open(path)?;
    let meta = file.metadata()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(Open {
        file: BufWriter::with_capacity(BUFFER, file),
        size: meta.len(),
        regular: meta.is_file(),
    })
}

/// The time now, as an RFC 3339 string and as milliseconds since the epoch.
fn now() -> (String, u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (rfc3339(now.as_secs()), now.as_millis() as u64)
}

/// Seconds since the epoch as an RFC 3339 UTC timestamp.
fn rfc3339(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};

    use super::*;
    use blixard_net::authz::Decision;

    fn event_of(principal: String, key: String, allowed: bool) -> AuditEvent {
        AuditEvent {
            principal,
            key,
            request: "MetaSet",
            decision: Decision {
                action: "cluster:manage",
                resource: "the cluster".into(),
                allowed,
                reasons: vec!["admin".into()],
                errors: vec![],
            },
            outcome: Some("ok".into()),
        }
    }

    fn event(i: usize) -> AuditEvent {
        event_of(format!("user u{i}"), "k".into(), i.is_multiple_of(2))
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn settings(on_full: OnFull, queue: usize) -> Settings {
        Settings {
            on_full,
            queue,
            sync_interval: Duration::from_millis(20),
        }
    }

    fn started(dir: &Path, settings: &Settings, max_bytes: u64, keep: u32) -> AuditLog {
        let (mut log, writer) =
            AuditLog::unstarted(&path(dir), NodeId(1), settings, max_bytes, keep);
        log.writer = Some(writer.spawn().unwrap());
        log
    }

    /// Whether `fut` is still waiting after one poll.
    fn pending<F: Future>(fut: Pin<&mut F>) -> bool {
        fut.poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    }

    /// Records `event` the way a denial is: one line of room, then the line.
    async fn record(log: &AuditLog, event: &AuditEvent) {
        log.room(1).await.unwrap().record(event);
    }

    #[tokio::test]
    async fn lines_are_json_and_the_log_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let log = started(dir.path(), &Settings::default(), 2000, KEEP);
        for i in 0..40 {
            record(&log, &event(i)).await;
        }
        log.flush().await;
        let current = std::fs::read_to_string(path(dir.path())).unwrap();
        for v in lines(&path(dir.path())) {
            assert_eq!(v["node"], 1);
            assert_eq!(v["action"], serde_json::Value::Null); // nested under decision
            assert_eq!(v["decision"]["action"], "cluster:manage");
        }
        assert!(dir.path().join("audit.log.1").exists());
        assert!(dir.path().join("audit.log.3").exists());
        assert!(!dir.path().join("audit.log.4").exists());
        assert!(current.len() <= 2000);
        for i in 1..=3 {
            let old = std::fs::metadata(dir.path().join(format!("audit.log.{i}"))).unwrap();
            assert!(old.len() <= 2000, "audit.log.{i} has {} bytes", old.len());
        }
    }

    #[tokio::test]
    async fn lines_arrive_in_order_and_a_flush_makes_them_visible() {
        let dir = tempfile::tempdir().unwrap();
        let log = started(dir.path(), &Settings::default(), MAX_BYTES, KEEP);
        for i in 0..500 {
            record(&log, &event(i)).await;
        }
        log.flush().await;
        let got = lines(&path(dir.path()));
        assert_eq!(got.len(), 500);
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v["principal"], format!("user u{i}"));
            assert_eq!(v["allowed"], i % 2 == 0);
        }
        // Still usable after a flush.
        log.record_vm("vm-1", "running", None).await;
        log.flush().await;
        let got = lines(&path(dir.path()));
        assert_eq!(got[500]["vm"], "vm-1");
    }

    #[tokio::test]
    async fn an_idle_writer_writes_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let log = started(dir.path(), &settings(OnFull::Block, 16), MAX_BYTES, KEEP);
        log.record_node(NodeId(2), "down").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path(dir.path())).unwrap_or_default();
            if text.contains("\"host\":2") {
                break;
            }
            assert!(Instant::now() < deadline, "no line after 10s: {text:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn dropping_the_last_handle_writes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let log = started(dir.path(), &Settings::default(), MAX_BYTES, KEEP);
        for i in 0..3000 {
            log.record_change(i, "meta_set", Some(NodeId(1)), None)
                .await;
        }
        drop(log);
        let got = lines(&path(dir.path()));
        assert_eq!(got.len(), 3000);
        assert_eq!(got[2999]["index"], 2999);
    }

    /// `on_full = "block"`: with the queue full, callers wait; every line arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_mode_waits_and_never_drops() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer) = AuditLog::unstarted(
            &path(dir.path()),
            NodeId(1),
            &settings(OnFull::Block, 2),
            MAX_BYTES,
            KEEP,
        );
        let log = Arc::new(log);
        // Two lines fit; the third waits, since the writer is not running yet.
        record(&log, &event(0)).await;
        record(&log, &event(1)).await;
        let third = event(2);
        let mut third = Box::pin(record(&log, &third));
        assert!(
            pending(third.as_mut()),
            "a third line found room in a queue of 2"
        );
        let tasks: Vec<_> = (3..2000)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { record(&log, &event(i)).await })
            })
            .collect();
        assert!(tasks.iter().all(|t| !t.is_finished()));
        let writer = writer.spawn().unwrap();
        third.await;
        for t in tasks {
            t.await.unwrap();
        }
        log.flush().await;
        let got = lines(&path(dir.path()));
        let mut seen: Vec<String> = got
            .iter()
            .map(|v| v["principal"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(seen.len(), 2000);
        // The lines queued before the writer started come first; the waiters' lines follow
        // in the order they were next polled, which the test does not fix.
        assert_eq!(&seen[..2], ["user u0", "user u1"]);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 2000, "a line written twice");
        drop(log);
        writer.join(Duration::from_secs(30)).unwrap();
    }

    /// `on_full = "fail"`: with the queue full, a caller is refused at once; room already
    /// taken (a running request's outcome) is never refused, and a refusal's own record
    /// waits for room.
    #[tokio::test]
    async fn fail_mode_refuses_when_full_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer) = AuditLog::unstarted(
            &path(dir.path()),
            NodeId(1),
            &settings(OnFull::Fail, 2),
            MAX_BYTES,
            KEEP,
        );
        // A mutation takes room for its decision and its outcome.
        let mut held = log.room(2).await.unwrap();
        assert!(matches!(log.room(1).await, Err(AuditBehind)));
        held.record(&event(0)); // the decision: its room is in use until it is written
        assert!(matches!(log.room(1).await, Err(AuditBehind)));
        // The refused caller's record, written once there is room.
        let refusal = event(1);
        let mut refusal = Box::pin(async { log.wait_room(1).await.record(&refusal) });
        assert!(pending(refusal.as_mut()));
        let writer = writer.spawn().unwrap();
        refusal.await; // the writer wrote line 0 and gave its room back
        held.record(&event(2)); // the outcome, in room held all along
        drop(held);
        log.flush().await;
        let got: Vec<_> = lines(&path(dir.path()))
            .iter()
            .map(|v| v["principal"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, ["user u0", "user u1", "user u2"]);
        // Once the writer caught up, callers get room at once again.
        assert!(log.room(2).await.is_ok());
        drop(log);
        writer.join(Duration::from_secs(30)).unwrap();
    }

    /// Many writers while the file rotates every few lines: every line is in exactly one
    /// file, in each writer's order, and no file passes the limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_under_concurrent_writes_loses_nothing() {
        const WRITERS: usize = 8;
        const EACH: usize = 500;
        let dir = tempfile::tempdir().unwrap();
        let max = 16 * 1024;
        let log = Arc::new(started(dir.path(), &settings(OnFull::Block, 16), max, 1000));
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let log = log.clone();
                tokio::spawn(async move {
                    for n in 0..EACH {
                        let e = event_of(format!("w{w}"), n.to_string(), true);
                        log.room(2).await.unwrap().record(&e);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        log.flush().await;
        // Oldest first: audit.log.N … audit.log.1, then audit.log.
        let mut files = Vec::new();
        for i in 1.. {
            let f = dir.path().join(format!("audit.log.{i}"));
            if !f.exists() {
                break;
            }
            files.push(f);
        }
        assert!(files.len() > 10, "only {} rotations", files.len());
        files.reverse();
        files.push(path(dir.path()));
        let mut next: BTreeMap<String, usize> = BTreeMap::new();
        let mut total = 0;
        for f in &files {
            let size = std::fs::metadata(f).unwrap().len();
            assert!(size <= max, "{} has {size} bytes", f.display());
            for v in lines(f) {
                let w = v["principal"].as_str().unwrap().to_string();
                let n: usize = v["key"].as_str().unwrap().parse().unwrap();
                let expected = next.entry(w.clone()).or_default();
                assert_eq!(n, *expected, "{w}: line {n} where {expected} was next");
                *expected += 1;
                total += 1;
            }
        }
        assert_eq!(total, WRITERS * EACH);
        assert!(next.values().all(|n| *n == EACH));
    }

    /// A rotation that failed half-way goes on from where it stopped: it does not move the
    /// old files up twice.
    #[test]
    fn a_rotation_resumes_without_moving_files_twice() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        write("audit.log", "current\n");
        write("audit.log.1", "one\n");
        write("audit.log.2", "two\n");
        let mut file = LogFile {
            path: path(dir.path()),
            max_bytes: 10,
            keep: KEEP,
            open: None,
            unsynced_lines: 0,
            unsynced_since: None,
            pending: Vec::new(),
        };
        // An earlier attempt moved .2 and .1 up, then failed before audit.log.
        std::fs::rename(
            dir.path().join("audit.log.2"),
            dir.path().join("audit.log.3"),
        )
        .unwrap();
        std::fs::rename(
            dir.path().join("audit.log.1"),
            dir.path().join("audit.log.2"),
        )
        .unwrap();
        file.append("next line\n").unwrap();
        file.flush().unwrap();
        assert_eq!(read("audit.log.3"), "two\n");
        assert_eq!(read("audit.log.2"), "one\n");
        assert_eq!(read("audit.log.1"), "current\n");
        assert_eq!(read("audit.log"), "next line\n");
    }

    #[test]
    fn a_sync_is_due_after_the_interval_or_enough_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = LogFile {
            path: path(dir.path()),
            max_bytes: MAX_BYTES,
            keep: KEEP,
            open: None,
            unsynced_lines: 0,
            unsynced_since: None,
            pending: Vec::new(),
        };
        let every = Duration::from_secs(60);
        assert!(file.sync_due(every).is_none());
        file.append("{}\n").unwrap();
        assert!(file.sync_due(every).unwrap() > Instant::now());
        for _ in 1..SYNC_LINES {
            file.append("{}\n").unwrap();
        }
        assert!(file.sync_due(every).unwrap() <= Instant::now());
        file.sync().unwrap();
        assert!(file.sync_due(every).is_none());
    }

    /// A line the writer cannot write (here: its directory is missing) keeps its room and
    /// is written once it can be.
    #[tokio::test]
    async fn a_failed_write_is_retried_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("later");
        let log = started(&missing, &settings(OnFull::Fail, 4), MAX_BYTES, KEEP);
        for i in 0..3 {
            record(&log, &event(i)).await;
        }
        // Not written, and their room not given back: one line's room is left.
        assert!(matches!(log.room(2).await, Err(AuditBehind)));
        std::fs::create_dir(&missing).unwrap();
        log.flush().await;
        let got = lines(&path(&missing));
        assert_eq!(got.len(), 3);
        assert_eq!(got[2]["principal"], "user u2");
    }

    /// A named pipe as the log: neither fsync'd nor rotated, and every line reaches its
    /// reader.
    #[tokio::test]
    async fn a_named_pipe_is_written_without_sync_or_rotation() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let fifo = path(dir.path());
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                let mut text = String::new();
                std::fs::File::open(fifo)
                    .unwrap()
                    .read_to_string(&mut text)
                    .unwrap();
                text
            })
        };
        // Small enough that a regular file would rotate several times.
        let log = started(dir.path(), &settings(OnFull::Block, 4), 2000, KEEP);
        for i in 0..100 {
            record(&log, &event(i)).await;
        }
        log.flush().await;
        drop(log);
        let text = reader.join().unwrap();
        let got: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got.len(), 100);
        assert_eq!(got[99]["principal"], "user u99");
        assert!(!dir.path().join("audit.log.1").exists());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_795_200), "2026-11-27T16:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
