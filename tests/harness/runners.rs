//! Runners for the VM tests and benchmarks.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The test guest's kernel (`vmlinuz`) and initramfs (`initrd`), built once per
/// machine by `tests/fixtures/guest/build.sh` (in BLIXARD_GUEST_DIR, default
/// $TMPDIR/blixard-guest; needs apt-get, busybox-static, cpio).
pub fn guest_dir() -> PathBuf {
    let guest = std::env::var("BLIXARD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("blixard-guest"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/guest/build.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(&guest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the test guest failed (needs apt-get, busybox-static, cpio): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    guest
}

/// Writes `dir/bin/microvm-run` running `script` (sh).
pub fn write_runner(dir: &Path, script: &str) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let run = dir.join("bin/microvm-run");
    std::fs::write(&run, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Writes a runner running `script` under `dir/name` and imports it through `node` as
/// image `name`.
pub fn import_runner(node: &crate::Node, dir: &Path, name: &str, script: &str) {
    let image = dir.join(name);
    write_runner(&image, script);
    node.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", name]);
}

/// A runner the way microvm.nix writes one for QEMU, carrying its kernel and initrd (a
/// plain directory image, self-contained). The accelerator comes from
/// BLIXARD_TEST_ACCEL: tcg here, where KVM guests hang; kvm:tcg on real hosts.
pub fn guest_runner(dir: &Path) {
    let guest = guest_dir();
    std::fs::create_dir_all(dir.join("share")).unwrap();
    for f in ["vmlinuz", "initrd"] {
        std::fs::copy(guest.join(f), dir.join("share").join(f)).unwrap();
    }
    write_runner(
        dir,
        "d=$(dirname \"$0\")/../share\n\
         exec qemu-system-x86_64 -machine pc,accel=${BLIXARD_TEST_ACCEL:-kvm:tcg} -m 128 \
         -display none -nodefaults -serial stdio -no-reboot \
         -kernel \"$d/vmlinuz\" -initrd \"$d/initrd\" -append 'console=ttyS0 quiet panic=-1'",
    );
}

/// Kills, when dropped, every runner that the nodes under `root` started (their pid files,
/// `root/<node>/vms/<vm>/pid`): runners outlive their daemons by design, so a test that
/// fails leaves none behind.
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for node in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            for vm in std::fs::read_dir(node.path().join("vms"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let pid = std::fs::read_to_string(vm.path().join("pid")).unwrap_or_default();
                if let Some(pid) = pid.split_whitespace().next().and_then(|p| p.parse().ok()) {
                    if crate::alive(pid) {
                        let _ = std::process::Command::new("kill")
                            .args(["-KILL", "--", &format!("-{pid}")])
                            .status();
                    }
                }
            }
        }
    }
}
