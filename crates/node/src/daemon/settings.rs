//! Start-up phase 1: the configuration, from the config file, then the environment and
//! flags (`RunArgs`), checked; and what the node says of itself by default (its name, its
//! capacity).

use std::path::Path;

use blixard_core::Capacity;

use super::{Listen, RunArgs};
use crate::config::{self, Config};
use crate::exit::{self, Failure};

pub(super) fn load(data_dir: &Path, args: &RunArgs) -> Result<Config, Failure> {
    let cfg_err = |e: config::ConfigError| Failure::new(exit::CONFIG, e);
    let mut config = match &args.config {
        Some(p) => Config::load(p).map_err(cfg_err)?,
        None => {
            let p = data_dir.join("blixard.toml");
            if p.exists() {
                Config::load(&p).map_err(cfg_err)?
            } else {
                Config::default()
            }
        }
    };
    if args.listen.is_some() {
        config.listen = args.listen;
    }
    if args.name.is_some() {
        config.name.clone_from(&args.name);
    }
    if args.relay_url.is_some() {
        config.relay_url.clone_from(&args.relay_url);
    }
    if let Some(t) = args.snapshot_threshold {
        config.raft.snapshot_threshold = t;
    }
    for (k, v) in &args.labels {
        config.labels.insert(k.clone(), v.clone());
    }
    if let Some(dir) = &args.store_dir {
        config.images.store_dir.clone_from(dir);
    }
    match &args.cache_listen {
        Some(Listen::Off) => config.images.cache_listen = None,
        Some(Listen::At(a)) => config.images.cache_listen = Some(*a),
        None => {}
    }
    match &args.metrics_listen {
        Some(Listen::Off) => config.metrics.listen = None,
        Some(Listen::At(a)) => config.metrics.listen = Some(*a),
        None => {}
    }
    // A bad trace endpoint from the environment stops the daemon as a bad config would.
    if let Some(url) = crate::telemetry::traces_url(config.telemetry.otlp_endpoint.as_deref()) {
        crate::telemetry::check_endpoint(&url)
            .map_err(|e| Failure::new(exit::CONFIG, format!("invalid config: {e}")))?;
    }
    config
        .validate()
        .map_err(|e| Failure::new(exit::CONFIG, format!("invalid config: {e}")))?;
    if let Some(f) = &config.expected_members {
        config::load_members(Path::new(f)).map_err(|e| Failure::new(exit::CONFIG, e))?;
    }
    // A bad declared-VM file stops the daemon before it joins anything.
    if let Some(f) = &config.vms.declared_file {
        crate::declared::load(Path::new(f)).map_err(|e| Failure::new(exit::CONFIG, e))?;
    }
    Ok(config)
}

pub(super) fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

pub(super) fn detect_capacity(config: &Config) -> Capacity {
    let vcpus = config.capacity.vcpus.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let memory_mib = config.capacity.memory_mib.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(0)
    });
    Capacity { vcpus, memory_mib }
}
