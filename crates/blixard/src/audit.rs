//! The audit log: one JSON line per audited event in `DATA_DIR/audit.log`, rotated by size.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blixard_core::NodeId;
use blixard_net::server::AuditEvent;
use serde::Serialize;

/// Rotate when the log passes this size; keep this many old files (`audit.log.1` …).
const MAX_BYTES: u64 = 8 * 1024 * 1024;
const KEEP: u32 = 3;

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit.log")
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    time_ms: u64,
    node: NodeId,
    #[serde(flatten)]
    event: &'a AuditEvent,
    allowed: bool,
}

#[derive(Serialize)]
struct VmLine<'a> {
    time: String,
    time_ms: u64,
    node: NodeId,
    vm: &'a str,
    lifecycle: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct ChangeLine<'a> {
    time: String,
    time_ms: u64,
    node: NodeId,
    /// The raft log index that made it.
    index: u64,
    change: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    proposer: Option<NodeId>,
}

#[derive(Serialize)]
struct NodeLine<'a> {
    time: String,
    time_ms: u64,
    node: NodeId,
    host: NodeId,
    change: &'a str,
}

/// Appends audit lines; write failures are logged, never fatal for the request.
pub struct AuditLog {
    path: PathBuf,
    node: NodeId,
    /// The open file and its size, known from the open and our own writes (no `stat` per line).
    file: Mutex<Option<(File, u64)>>,
    max_bytes: u64,
}

impl AuditLog {
    pub fn new(data_dir: &Path, node: NodeId) -> Self {
        Self {
            path: path(data_dir),
            node,
            file: Mutex::new(None),
            max_bytes: MAX_BYTES,
        }
    }

    fn open(&self) -> std::io::Result<(File, u64)> {
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(&self.path)?;
        let size = file.metadata()?.len();
        Ok((file, size))
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

    pub fn record(&self, event: &AuditEvent) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let line = Line {
            time: rfc3339(now.as_secs()),
            time_ms: now.as_millis() as u64,
            node: self.node,
            event,
            allowed: event.decision.allowed,
        };
        self.write(&line);
    }

    /// Records a VM lifecycle event (a hook point, or a phase this host reported).
    pub fn record_vm(&self, vm: &str, event: &str, reason: Option<&str>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let line = VmLine {
            time: rfc3339(now.as_secs()),
            time_ms: now.as_millis() as u64,
            node: self.node,
            vm,
            lifecycle: event,
            reason,
        };
        self.write(&line);
    }

    /// Records a change the leader made to a host (marked down or up).
    pub fn record_node(&self, host: NodeId, change: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let line = NodeLine {
            time: rfc3339(now.as_secs()),
            time_ms: now.as_millis() as u64,
            node: self.node,
            host,
            change,
        };
        self.write(&line);
    }

    /// Records a state change this node applied (every node records every change).
    pub fn record_change(&self, index: u64, change: &str, proposer: Option<NodeId>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let line = ChangeLine {
            time: rfc3339(now.as_secs()),
            time_ms: now.as_millis() as u64,
            node: self.node,
            index,
            change,
            proposer,
        };
        self.write(&line);
    }

    fn write(&self, line: &impl Serialize) {
        let Ok(mut text) = serde_json::to_string(line) else {
            return;
        };
        text.push('\n');
        let Ok(mut guard) = self.file.lock() else {
            return;
        };
        let result = (|| -> std::io::Result<()> {
            if guard.is_none() {
                *guard = Some(self.open()?);
            }
            let size = guard.as_ref().map_or(0, |(_, size)| *size);
            if size + text.len() as u64 > self.max_bytes {
                *guard = None;
                self.rotate()?;
                *guard = Some(self.open()?);
            }
            if let Some((f, size)) = guard.as_mut() {
                f.write_all(text.as_bytes())?;
                *size += text.len() as u64;
            }
            Ok(())
        })();
        if let Err(e) = result {
            *guard = None;
            tracing::error!("cannot write the audit log {}: {e}", self.path.display());
        }
    }
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

    #[test]
    fn lines_are_json_and_the_log_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::new(dir.path(), NodeId(1));
        log.max_bytes = 2000;
        for i in 0..40 {
            log.record(&event(i));
        }
        let current = std::fs::read_to_string(path(dir.path())).unwrap();
        for line in current.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["node"], 1);
            assert_eq!(v["action"], serde_json::Value::Null); // nested under decision
            assert_eq!(v["decision"]["action"], "cluster:manage");
        }
        assert!(dir.path().join("audit.log.1").exists());
        assert!(dir.path().join("audit.log.3").exists());
        assert!(!dir.path().join("audit.log.4").exists());
        assert!(current.len() <= 2000);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_795_200), "2026-11-27T16:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
