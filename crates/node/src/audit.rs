//! The audit log: one JSON line per audited event in `DATA_DIR/audit.log`, rotated by size.
//!
//! Callers only format a line and hand it to a bounded queue; one thread ("audit") owns the
//! file, writes through a buffer and flushes whenever the queue is empty, so an idle daemon's
//! lines reach the file within milliseconds and a busy one's go out many to a write. A full
//! queue never blocks a caller: the line is dropped and counted, and the count is written as a
//! `{"dropped":N}` line before the next line that gets through (or at the next flush).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blixard_core::{NodeId, RequestId};
use blixard_net::server::AuditEvent;
use serde::Serialize;

/// Rotate when the log passes this size; keep this many old files (`audit.log.1` …).
const MAX_BYTES: u64 = 8 * 1024 * 1024;
const KEEP: u32 = 3;
/// Lines waiting for the writer before new ones are dropped (a few hundred bytes each).
const QUEUE: usize = 4096;
/// The writer's buffer: what one write() carries at most under load.
const BUFFER: usize = 64 * 1024;
/// How long `flush` waits for the writer before giving up.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one warning about dropped lines per this interval.
const WARN_EVERY: Duration = Duration::from_secs(1);

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit.log")
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

#[derive(Serialize)]
struct DroppedLine {
    /// Lines lost because the writer's queue was full.
    dropped: u64,
}

/// What callers hand the writer.
enum Msg {
    /// One formatted line (with its newline), after `dropped` lines that did not fit.
    Line { text: String, dropped: u64 },
    /// Write everything queued before this, flush, then answer.
    Flush(SyncSender<()>),
}

/// Appends audit lines; write failures are logged, never fatal for the request.
pub struct AuditLog {
    path: PathBuf,
    node: NodeId,
    /// `None` only while dropping.
    tx: Option<SyncSender<Msg>>,
    /// Lines dropped and not yet reported in the file (shared with the writer).
    dropped: Arc<AtomicU64>,
    /// Milliseconds after `epoch` before which no other drop warning is logged.
    next_warn_ms: AtomicU64,
    epoch: Instant,
    writer: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Opens `DATA_DIR/audit.log` lazily and starts its writer thread.
    pub fn new(data_dir: &Path, node: NodeId) -> std::io::Result<Self> {
        let (mut log, writer) = Self::unstarted(&path(data_dir), node, QUEUE, MAX_BYTES);
        log.writer = Some(writer.spawn()?);
        Ok(log)
    }

    /// A log whose writer is not running yet: lines queue up (or drop) until it is spawned.
    fn unstarted(path: &Path, node: NodeId, queue: usize, max_bytes: u64) -> (Self, Writer) {
        let (tx, rx) = std::sync::mpsc::sync_channel(queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let log = Self {
            path: path.to_owned(),
            node,
            tx: Some(tx),
            dropped: dropped.clone(),
            next_warn_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            writer: None,
        };
        let writer = Writer {
            rx,
            node,
            dropped,
            file: LogFile {
                path: path.to_owned(),
                max_bytes,
                open: None,
            },
        };
        (log, writer)
    }

    pub fn record(&self, event: &AuditEvent) {
        self.write(&EventLine {
            event,
            allowed: event.decision.allowed,
        });
    }

    /// Records a VM lifecycle event (a hook point, or a phase this host reported).
    pub fn record_vm(&self, vm: &str, event: &str, reason: Option<&str>) {
        self.write(&VmLine {
            vm,
            lifecycle: event,
            reason,
        });
    }

    /// Records a change the leader made to a host (marked down or up).
    pub fn record_node(&self, host: NodeId, change: &str) {
        self.write(&NodeLine { host, change });
    }

    /// Records a state change this node applied (every node records every change).
    pub fn record_change(
        &self,
        index: u64,
        change: &str,
        proposer: Option<NodeId>,
        request: Option<RequestId>,
    ) {
        self.write(&ChangeLine {
            index,
            change,
            proposer,
            request,
        });
    }

    /// Blocks until every line recorded before the call is in the file (or the writer failed
    /// to write it and said so), for at most a few seconds. Call it before the process exits.
    pub fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        // Blocking is fine here: the writer is draining the queue.
        if tx.send(Msg::Flush(ack)).is_err() {
            tracing::error!("the audit log writer has stopped");
            return;
        }
        if done.recv_timeout(FLUSH_TIMEOUT).is_err() {
            tracing::error!(
                "the audit log writer did not flush {} within {FLUSH_TIMEOUT:?}",
                self.path.display()
            );
        }
    }

    /// Stamps and formats the line and queues it; never blocks.
    fn write(&self, line: &impl Serialize) {
        let Ok(mut text) = serde_json::to_string(&Stamped::now(self.node, line)) else {
            return;
        };
        text.push('\n');
        let Some(tx) = &self.tx else { return };
        // The drops so far travel with this line, so the file says where they happened.
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        match tx.try_send(Msg::Line { text, dropped }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.note_drops(dropped + 1),
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(dropped, Ordering::Relaxed);
                tracing::error!("the audit log writer has stopped; a line is lost");
            }
        }
    }

    fn note_drops(&self, n: u64) {
        let total = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
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
            tracing::warn!(
                "the audit log queue is full: {total} lines dropped and not yet reported in {}",
                self.path.display()
            );
        }
    }
}

impl Drop for AuditLog {
    /// Closes the queue and waits for the writer to write what is in it.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("the audit log writer panicked");
            }
        }
    }
}

/// The writer thread's side: the only owner of the file.
struct Writer {
    rx: Receiver<Msg>,
    node: NodeId,
    dropped: Arc<AtomicU64>,
    file: LogFile,
}

impl Writer {
    fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || self.run())
    }

    /// Writes lines as they come and flushes whenever the queue is empty; ends, flushed, when
    /// every `AuditLog` handle is gone.
    fn run(mut self) {
        loop {
            let msg = match self.rx.try_recv() {
                Ok(msg) => msg,
                Err(TryRecvError::Empty) => {
                    self.file.flush();
                    match self.rx.recv() {
                        Ok(msg) => msg,
                        Err(_) => break,
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            };
            self.handle(msg);
        }
        self.report_drops(self.dropped.swap(0, Ordering::Relaxed));
        self.file.flush();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line { text, dropped } => {
                self.report_drops(dropped);
                self.file.append(&text);
            }
            Msg::Flush(ack) => {
                self.report_drops(self.dropped.swap(0, Ordering::Relaxed));
                self.file.flush();
                let _ = ack.send(());
            }
        }
    }

    fn report_drops(&mut self, dropped: u64) {
        if dropped == 0 {
            return;
        }
        if let Ok(mut text) =
            serde_json::to_string(&Stamped::now(self.node, DroppedLine { dropped }))
        {
            text.push('\n');
            self.file.append(&text);
        }
    }
}

/// The current file, rotated by size.
struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    /// The open file and its size, known from the open and our own writes (no `stat` per
    /// line); `None` before the first line and after an error (reopened on the next line).
    open: Option<(BufWriter<File>, u64)>,
}

impl LogFile {
    fn append(&mut self, text: &str) {
        if let Err(e) = self.try_append(text) {
            self.open = None;
            tracing::error!("cannot write the audit log {}: {e}", self.path.display());
        }
    }

    fn try_append(&mut self, text: &str) -> std::io::Result<()> {
        let len = text.len() as u64;
        let mut current = match self.open.take() {
            Some(current) => current,
            None => self.open_file()?,
        };
        if current.1 + len > self.max_bytes {
            current.0.flush()?;
            drop(current);
            self.rotate()?;
            current = self.open_file()?;
        }
        current.0.write_all(text.as_bytes())?;
        current.1 += len;
        self.open = Some(current);
        Ok(())
    }

    fn flush(&mut self) {
        if let Some((file, _)) = &mut self.open {
            if let Err(e) = file.flush() {
                self.open = None;
                tracing::error!("cannot write the audit log {}: {e}", self.path.display());
            }
        }
    }

    fn open_file(&self) -> std::io::Result<(BufWriter<File>, u64)> {
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(&self.path)?;
        let size = file.metadata()?.len();
        Ok((BufWriter::with_capacity(BUFFER, file), size))
    }

    fn rotate(&self) -> std::io::Result<()> {
        for i in (1..KEEP).rev() {
            let from = self.path.with_extension(format!("log.{i}"));
            if from.exists() {
                std::fs::rename(&from, self.path.with_extension(format!("log.{}", i + 1)))?;
            }
        }
        std::fs::rename(&self.path, self.path.with_extension("log.1"))
    }
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
    use super::*;
    use blixard_net::authz::Decision;

    fn event(i: usize) -> AuditEvent {
        AuditEvent {
            principal: format!("user u{i}"),
            key: "k".into(),
            request: "MetaSet",
            decision: Decision {
                action: "cluster:manage",
                resource: "the cluster".into(),
                allowed: i.is_multiple_of(2),
                reasons: vec!["admin".into()],
                errors: vec![],
            },
            outcome: Some("ok".into()),
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn started(dir: &Path, queue: usize, max_bytes: u64) -> AuditLog {
        let (mut log, writer) = AuditLog::unstarted(&path(dir), NodeId(1), queue, max_bytes);
        log.writer = Some(writer.spawn().unwrap());
        log
    }

    #[test]
    fn lines_are_json_and_the_log_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let log = started(dir.path(), 64, 2000);
        for i in 0..40 {
            log.record(&event(i));
        }
        log.flush();
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

    #[test]
    fn lines_arrive_in_order_and_a_flush_makes_them_visible() {
        let dir = tempfile::tempdir().unwrap();
        let log = started(dir.path(), 1024, MAX_BYTES);
        for i in 0..500 {
            log.record(&event(i));
        }
        log.flush();
        let got = lines(&path(dir.path()));
        assert_eq!(got.len(), 500);
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v["principal"], format!("user u{i}"));
            assert_eq!(v["allowed"], i % 2 == 0);
        }
        // Still usable after a flush.
        log.record_vm("vm-1", "running", None);
        log.flush();
        let got = lines(&path(dir.path()));
        assert_eq!(got[500]["vm"], "vm-1");
    }

    #[test]
    fn an_idle_writer_flushes_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let log = started(dir.path(), 16, MAX_BYTES);
        log.record_node(NodeId(2), "down");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path(dir.path())).unwrap_or_default();
            if text.contains("\"host\":2") {
                break;
            }
            assert!(Instant::now() < deadline, "no line after 10s: {text:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn dropping_the_last_handle_writes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let log = started(dir.path(), 1024, MAX_BYTES);
        for i in 0..300 {
            log.record_change(i, "meta_set", Some(NodeId(1)), None);
        }
        drop(log);
        let got = lines(&path(dir.path()));
        assert_eq!(got.len(), 300);
        assert_eq!(got[299]["index"], 299);
    }

    #[test]
    fn a_full_queue_drops_lines_and_says_how_many() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut writer) = AuditLog::unstarted(&path(dir.path()), NodeId(1), 2, MAX_BYTES);
        for i in 0..5 {
            log.record(&event(i)); // 0 and 1 queue, 2, 3 and 4 drop
        }
        // The writer takes one line: room for one more, which carries the three drops.
        let first = writer.rx.try_recv().unwrap();
        writer.handle(first);
        log.record(&event(5));
        log.record(&event(6)); // the queue is full again: dropped
        log.writer = Some(writer.spawn().unwrap());
        log.flush(); // reports the last drop
        let got = lines(&path(dir.path()));
        let summary: Vec<String> = got
            .iter()
            .map(|v| match &v["dropped"] {
                serde_json::Value::Null => v["principal"].as_str().unwrap().to_string(),
                n => format!("dropped {n}"),
            })
            .collect();
        assert_eq!(
            summary,
            ["user u0", "user u1", "dropped 3", "user u5", "dropped 1"]
        );
        assert_eq!(got[2]["node"], 1);
        assert!(got[2]["time"].is_string());
        // Nothing left to report.
        log.record(&event(7));
        drop(log);
        assert_eq!(lines(&path(dir.path())).len(), 6);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_795_200), "2026-11-27T16:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
