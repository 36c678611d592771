//! One VM's state dir, the one owner of its files (as microvm.nix's host module keeps one
//! per VM). Nothing else builds paths inside it.
//!
//! | file | written by | meaning |
//! |---|---|---|
//! | `current` | every start | link to the runner the VM should run |
//! | `booted` | every start | link to the runner it started (its stop and taps come from there) |
//! | `console.log` | the runner (appending) | the guest's console, trimmed near a cap |
//! | `assignment.json` | the host agent | what the host last did for it (a [`Record`]) |
//! | `pid` | process supervisor | pid and kernel start time of the runner, for re-adoption |
//! | `cgroup` | process supervisor | the cgroup the runner was put in |
//! | `unit` | systemd supervisor | the runner's transient unit |
//! | `exit` | either supervisor | the exit code seen (empty: unknown) |

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::reconcile::Record;
use crate::{HostError, Runner};

/// The most console one read returns.
pub const MAX_CONSOLE_READ: u64 = 256 * 1024;

/// One VM's state dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDir {
    name: String,
    path: PathBuf,
}

pub(crate) fn io<'a>(
    vm: &'a str,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> HostError + 'a {
    move |source| HostError::Io {
        vm: vm.to_string(),
        what,
        source,
    }
}

impl VmDir {
    /// The state dir of VM `name` under `root`; the name is checked (it becomes a path and,
    /// under systemd, a unit name).
    pub fn in_root(root: &Path, name: &str) -> Result<Self, HostError> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
        if !ok {
            return Err(HostError::BadName(name.to_string()));
        }
        Ok(Self {
            name: name.to_string(),
            path: root.join(name),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, f: &str) -> PathBuf {
        self.path.join(f)
    }

    /// Makes the dir if it is missing.
    pub fn create(&self) -> Result<(), HostError> {
        std::fs::create_dir_all(&self.path).map_err(io(&self.name, "creating the state dir"))
    }

    /// Removes the dir and everything in it (the VM is gone from this host).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }

    // ---- runner links

    /// Points `current` at the runner the VM should run.
    pub fn link_current(&self, runner: &Runner) -> Result<(), HostError> {
        relink(&self.file("current"), &runner.dir).map_err(io(&self.name, "linking current"))
    }

    /// Points `booted` at the runner the VM was started with.
    pub fn link_booted(&self, runner: &Runner) -> Result<(), HostError> {
        relink(&self.file("booted"), &runner.dir).map_err(io(&self.name, "linking booted"))
    }

    /// The runner the VM's last start used, if it is still there.
    pub fn booted(&self) -> Option<Runner> {
        std::fs::read_link(self.file("booted"))
            .ok()
            .and_then(|r| Runner::new(&r).ok())
    }

    // ---- the console

    pub fn console(&self) -> PathBuf {
        self.file("console.log")
    }

    /// The console log opened for appending (made if missing).
    pub fn open_console(&self) -> Result<std::fs::File, HostError> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.console())
            .map_err(io(&self.name, "opening the console log"))
    }

    /// The console's length: where the next run's output starts.
    pub fn console_len(&self) -> u64 {
        std::fs::metadata(self.console()).map_or(0, |m| m.len())
    }

    /// The last `lines` lines of the console (none if it does not exist yet).
    pub fn console_tail(&self, lines: usize) -> Result<Vec<String>, HostError> {
        let text = match std::fs::read(self.console()) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(&self.name, "reading the console log")(e)),
        };
        let all: Vec<&str> = text.lines().collect();
        Ok(all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| l.to_string())
            .collect())
    }

    /// The console from byte `from` (or its last `lines` lines), at most
    /// [`MAX_CONSOLE_READ`], and the offset to continue from. A log trimmed since `from` is
    /// read from its start.
    pub fn read_console(&self, lines: u32, from: Option<u64>) -> std::io::Result<(String, u64)> {
        let mut f = match std::fs::File::open(self.console()) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        let start = match from {
            Some(off) if off <= len => off,
            Some(_) => 0,
            None => len.saturating_sub(MAX_CONSOLE_READ),
        };
        let end = len.min(start + MAX_CONSOLE_READ);
        f.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::with_capacity((end - start) as usize);
        f.take(end - start).read_to_end(&mut bytes)?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if from.is_none() {
            let all: Vec<&str> = text.lines().collect();
            let keep = all[all.len().saturating_sub(lines as usize)..].join("\n");
            text = if keep.is_empty() { keep } else { keep + "\n" };
        }
        Ok((text, end))
    }

    /// This run's last `lines` console lines: from `from` (where the run's output started),
    /// at most [`MAX_CONSOLE_READ`] back from the end.
    pub fn run_lines(&self, from: u64, lines: u32) -> Vec<String> {
        let from = from.max(self.console_len().saturating_sub(MAX_CONSOLE_READ));
        let text = self
            .read_console(lines, Some(from))
            .map(|(t, _)| t)
            .unwrap_or_default();
        let all: Vec<String> = text.lines().map(str::to_string).collect();
        all[all.len().saturating_sub(lines as usize)..].to_vec()
    }

    /// Keeps the console log near `cap` bytes: past it, only the newest half stays. The
    /// runner appends (`O_APPEND`), so it goes on writing at the new end.
    pub fn trim_console(&self, cap: u64) -> Result<(), HostError> {
        let name = &self.name;
        let path = self.console();
        let Ok(mut f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        else {
            return Ok(());
        };
        let len = f.metadata().map_err(io(name, "console size"))?.len();
        if len <= cap {
            return Ok(());
        }
        let keep = cap / 2;
        let mut tail = Vec::with_capacity(keep as usize);
        f.seek(SeekFrom::Start(len - keep))
            .and_then(|_| f.take(keep).read_to_end(&mut tail))
            .map_err(io(name, "reading the console log"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(name, "trimming the console log"))?;
        f.set_len(0)
            .and_then(|_| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(&tail))
            .map_err(io(name, "trimming the console log"))?;
        Ok(())
    }

    // ---- the host agent's record

    /// What the host last did for the VM (`assignment.json`), if anything readable.
    pub fn record(&self) -> Option<Record> {
        let bytes = std::fs::read(self.file("assignment.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn write_record(&self, record: &Record) -> Result<(), HostError> {
        let bytes = serde_json::to_vec(record)
            .map_err(|e| io(&self.name, "encoding assignment.json")(std::io::Error::other(e)))?;
        self.create()?;
        write_atomic(&self.file("assignment.json"), &bytes)
            .map_err(io(&self.name, "writing assignment.json"))
    }

    // ---- the supervisors' files

    /// The runner's pid and kernel start time.
    pub(crate) fn pid(&self) -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(self.file("pid")).ok()?;
        let mut parts = text.split_whitespace();
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    pub(crate) fn has_pid(&self) -> bool {
        self.file("pid").exists()
    }

    pub(crate) fn write_pid(&self, pid: u32, started: u64) -> Result<(), HostError> {
        write_atomic(&self.file("pid"), format!("{pid} {started}\n").as_bytes())
            .map_err(io(&self.name, "writing the pid file"))
    }

    pub(crate) fn remove_pid(&self) {
        let _ = std::fs::remove_file(self.file("pid"));
    }

    /// The exit code recorded, when one was: `Some(None)` for an exit whose code is
    /// unknown.
    pub(crate) fn exit(&self) -> Option<Option<i32>> {
        let text = std::fs::read_to_string(self.file("exit")).ok()?;
        Some(text.trim().parse().ok())
    }

    pub(crate) fn write_exit(&self, code: Option<i32>) {
        let text = code.map(|c| c.to_string()).unwrap_or_default();
        let _ = write_atomic(&self.file("exit"), text.as_bytes());
    }

    pub(crate) fn clear_exit(&self) {
        let _ = std::fs::remove_file(self.file("exit"));
    }

    /// The cgroup named in the `cgroup` file (`Some("")`-free: `None` when there is none).
    pub(crate) fn cgroup(&self) -> Option<String> {
        std::fs::read_to_string(self.file("cgroup"))
            .ok()
            .map(|t| t.trim().to_string())
    }

    pub(crate) fn write_cgroup(&self, cgroup: &Path) -> std::io::Result<()> {
        write_atomic(
            &self.file("cgroup"),
            format!("{}\n", cgroup.display()).as_bytes(),
        )
    }

    pub(crate) fn remove_cgroup_file(&self) {
        let _ = std::fs::remove_file(self.file("cgroup"));
    }

    pub(crate) fn has_unit(&self) -> bool {
        self.file("unit").exists()
    }

    pub(crate) fn write_unit(&self, unit: &str) {
        let _ = write_atomic(&self.file("unit"), format!("{unit}\n").as_bytes());
    }

    pub(crate) fn remove_unit(&self) {
        let _ = std::fs::remove_file(self.file("unit"));
    }
}

/// The names of the VM state dirs under `root` (`tenant@name`).
pub(crate) fn dirs_in(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.contains('@'))
        .collect()
}

/// Points `link` at `target`, replacing what was there.
pub(crate) fn relink(link: &Path, target: &Path) -> std::io::Result<()> {
    // Each directory change costs a journal handle, and on a host whose raft log fsyncs
    // all the time that is a large share of a start: make only the ones needed.
    match std::fs::read_link(link) {
        Ok(old) if old == target => return Ok(()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::os::unix::fs::symlink(target, link) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                done => return done,
            }
        }
        Err(_) => {}
    }
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relink_makes_replaces_and_keeps_links() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("current");
        let (a, b) = (dir.path().join("runner-a"), dir.path().join("runner-b"));
        // Absent: made.
        relink(&link, &a).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), a);
        // Already right: kept (same inode, nothing rewritten).
        let ino =
            |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p).unwrap());
        let before = ino(&link);
        relink(&link, &a).unwrap();
        assert_eq!(ino(&link), before);
        // Elsewhere: replaced, with no temporary link left behind.
        relink(&link, &b).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), b);
        assert!(!link.with_extension("new").exists());
        // A file in the way is replaced too.
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, b"not a link").unwrap();
        relink(&link, &a).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), a);
    }

    #[test]
    fn names_are_checked_and_consoles_read_by_lines_or_from_an_offset() {
        let root = tempfile::tempdir().unwrap();
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(VmDir::in_root(root.path(), bad).is_err(), "{bad:?}");
        }
        let d = VmDir::in_root(root.path(), "acme@web").unwrap();
        d.create().unwrap();
        assert_eq!(d.read_console(10, None).unwrap(), (String::new(), 0));
        std::fs::write(d.console(), "a\nb\nc\n").unwrap();
        assert_eq!(d.read_console(2, None).unwrap(), ("b\nc\n".into(), 6));
        assert_eq!(d.read_console(2, Some(4)).unwrap(), ("c\n".into(), 6));
        // Trimmed since: start over.
        assert_eq!(
            d.read_console(2, Some(60)).unwrap(),
            ("a\nb\nc\n".into(), 6)
        );
        assert_eq!(d.run_lines(2, 5), ["b", "c"]);
        assert_eq!(d.console_tail(1).unwrap(), ["c"]);
        // The record round-trips; a damaged one reads as none.
        assert_eq!(d.record(), None);
        let r = Record {
            generation: 4,
            failures: 2,
            ..Record::default()
        };
        d.write_record(&r).unwrap();
        assert_eq!(d.record(), Some(r));
        std::fs::write(d.path().join("assignment.json"), b"{").unwrap();
        assert_eq!(d.record(), None);
    }
}
