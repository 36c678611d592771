//! The tap interfaces a runner asks for (`share/microvm/tap-interfaces`), made before the VM
//! starts and deleted after it is stopped, as microvm.nix's `microvm-tap-interfaces@` unit
//! does on NixOS hosts.
//!
//! Taps are made with iproute2's `ip` (`ip tuntap add name X mode tap [FLAGS]`, then
//! `ip link set X up`), with the flags the runner lists in `share/microvm/tap-flags`
//! (`vnet_hdr`, and `multi_queue` for runners with several queues). A tap that already
//! exists is reused, provided it is a tap with the same queue mode. No owner is set: the
//! runner runs as the daemon's user, which is the user that made the tap.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::{HostError, Runner};

/// iproute2's `ip`, looked up on PATH.
const IP: &str = "ip";

/// Bits of `/sys/class/net/NAME/tun_flags` (linux/if_tun.h).
const IFF_TAP: u32 = 0x0002;
const IFF_MULTI_QUEUE: u32 = 0x0100;

/// The flags of `share/microvm/tap-flags` that are passed on to `ip tuntap add`.
const KNOWN_FLAGS: [&str; 2] = ["vnet_hdr", "multi_queue"];

/// Checks a tap name as the kernel takes interface names: 1–15 bytes (IFNAMSIZ less the
/// NUL), not `.` or `..`, no `/`, `:` or whitespace. `%` is refused too: the kernel reads a
/// name with `%d` as a template and picks another name, which could then not be deleted.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > 15 {
        "is longer than 15 bytes"
    } else if name == "." || name == ".." {
        "is not a name"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains(':') {
        "contains ':'"
    } else if name.contains('%') {
        "contains '%'"
    } else if name.chars().any(char::is_whitespace) {
        "contains whitespace"
    } else {
        return Ok(());
    };
    Err(format!("invalid tap interface name {name:?}: it {why}"))
}

/// Parses `share/microvm/tap-interfaces`: one name a line; blank lines are ignored.
pub(crate) fn parse_list(text: &str) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = Vec::new();
    for line in text.lines() {
        // Whitespace around a name is dropped; whitespace inside one is refused.
        let name = line.trim();
        if name.is_empty() {
            continue;
        }
        check_name(name)?;
        if names.iter().any(|n| n == name) {
            return Err(format!("tap interface {name:?} is listed twice"));
        }
        names.push(name.to_string());
    }
    Ok(names)
}

/// Parses `share/microvm/tap-flags` (flags separated by whitespace).
fn parse_flags(text: &str) -> Result<Vec<&'static str>, String> {
    let mut flags = Vec::new();
    for word in text.split_whitespace() {
        let known = KNOWN_FLAGS
            .iter()
            .find(|k| **k == word)
            .ok_or_else(|| format!("unknown tap flag {word:?} (known: vnet_hdr, multi_queue)"))?;
        if !flags.contains(known) {
            flags.push(*known);
        }
    }
    Ok(flags)
}

/// The runner's tap flags; none when it has no `share/microvm/tap-flags`.
pub(crate) fn flags(runner: &Runner) -> Result<Vec<&'static str>, HostError> {
    let bad =
        |e: String| HostError::Runner(runner.dir.clone(), format!("share/microvm/tap-flags: {e}"));
    match std::fs::read_to_string(runner.dir.join("share/microvm/tap-flags")) {
        Ok(text) => parse_flags(&text).map_err(bad),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// `/sys/class/net/NAME/tun_flags`, if NAME is a tun or tap device.
fn tun_flags(name: &str) -> Option<u32> {
    let text =
        std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("tun_flags")).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

fn exists(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .symlink_metadata()
        .is_ok()
}

/// Runs `program args…`; the error says what failed and why (stderr, or that it is missing).
fn run_ip(program: &str, args: &[&str]) -> Result<(), std::io::Error> {
    let shown = format!("`ip {}`", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot run {shown}: `{program}` (iproute2) is not installed or not on PATH"),
                )
            } else {
                std::io::Error::new(e.kind(), format!("cannot run {shown}: {e}"))
            }
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(std::io::Error::other(format!(
        "{shown} failed ({}): {}",
        out.status,
        stderr.trim()
    )))
}

/// Makes the taps that are missing and sets every one up. Returns the names it made; on an
/// error it deletes those again, and the error names the interface and the reason.
pub(crate) fn create(vm: &str, taps: &[String], flags: &[&str]) -> Result<Vec<String>, HostError> {
    create_with(IP, vm, taps, flags)
}

fn create_with(
    program: &str,
    vm: &str,
    taps: &[String],
    flags: &[&str],
) -> Result<Vec<String>, HostError> {
    let mut made = Vec::new();
    for tap in taps {
        if let Err(source) = create_one(program, tap, flags, &mut made) {
            delete_with(program, vm, &made);
            return Err(HostError::Io {
                vm: vm.to_string(),
                what: "setting up tap interfaces",
                source,
            });
        }
    }
    Ok(made)
}

fn create_one(
    program: &str,
    tap: &str,
    flags: &[&str],
    made: &mut Vec<String>,
) -> Result<(), std::io::Error> {
    let want_mq = flags.contains(&"multi_queue");
    match tun_flags(tap) {
        Some(f) if f & IFF_TAP == 0 => {
            return Err(std::io::Error::other(format!(
                "{tap}: an interface of that name exists and is a tun, not a tap device"
            )))
        }
        Some(f) if (f & IFF_MULTI_QUEUE != 0) != want_mq => {
            let (has, wants) = if want_mq {
                ("without", "with")
            } else {
                ("with", "without")
            };
            return Err(std::io::Error::other(format!(
                "{tap}: the tap exists {has} multi_queue, but the runner wants it {wants}; delete it first"
            )));
        }
        Some(_) => {}
        None if exists(tap) => {
            return Err(std::io::Error::other(format!(
                "{tap}: an interface of that name exists and is not a tap device"
            )))
        }
        None => {
            let mut args = vec!["tuntap", "add", "name", tap, "mode", "tap"];
            args.extend_from_slice(flags);
            run_ip(program, &args).map_err(|e| prefix(tap, e))?;
            made.push(tap.to_string());
        }
    }
    run_ip(program, &["link", "set", tap, "up"]).map_err(|e| prefix(tap, e))
}

fn prefix(tap: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{tap}: {e}"))
}

/// Deletes the taps of a stopped VM. Interfaces that are gone are skipped; one that is not
/// a tap is left alone. Failures are logged, not returned: the VM is already stopped.
pub(crate) fn delete(vm: &str, taps: &[String]) {
    delete_with(IP, vm, taps)
}

fn delete_with(program: &str, vm: &str, taps: &[String]) {
    for tap in taps {
        match tun_flags(tap) {
            None if !exists(tap) => {}
            Some(f) if f & IFF_TAP != 0 => {
                if let Err(e) = run_ip(program, &["link", "delete", tap]) {
                    tracing::warn!(vm, tap = %tap, "could not delete the tap interface: {e}");
                }
            }
            _ => tracing::warn!(vm, tap = %tap, "not deleting the interface: it is not a tap"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_like_the_kernel_does() {
        for ok in ["vm-a1", "tap0", "x", "abcdefghijklmno", "vm_web.0"] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "abcdefghijklmnop",
            ".",
            "..",
            "a/b",
            "a:0",
            "a b",
            "a\tb",
            "tap%d",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let e = check_name("much-too-long-name").unwrap_err();
        assert!(e.contains("much-too-long-name") && e.contains("15"), "{e}");
    }

    #[test]
    fn the_list_is_one_name_a_line() {
        assert_eq!(
            parse_list("vm-a1\nvm-a2\r\n\n  \nvm-a3  \n").unwrap(),
            vec!["vm-a1", "vm-a2", "vm-a3"]
        );
        assert!(parse_list("vm-a1 vm-a2\n")
            .unwrap_err()
            .contains("whitespace"));
        assert_eq!(parse_list(" vm-a1\n").unwrap(), vec!["vm-a1"]);
        assert!(parse_list("vm-a1\nvm-a1\n").unwrap_err().contains("twice"));
        assert_eq!(parse_list("").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn flags_are_the_ones_microvm_nix_writes() {
        assert_eq!(
            parse_flags("vnet_hdr\nmulti_queue\n").unwrap(),
            vec!["vnet_hdr", "multi_queue"]
        );
        assert_eq!(parse_flags("").unwrap(), Vec::<&str>::new());
        assert!(parse_flags("vnet_hdr one_queue")
            .unwrap_err()
            .contains("one_queue"));
    }

    /// `ip` missing or failing: the error names the interface and says why.
    #[test]
    fn a_missing_or_failing_ip_is_a_clear_error() {
        // A name no host has, so create_one goes on to run `ip`.
        let taps = vec!["blxnone0".to_string()];
        let e = create_with("/nonexistent/ip", "web", &taps, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("VM web") && e.contains("blxnone0"), "{e}");
        assert!(e.contains("not installed"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("ip");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'ioctl(TUNSETIFF): Operation not permitted' >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = create_with(fake.to_str().unwrap(), "web", &taps, &["multi_queue"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("blxnone0"), "{e}");
        assert!(
            e.contains("tuntap add name blxnone0 mode tap multi_queue"),
            "{e}"
        );
        assert!(e.contains("Operation not permitted"), "{e}");
    }
}
