//! Resource limits for a VM through cgroup v2, where the host offers it.
//!
//! A VM started with [`Limits`] runs in its own cgroup, `<parent>/vm-<name>`, with
//! `memory.max` and `cpu.max` set. The parent (by default [`DEFAULT_PARENT`]) is made when
//! missing, inside an existing cgroup v2 directory, and the memory and cpu controllers are
//! enabled in its `cgroup.subtree_control` (and, if needed, in its own parent's). Where
//! that cannot be done (no cgroup v2 there, read-only, no permission, a controller the
//! hierarchy does not offer) the VM runs anyway and the supervisor warns once, saying why.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where VM cgroups go unless the supervisor is told otherwise.
pub const DEFAULT_PARENT: &str = "/sys/fs/cgroup/blixard.slice";

/// The `cpu.max` period, in µs (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The hypervisor's own memory, on top of guest RAM: a quarter of the guest's RAM plus
/// 64 MiB. Besides guest RAM, QEMU or cloud-hypervisor hold device models, I/O buffers,
/// vhost and worker threads' stacks, and page tables that grow with the guest: tens of MiB
/// and a share of the guest's size. This margin keeps the OOM killer for a hypervisor that
/// really runs away, not for a guest that merely uses all of its RAM.
const OVERHEAD_MIB: u64 = 64;

/// What a VM may use of its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The VM's vCPUs: it may use that many CPUs' worth of time (`cpu.max`). 0: no limit.
    pub vcpus: u32,
    /// The guest's RAM. The cgroup's `memory.max` is this plus a quarter plus 64 MiB, for
    /// the hypervisor's own memory. 0: no limit.
    pub memory_mib: u64,
}

impl Limits {
    /// `memory.max` in bytes.
    pub(crate) fn memory_max(&self) -> Option<u64> {
        let guest = self.memory_mib.saturating_mul(1 << 20);
        (self.memory_mib > 0).then(|| {
            guest
                .saturating_add(guest / 4)
                .saturating_add(OVERHEAD_MIB << 20)
        })
    }

    /// `cpu.max`: the quota and the period, in µs.
    pub(crate) fn cpu_max(&self) -> Option<String> {
        (self.vcpus > 0)
            .then(|| format!("{} {CPU_PERIOD_US}", u64::from(self.vcpus) * CPU_PERIOD_US))
    }
}

/// A VM's cgroup once made: its path, and each limit it could not set, with the reason.
#[derive(Debug)]
pub(crate) struct Setup {
    pub(crate) path: PathBuf,
    pub(crate) unenforced: Vec<String>,
}

/// Makes (or reuses) `<parent>/vm-<vm>` and writes the limits into it. An error means no
/// cgroup at all, and says why.
pub(crate) fn setup(parent: &Path, vm: &str, limits: &Limits) -> Result<Setup, String> {
    ensure_parent(parent)?;
    let path = parent.join(format!("vm-{vm}"));
    let wanted = [
        (
            "memory",
            "memory.max",
            limits.memory_max().map(|b| b.to_string()),
        ),
        ("cpu", "cpu.max", limits.cpu_max()),
    ];
    let mut unenforced = Vec::new();
    let mut enabled = Vec::new();
    for (controller, file, value) in &wanted {
        if value.is_some() {
            match enable(parent, controller) {
                Ok(()) => enabled.push(*controller),
                Err(why) => unenforced.push(format!("{file}: {why}")),
            }
        }
    }
    match std::fs::create_dir(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", path.display())),
    }
    for (controller, file, value) in wanted {
        let target = path.join(file);
        match value {
            Some(value) if enabled.contains(&controller) => {
                if let Err(e) = std::fs::write(&target, &value) {
                    unenforced.push(format!("{file}: writing {value:?}: {e}"));
                }
            }
            Some(_) => {}
            // No limit asked for: lift one a reused cgroup may still carry.
            None if target.exists() => {
                let max = if controller == "cpu" {
                    format!("max {CPU_PERIOD_US}")
                } else {
                    "max".to_string()
                };
                let _ = std::fs::write(&target, max);
            }
            None => {}
        }
    }
    Ok(Setup { path, unenforced })
}

/// The parent must be a cgroup v2 directory, or be creatable inside one.
fn ensure_parent(parent: &Path) -> Result<(), String> {
    if parent.join("cgroup.controllers").is_file() {
        return Ok(());
    }
    if parent.exists() {
        return Err(format!(
            "{} is not a cgroup v2 directory (it has no cgroup.controllers)",
            parent.display()
        ));
    }
    let above = parent
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", parent.display()))?;
    if !above.join("cgroup.controllers").is_file() {
        return Err(format!(
            "{} is not a cgroup v2 directory (it has no cgroup.controllers; is cgroup2 mounted there?)",
            above.display()
        ));
    }
    match std::fs::create_dir(parent) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", parent.display())),
    }
}

fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Enables `controller` for the children of `parent`; a controller reaches `parent` only
/// when its own parent enables it, so that is done first when needed.
fn enable(parent: &Path, controller: &str) -> Result<(), String> {
    let has = |dir: &Path, file: &str| words(&dir.join(file)).iter().any(|w| w == controller);
    if has(parent, "cgroup.subtree_control") {
        return Ok(());
    }
    if !has(parent, "cgroup.controllers") {
        match parent.parent() {
            Some(above) if has(above, "cgroup.controllers") => {
                write_control(above, controller)?;
            }
            _ => {
                let offered = words(&parent.join("cgroup.controllers")).join(" ");
                return Err(format!(
                    "the {controller} controller is not available under {} (it offers: {})",
                    parent.display(),
                    if offered.is_empty() { "none" } else { &offered }
                ));
            }
        }
    }
    write_control(parent, controller)
}

fn write_control(dir: &Path, controller: &str) -> Result<(), String> {
    std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}")).map_err(|e| {
        format!(
            "enabling the {controller} controller in {}/cgroup.subtree_control: {e}",
            dir.display()
        )
    })
}

/// Moves process `pid` (and so everything it starts from then on) into the cgroup.
pub(crate) fn attach(cgroup: &Path, pid: u32) -> std::io::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
}

/// Removes a stopped VM's cgroup. While processes remain in it (the kernel says EBUSY) it
/// retries for two seconds, then leaves it with a warning. True when it is gone.
pub(crate) fn remove(vm: &str, cgroup: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(vm, cgroup = %cgroup.display(), "could not remove the VM's cgroup: {e}");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_cgroup_values() {
        let l = Limits {
            vcpus: 2,
            memory_mib: 512,
        };
        assert_eq!(l.memory_max(), Some((512 + 128 + 64) << 20));
        assert_eq!(l.cpu_max().as_deref(), Some("200000 100000"));
        let none = Limits {
            vcpus: 0,
            memory_mib: 0,
        };
        assert_eq!(none.memory_max(), None);
        assert_eq!(none.cpu_max(), None);
        let huge = Limits {
            vcpus: u32::MAX,
            memory_mib: u64::MAX,
        };
        assert_eq!(huge.memory_max(), Some(u64::MAX));
        assert!(huge.cpu_max().is_some());
    }

    /// The file protocol against a stand-in hierarchy of plain files (for hosts whose cgroup
    /// v2 lacks the memory and cpu controllers; tests/limits.rs checks the real one where
    /// it has them): controllers are enabled top-down, then the limits are written.
    #[test]
    fn controllers_are_enabled_from_the_top_and_limits_written() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let parent = root.path().join("blixard.slice");
        let l = Limits {
            vcpus: 3,
            memory_mib: 1024,
        };
        let s = setup(&parent, "web", &l).unwrap();
        assert_eq!(s.path, parent.join("vm-web"));
        assert!(s.unenforced.is_empty(), "{:?}", s.unenforced);
        // Plain files keep only the last write: cpu came after memory.
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&root.path().join("cgroup.subtree_control")), "+cpu");
        assert_eq!(read(&parent.join("cgroup.subtree_control")), "+cpu");
        assert_eq!(
            read(&s.path.join("memory.max")),
            ((1024 + 256 + 64) << 20).to_string()
        );
        assert_eq!(read(&s.path.join("cpu.max")), "300000 100000");

        // A hierarchy without the controllers: the cgroup is made, the limits are reported.
        let bare = tempfile::tempdir().unwrap();
        std::fs::write(bare.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let s = setup(bare.path(), "web", &l).unwrap();
        assert!(s.path.is_dir());
        assert_eq!(s.unenforced.len(), 2, "{:?}", s.unenforced);
        assert!(s.unenforced[0].contains("memory controller is not available"));
        assert!(s.unenforced[0].contains("hugetlb"));
        assert!(!s.path.join("memory.max").exists());
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("blixard.slice");
        let l = Limits {
            vcpus: 1,
            memory_mib: 64,
        };
        let e = setup(&parent, "web", &l).unwrap_err();
        assert!(e.contains("cgroup.controllers"), "{e}");
        assert!(
            !parent.exists(),
            "nothing is made outside a cgroup hierarchy"
        );
        let e = setup(dir.path(), "web", &l).unwrap_err();
        assert!(e.contains("not a cgroup v2 directory"), "{e}");
        assert!(!dir.path().join("vm-web").exists());
    }
}
