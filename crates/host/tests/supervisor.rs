//! The process supervisor against real runners: a QEMU guest (TCG here; the same runner
//! uses KVM where it works) that prints a marker, re-adoption after the supervisor is
//! gone, runners that exit at once, and the console cap.
//!
//! Needs qemu-system-x86, busybox-static, cpio and the Debian cloud kernel, which
//! `tests/fixtures/guest/build.sh` fetches (`scripts/test.sh` installs the rest).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blixard_host::{HostError, ProcessSupervisor, Runner, VmState};
use blixard_tests::runners::write_runner;
use blixard_tests::wait_for;

fn guest() -> PathBuf {
    blixard_tests::runners::guest_dir()
}

fn runner(root: &Path, name: &str, script: &str) -> Runner {
    let dir = root.join(name);
    write_runner(&dir, script);
    Runner::new(&dir).unwrap()
}

/// A runner the way microvm.nix writes one for QEMU, with the accelerator taken from
/// BLIXARD_TEST_ACCEL (tcg here, where KVM guests hang; kvm:tcg on real hosts).
fn qemu_runner(root: &Path, name: &str, append: &str) -> Runner {
    let g = guest();
    runner(
        root,
        name,
        &format!(
            "exec qemu-system-x86_64 -machine pc,accel=${{BLIXARD_TEST_ACCEL:-kvm:tcg}} -m 256 \
             -display none -nodefaults -serial stdio -no-reboot \
             -kernel {k} -initrd {i} -append 'console=ttyS0 quiet panic=-1 {append}'",
            k = g.join("vmlinuz").display(),
            i = g.join("initrd").display(),
        ),
    )
}

fn console_has(s: &ProcessSupervisor, vm: &str, marker: &str) -> Result<(), String> {
    let lines = s.console_tail(vm, 200).unwrap();
    if lines.iter().any(|l| l.contains(marker)) {
        Ok(())
    } else {
        Err(lines.join("\n"))
    }
}

#[test]
fn a_real_guest_boots_prints_its_marker_and_stops() {
    std::env::set_var("BLIXARD_TEST_ACCEL", "tcg");
    let root = tempfile::tempdir().unwrap();
    let s = ProcessSupervisor::new(&root.path().join("state"), 1 << 20).unwrap();
    let r = qemu_runner(root.path(), "runner", "");
    let pid = s.start("web", &r).unwrap();
    assert_eq!(s.start("web", &r).unwrap(), pid, "start is idempotent");
    wait_for("the guest's marker", Duration::from_secs(120), || {
        console_has(&s, "web", "BLIXARD-GUEST-UP")
    });
    wait_for("the guest to tick", Duration::from_secs(60), || {
        console_has(&s, "web", "tick 2")
    });
    assert_eq!(s.state("web").unwrap(), VmState::Running { pid });
    let dir = root.path().join("state/web");
    assert_eq!(std::fs::read_link(dir.join("booted")).unwrap(), r.dir);
    assert_eq!(std::fs::read_link(dir.join("current")).unwrap(), r.dir);
    // No microvm-shutdown: SIGTERM to the group; QEMU exits.
    let stopped = s.stop("web", Duration::from_secs(20)).unwrap();
    assert!(matches!(stopped, VmState::Exited { .. }), "{stopped:?}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(matches!(
        s.stop("web", Duration::from_secs(1)),
        Err(HostError::NotRunning(_))
    ));
}

#[test]
fn a_new_supervisor_adopts_running_vms_and_can_stop_them() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let r = runner(
        root.path(),
        "sleeper",
        "echo up; trap 'echo stopping; exit 0' TERM; while true; do sleep 0.1; done",
    );
    let pid = {
        let first = ProcessSupervisor::new(&state, 1 << 20).unwrap();
        first.start("vm1", &r).unwrap()
        // The first supervisor (a daemon) goes away; the runner does not.
    };
    wait_for("the runner", Duration::from_secs(10), || {
        Path::new(&format!("/proc/{pid}"))
            .exists()
            .then_some(())
            .ok_or_else(|| "gone".to_string())
    });
    let second = ProcessSupervisor::new(&state, 1 << 20).unwrap();
    assert_eq!(second.running(), vec![("vm1".to_string(), pid)]);
    assert_eq!(second.state("vm1").unwrap(), VmState::Running { pid });
    second.stop("vm1", Duration::from_secs(10)).unwrap();
    wait_for(
        "the runner to go",
        Duration::from_secs(10),
        || match second.state("vm1").unwrap() {
            VmState::Exited { .. } => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // A stale pid file (the process is gone) is not adopted.
    assert!(second.running().is_empty());
    // The first supervisor's child is a zombie until reaped by this test process; reap it.
    let _ = std::process::Command::new("true").status();
}

#[test]
fn runners_that_exit_or_are_not_runners_are_reported() {
    let root = tempfile::tempdir().unwrap();
    let s = ProcessSupervisor::new(&root.path().join("state"), 1 << 20).unwrap();
    let r = runner(
        root.path(),
        "broken",
        "echo 'qemu: could not open disk image'; exit 3",
    );
    s.start("bad", &r).unwrap();
    let state = wait_for("the runner to exit", Duration::from_secs(10), || {
        match s.state("bad").unwrap() {
            VmState::Running { .. } => Err("still running".into()),
            other => Ok(other),
        }
    });
    assert_eq!(state, VmState::Exited { code: Some(3) });
    assert_eq!(
        s.console_tail("bad", 5).unwrap(),
        vec!["qemu: could not open disk image".to_string()]
    );
    // Not a runner at all.
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = Runner::new(&empty).unwrap_err().to_string();
    assert!(e.contains("microvm-run"), "{e}");
    std::fs::create_dir_all(empty.join("bin")).unwrap();
    std::fs::write(empty.join("bin/microvm-run"), "not executable").unwrap();
    assert!(Runner::new(&empty).is_err());
    assert!(matches!(
        s.start("../escape", &r),
        Err(HostError::BadName(_))
    ));
}

#[test]
fn microvm_shutdown_is_used_and_the_console_stays_under_its_cap() {
    let root = tempfile::tempdir().unwrap();
    let s = ProcessSupervisor::new(&root.path().join("state"), 64 << 10).unwrap();
    let r = runner(
        root.path(),
        "chatty",
        "i=0; trap 'echo graceful; exit 0' USR1; while true; do i=$((i+1)); echo \"line $i of a chatty console\"; done",
    );
    let shutdown = r.dir.join("bin/microvm-shutdown");
    std::fs::write(
        &shutdown,
        "#!/bin/sh\nkill -USR1 \"$(cut -d' ' -f1 pid)\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&shutdown, std::fs::Permissions::from_mode(0o755)).unwrap();
    s.start("chatty", &r).unwrap();
    let path = s.dir("chatty").unwrap().console();
    wait_for("console output", Duration::from_secs(10), || {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        (len > 256 << 10)
            .then_some(())
            .ok_or(format!("{len} bytes"))
    });
    s.trim_console("chatty").unwrap();
    s.stop("chatty", Duration::from_secs(10)).unwrap();
    s.trim_console("chatty").unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len <= 64 << 10, "console is {len} bytes");
    let tail = s.console_tail("chatty", 1).unwrap();
    assert_eq!(
        tail,
        vec!["graceful".to_string()],
        "stopped by microvm-shutdown"
    );
}
