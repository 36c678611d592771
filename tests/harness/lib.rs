//! A harness for process tests: starts real `blixard` daemons in temp dirs on loopback
//! and drives them through the real CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cluster;
mod node;
mod process;

pub mod api;
pub mod bench;
pub mod http;
pub mod linear;
pub mod load;
pub mod netns;
pub mod otlp;
pub mod proxy;
pub mod runners;
pub mod systemd;

pub use cluster::Cluster;
pub use node::Node;
pub use process::*;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `blixard` binary: `BLIXARD_BIN`, or the one next to this test's target dir.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("BLIXARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/blixard
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("blixard");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bin blixard` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A free UDP port on loopback.
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, or fails the test after `timeout` with `what` and
/// the last thing observed.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A small deterministic generator (seeded, so a failing run repeats): the next number.
pub fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *seed >> 33
}

/// A number from the environment, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes `mib` MiB of seeded noise (incompressible, the same for the same seed).
pub fn random_file(path: &Path, mib: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = vec![0u8; mib << 20];
    for chunk in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, bytes).unwrap();
}

/// The bytes of the files under `dir`, recursively (0 if it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}
