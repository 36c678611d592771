//! Tap interfaces and cgroup limits against the real kernel, with runners that are shell
//! scripts (no hypervisor needed).
//!
//! Making taps needs /dev/net/tun, iproute2 and CAP_NET_ADMIN; the cgroup test needs a
//! writable cgroup v2 mount, and checks `memory.max`/`cpu.max` where that hierarchy offers
//! the memory and cpu controllers. Each test probes for its kernel facility first and, only
//! when it is absent, prints why and skips (that part).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blixard_host::{HostError, Limits, ProcessSupervisor, Runner, VmState};
use blixard_tests::runners::write_runner;
use blixard_tests::wait_for;

/// A runner whose `bin/microvm-run` is `script`, with optional `share/microvm` files.
fn runner(root: &Path, name: &str, script: &str, share: &[(&str, &str)]) -> Runner {
    let dir = root.join(name);
    write_runner(&dir, script);
    std::fs::create_dir_all(dir.join("share/microvm")).unwrap();
    for (file, text) in share {
        std::fs::write(dir.join("share/microvm").join(file), text).unwrap();
    }
    Runner::new(&dir).unwrap()
}

/// A tap name unique to this test process (at most 15 bytes).
fn tap(tag: &str) -> String {
    format!("blx{:x}{tag}", std::process::id())
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn tun_flags(name: &str) -> u32 {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).unwrap();
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap()
}

/// Whether this machine can make taps at all: /dev/net/tun, `ip`, and the right to use
/// them, probed with `ip` itself (not with the code under test).
fn taps_available() -> Result<(), String> {
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun does not exist".into());
    }
    let probe = tap("p");
    ip(&["tuntap", "add", "name", &probe, "mode", "tap"])
        .map_err(|e| format!("`ip tuntap add` does not work here: {e}"))?;
    ip(&["link", "delete", &probe]).map_err(|e| format!("`ip link delete` failed: {e}"))?;
    Ok(())
}

/// A writable cgroup v2 mount, if the machine has one.
fn cgroup2_mount() -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
    let mount = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
        .ok_or("no cgroup2 file system is mounted")?;
    let probe = mount.join(format!("blixard-probe-{}", std::process::id()));
    std::fs::create_dir(&probe)
        .map_err(|e| format!("cannot make a cgroup under {}: {e}", mount.display()))?;
    std::fs::remove_dir(&probe).map_err(|e| format!("cannot remove {}: {e}", probe.display()))?;
    Ok(mount)
}

/// Cleans up after a failed test: stops the VMs, deletes taps, removes cgroup dirs.
struct Cleanup<'a> {
    s: &'a ProcessSupervisor,
    vms: Vec<&'static str>,
    taps: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for vm in &self.vms {
            if let Ok(VmState::Running { .. }) = self.s.state(vm) {
                let _ = self.s.stop(vm, Duration::from_secs(5));
            }
        }
        for t in &self.taps {
            if link_exists(t) {
                let _ = ip(&["link", "delete", t]);
            }
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The script records the host's links as the runner sees them, then becomes the "VM".
const RECORD_LINKS: &str =
    "ip -o link show > links.tmp 2>&1; mv links.tmp links.txt; exec sleep 1000";

#[test]
fn listed_taps_exist_before_the_runner_runs_and_are_gone_after_stop() {
    if let Err(why) = taps_available() {
        println!("SKIPPED: cannot make tap interfaces on this machine: {why}");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let s = ProcessSupervisor::new(&root.path().join("state"), 1 << 20).unwrap();
    let (a, b) = (tap("a"), tap("b"));
    let _cleanup = Cleanup {
        s: &s,
        vms: vec!["net"],
        taps: vec![a.clone(), b.clone()],
        dirs: vec![],
    };
    // `b` is there already (as after a host crash) and is reused, not made again.
    ip(&["tuntap", "add", "name", &b, "mode", "tap", "multi_queue"]).unwrap();
    let b_index = std::fs::read_to_string(format!("/sys/class/net/{b}/ifindex")).unwrap();
    let r = runner(
        root.path(),
        "runner",
        RECORD_LINKS,
        &[
            ("tap-interfaces", &format!("{a}\n{b}\n")),
            ("tap-flags", "vnet_hdr\nmulti_queue\n"),
        ],
    );
    assert_eq!(r.tap_interfaces().unwrap(), vec![a.clone(), b.clone()]);

    let pid = s.start("net", &r).unwrap();
    let dir = s.dir("net").unwrap().path().to_path_buf();
    let links = wait_for("the runner's links.txt", Duration::from_secs(10), || {
        std::fs::read_to_string(dir.join("links.txt")).map_err(|e| e.to_string())
    });
    for name in [&a, &b] {
        let line = links
            .lines()
            .find(|l| l.contains(&format!(" {name}: ")))
            .unwrap_or_else(|| panic!("{name} not in the runner's `ip link show`:\n{links}"));
        let flags = &line[line.find('<').unwrap() + 1..line.find('>').unwrap()];
        assert!(
            flags.split(',').any(|f| f == "UP"),
            "{name} is not up: {line}"
        );
        assert!(ip(&["link", "show", "dev", name]).is_ok());
        assert_ne!(tun_flags(name) & 0x0100, 0, "{name} is multi_queue");
    }
    assert_eq!(
        std::fs::read_to_string(format!("/sys/class/net/{b}/ifindex")).unwrap(),
        b_index,
        "the existing tap was reused"
    );
    assert!(!dir.join("cgroup").exists(), "no limits, no cgroup");
    assert_eq!(s.state("net").unwrap(), VmState::Running { pid });

    let stopped = s.stop("net", Duration::from_secs(10)).unwrap();
    assert!(matches!(stopped, VmState::Exited { .. }), "{stopped:?}");
    for name in [&a, &b] {
        assert!(!link_exists(name), "{name} still exists after stop");
        assert!(ip(&["link", "show", "dev", name]).is_err());
    }
}

#[test]
fn a_bad_tap_list_refuses_to_start_and_nothing_runs() {
    let root = tempfile::tempdir().unwrap();
    let s = ProcessSupervisor::new(&root.path().join("state"), 1 << 20).unwrap();
    let good = tap("g");
    let _cleanup = Cleanup {
        s: &s,
        vms: vec!["bad"],
        taps: vec![good.clone()],
        dirs: vec![],
    };
    for (list, named) in [
        (format!("{good}\nbad/name\n"), "bad/name"),
        (
            format!("{good}\nmuch-too-long-tap0\n"),
            "much-too-long-tap0",
        ),
        (format!("{good}\nvm a1\n"), "vm a1"),
        (format!("{good}\neth:0\n"), "eth:0"),
    ] {
        let r = runner(
            root.path(),
            "bad-runner",
            "touch ran; exec sleep 1000",
            &[("tap-interfaces", &list)],
        );
        let e = s.start("bad", &r).unwrap_err();
        assert!(matches!(e, HostError::Runner(..)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("tap-interfaces") && msg.contains(named),
            "{msg}"
        );
        assert_eq!(s.state("bad").unwrap(), VmState::Absent);
        assert!(!s
            .dir("bad")
            .unwrap()
            .path()
            .to_path_buf()
            .join("ran")
            .exists());
        assert!(!link_exists(&good), "nothing is made for a bad list");
    }
    // Flags microvm.nix does not write are refused too.
    let r = runner(
        root.path(),
        "bad-flags",
        "touch ran; exec sleep 1000",
        &[("tap-interfaces", &good), ("tap-flags", "vnet_hdr tun\n")],
    );
    let msg = s.start("bad", &r).unwrap_err().to_string();
    assert!(
        msg.contains("tap-flags") && msg.contains("\"tun\""),
        "{msg}"
    );

    // An interface that exists and is not a tap is never taken over (nor deleted), and a
    // tap made for the same start is deleted again.
    let r = runner(
        root.path(),
        "not-a-tap",
        "touch ran; exec sleep 1000",
        &[("tap-interfaces", &format!("{good}\nlo\n"))],
    );
    let taps = taps_available();
    let msg = s.start("bad", &r).unwrap_err().to_string();
    match taps {
        Ok(()) => {
            assert!(msg.contains("VM bad") && msg.contains("lo: "), "{msg}");
            assert!(msg.contains("not a tap"), "{msg}");
        }
        Err(why) => println!("SKIPPED the part that makes a tap: {why} ({msg})"),
    }
    assert!(link_exists("lo"));
    assert!(
        !link_exists(&good),
        "the tap made before the failure is gone"
    );
    assert!(!s
        .dir("bad")
        .unwrap()
        .path()
        .to_path_buf()
        .join("ran")
        .exists());
    assert_eq!(s.state("bad").unwrap(), VmState::Absent);
}

#[test]
fn limits_put_the_runner_in_its_cgroup_which_goes_after_stop() {
    let mount = match cgroup2_mount() {
        Ok(m) => m,
        Err(why) => {
            println!("SKIPPED: no usable cgroup v2 here: {why}");
            return;
        }
    };
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let parent = mount.join(format!("blixard-test-{}", std::process::id()));
    let cg = parent.join("vm-lim");
    let first = ProcessSupervisor::new(&state, 1 << 20)
        .unwrap()
        .with_cgroup_parent(Some(parent.clone()));
    let _cleanup = Cleanup {
        s: &first,
        vms: vec!["lim"],
        taps: vec![],
        dirs: vec![cg.clone(), parent.clone()],
    };
    let r = runner(root.path(), "runner", "exec sleep 1000", &[]);
    let limits = Limits {
        vcpus: 2,
        memory_mib: 512,
    };
    let pid = first.start_with("lim", &r, Some(&limits)).unwrap();

    let recorded = std::fs::read_to_string(
        first
            .dir("lim")
            .unwrap()
            .path()
            .to_path_buf()
            .join("cgroup"),
    )
    .unwrap();
    assert_eq!(recorded.trim(), cg.display().to_string());
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "pid {pid} not in {}: {procs:?}",
        cg.display()
    );
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = cg.strip_prefix(&mount).unwrap().display().to_string();
    assert!(
        own.lines().any(|l| l == format!("0::/{rel}")),
        "/proc/{pid}/cgroup: {own}"
    );

    // The limits, where this hierarchy has the controllers (the root offers what exists).
    let offered = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap();
    let offered: Vec<&str> = offered.split_whitespace().collect();
    for (controller, file, want) in [
        ("memory", "memory.max", ((512 + 128 + 64) << 20).to_string()),
        ("cpu", "cpu.max", "200000 100000".to_string()),
    ] {
        if offered.contains(&controller) {
            let got = std::fs::read_to_string(cg.join(file)).unwrap();
            assert_eq!(got.trim(), want, "{file}");
        } else {
            println!(
                "SKIPPED the {file} check: the cgroup v2 hierarchy at {} has no {controller} \
                 controller (it offers: {offered:?})",
                mount.display()
            );
            assert!(!cg.join(file).exists());
        }
    }

    // A new supervisor (after a daemon restart; its default parent differs) adopts the VM,
    // and stopping it removes the cgroup the state dir names.
    let second = ProcessSupervisor::new(&state, 1 << 20).unwrap();
    assert_eq!(second.state("lim").unwrap(), VmState::Running { pid });
    let stopped = second.stop("lim", Duration::from_secs(10)).unwrap();
    assert!(matches!(stopped, VmState::Exited { .. }), "{stopped:?}");
    assert!(!cg.exists(), "{} is still there", cg.display());
    assert!(!second
        .dir("lim")
        .unwrap()
        .path()
        .to_path_buf()
        .join("cgroup")
        .exists());
    // The parent stays for the next VM; it holds nothing now.
    std::fs::remove_dir(&parent).unwrap();
}

#[test]
fn without_a_usable_cgroup_the_vm_still_starts() {
    let root = tempfile::tempdir().unwrap();
    // A plain directory, not a cgroup: setting the cgroup up fails.
    let plain = root.path().join("not-a-cgroup");
    std::fs::create_dir_all(&plain).unwrap();
    let limits = Limits {
        vcpus: 1,
        memory_mib: 128,
    };
    for parent in [Some(plain.join("blixard.slice")), Some(plain.clone()), None] {
        let s = ProcessSupervisor::new(&root.path().join("state"), 1 << 20)
            .unwrap()
            .with_cgroup_parent(parent.clone());
        let _cleanup = Cleanup {
            s: &s,
            vms: vec!["free"],
            taps: vec![],
            dirs: vec![],
        };
        let r = runner(root.path(), "runner", "exec sleep 1000", &[]);
        let pid = s.start_with("free", &r, Some(&limits)).unwrap();
        assert_eq!(
            s.state("free").unwrap(),
            VmState::Running { pid },
            "{parent:?}"
        );
        assert!(!s
            .dir("free")
            .unwrap()
            .path()
            .to_path_buf()
            .join("cgroup")
            .exists());
        assert_eq!(
            std::fs::read_dir(&plain).unwrap().count(),
            0,
            "nothing is made in a directory that is not a cgroup"
        );
        let stopped = s.stop("free", Duration::from_secs(10)).unwrap();
        assert!(matches!(stopped, VmState::Exited { .. }), "{stopped:?}");
    }
}
