//! What benchmarks print about the machine they ran on.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub fn read_first_line_with(path: &str, prefix: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The mount (device, mount point, fs type) holding `path`: the longest matching prefix.
pub fn mount_of(path: &Path) -> Option<(String, String, String)> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.to_string(),
                f.get(1)?.to_string(),
                f.get(2)?.to_string(),
            ))
        })
        .filter(|(_, mnt, _)| path.starts_with(mnt))
        .max_by_key(|(_, mnt, _)| mnt.len())
}

/// What kind of disk a block device is, as far as sysfs tells.
pub fn disk_kind(device: &str) -> String {
    let Some(name) = device.strip_prefix("/dev/") else {
        return "not a block device".into();
    };
    // vda1 -> vda, nvme0n1p1 -> nvme0n1, sda1 -> sda.
    let base = if Path::new(&format!("/sys/block/{name}")).exists() {
        name.to_string()
    } else if name.starts_with("nvme") {
        name.rsplit_once('p').map_or(name, |(b, _)| b).to_string()
    } else {
        name.trim_end_matches(|c: char| c.is_ascii_digit())
            .to_string()
    };
    let rotational = std::fs::read_to_string(format!("/sys/block/{base}/queue/rotational"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let bus = if base.starts_with("vd") {
        "virtio-blk (virtual; rotational flag not meaningful)"
    } else if base.starts_with("nvme") {
        "NVMe"
    } else if base.starts_with("sd") {
        "SCSI/SATA"
    } else {
        "unknown bus"
    };
    format!("{bus}, rotational={rotational}")
}

pub fn machine(data_root: &Path) -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = read_first_line_with("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into());
    let mem_gib = proc_meminfo_kib("MemTotal").map_or(f64::NAN, |k| k as f64 / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let disk = match mount_of(data_root) {
        Some((dev, mnt, fs)) => {
            format!("data dirs on {dev} ({fs} at {mnt}; {})", disk_kind(&dev))
        }
        None => "data dirs on an unknown mount".into(),
    };
    format!("{nproc} CPUs ({model}), {mem_gib:.1} GiB RAM, Linux {kernel}, {disk}")
}

pub fn proc_meminfo_kib(field: &str) -> Option<u64> {
    read_first_line_with("/proc/meminfo", field)?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Warns when the daemon binary is older than the sources it is built from.
pub fn check_binary_fresh(bin: &Path) {
    if std::env::var_os("BLIXARD_BIN").is_some() {
        return;
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut stack = vec![root.join("crates")];
    for f in ["Cargo.toml", "Cargo.lock"] {
        stack.push(root.join(f));
    }
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if let Ok(m) = std::fs::metadata(&p).and_then(|m| m.modified()) {
            if newest.as_ref().is_none_or(|(t, _)| m > *t) {
                newest = Some((m, p));
            }
        }
    }
    if let Some((t, p)) = newest {
        if t > built {
            eprintln!(
                "warning: {} is newer than {}; run `cargo build --release --bin blixard`",
                p.display(),
                bin.display()
            );
        }
    }
}
