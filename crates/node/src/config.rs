//! The daemon's configuration: a TOML file, overridden by `BLIXARD_*` environment
//! variables and flags (flags win).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blixard_images::cache::Limits as CacheLimits;
use serde::{Deserialize, Serialize};

/// The `blixard node run` configuration file. Unknown keys are an error, so a typo is
/// reported instead of silently ignored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the Iroh endpoint binds (UDP), e.g. "0.0.0.0:7000".
    pub listen: Option<SocketAddr>,
    /// A human name for this node; defaults to the host name.
    pub name: Option<String>,
    /// An Iroh relay to use; relays are off when unset.
    pub relay_url: Option<String>,
    /// Labels for placement (zone, rack, …).
    pub labels: BTreeMap<String, String>,
    pub capacity: CapacityConfig,
    pub raft: RaftConfig,
    /// How long an API request may take, in milliseconds.
    pub request_timeout_ms: Option<u64>,
    /// How long a stop (SIGTERM, SIGINT) may take, in milliseconds, before the daemon
    /// exits anyway (default 5000). Requests still running halfway through are answered
    /// "shutting down".
    pub shutdown_timeout_ms: Option<u64>,
    pub images: ImagesConfig,
    pub vms: VmsConfig,
    pub audit: AuditConfig,
    pub metrics: MetricsConfig,
    pub telemetry: TelemetryConfig,
    /// The cluster's expected members (a JSON object of `{name, endpointId, addresses}`, as
    /// the NixOS module writes /etc/blixard/members.json). When set, a join from a key not
    /// listed under that name is refused, whatever the ticket.
    pub expected_members: Option<String>,
}

/// One expected member.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ExpectedMember {
    pub name: String,
    #[serde(rename = "endpointId")]
    pub endpoint_id: blixard_core::EndpointKey,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// A JSON file the daemon reads besides its config (the expected members, the declared
/// VMs) that it refused; the message names the file and the entry.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {problem}", path.display())]
pub struct InputFileError {
    /// What the file holds, e.g. "declared VMs".
    pub what: &'static str,
    pub path: PathBuf,
    pub problem: InputProblem,
}

#[derive(Debug, thiserror::Error)]
pub enum InputProblem {
    #[error("{0}")]
    Read(#[source] std::io::Error),
    #[error("{0}")]
    Syntax(#[source] serde_json::Error),
    /// One entry breaks a rule.
    #[error("{entry}: {rule}")]
    Entry { entry: String, rule: String },
}

impl InputFileError {
    /// Reads the file at `path`.
    pub fn read(what: &'static str, path: &Path) -> Result<String, Self> {
        std::fs::read_to_string(path).map_err(|e| Self {
            what,
            path: path.to_path_buf(),
            problem: InputProblem::Read(e),
        })
    }

    /// Parses `text`, the JSON read from `path`.
    pub fn parse_json<T: serde::de::DeserializeOwned>(
        what: &'static str,
        path: &Path,
        text: &str,
    ) -> Result<T, Self> {
        serde_json::from_str(text).map_err(|e| Self {
            what,
            path: path.to_path_buf(),
            problem: InputProblem::Syntax(e),
        })
    }

    /// An entry of the file at `path` that breaks `rule`.
    pub fn entry(what: &'static str, path: &Path, entry: String, rule: String) -> Self {
        Self {
            what,
            path: path.to_path_buf(),
            problem: InputProblem::Entry { entry, rule },
        }
    }
}

const MEMBERS: &str = "expected members";

/// Reads an expected-members file.
pub fn load_members(path: &Path) -> Result<Vec<ExpectedMember>, InputFileError> {
    parse_members(&InputFileError::read(MEMBERS, path)?, path)
}

/// Parses and checks `text`, an expected-members file read from `path`.
pub fn parse_members(text: &str, path: &Path) -> Result<Vec<ExpectedMember>, InputFileError> {
    let map: BTreeMap<String, ExpectedMember> = InputFileError::parse_json(MEMBERS, path, text)?;
    for (key, m) in &map {
        if let Some(bad) = m
            .addresses
            .iter()
            .find(|a| a.parse::<std::net::SocketAddr>().is_err())
        {
            let rule = format!("address {bad:?} is not IP:PORT");
            return Err(InputFileError::entry(MEMBERS, path, key.clone(), rule));
        }
    }
    Ok(map.into_values().collect())
}

impl ExpectedMember {
    /// The declared addresses (checked by `load_members`).
    pub fn socket_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}

/// How this node runs VMs, and (when it leads) places them and watches hosts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmsConfig {
    /// Per-VM state dirs (console log, pid, `current`/`booted` links); default
    /// DATA_DIR/vms.
    pub state_dir: Option<String>,
    /// Keep each VM's console log near this size.
    pub console_max_mib: u64,
    /// The leader marks a host down after this long without contact, and moves its VMs.
    pub down_timeout_ms: u64,
    /// A host with no leader for this long stops its VMs. Must be shorter than
    /// `down_timeout_ms` by more than `stop_timeout_ms` plus the longest election timeout
    /// (2 × tick_ms × election_ticks), so the old copy is gone before the leader starts a
    /// new one.
    pub fence_timeout_ms: u64,
    /// How long a runner gets to shut down before it is killed.
    pub stop_timeout_ms: u64,
    /// `bin-pack` (default) or `spread`.
    pub strategy: StrategyConfig,
    /// How much of a host's vCPUs / memory may be promised to VMs, in percent.
    pub cpu_overcommit_pct: u32,
    pub memory_overcommit_pct: u32,
    /// Operator hooks: executables run before a create, after a start and before a
    /// delete, with the VM as JSON on stdin; a non-zero exit vetoes with its stderr.
    pub hooks: Vec<String>,
    pub hook_timeout_ms: u64,
    /// VMs this host's configuration declares (a JSON list; the NixOS module writes
    /// /etc/blixard/vms.json): created, replaced and deleted to match at start.
    pub declared_file: Option<String>,
    /// `process` (default: each runner a process of its own session, for hosts without
    /// systemd) or `systemd` (each VM a transient unit `blixard-vm-<name>.service`).
    pub supervisor: SupervisorConfig,
    /// With `supervisor = "systemd"`: more `Key=value` properties for every VM's unit
    /// (e.g. `User=`, `SupplementaryGroups=kvm`, sandboxing); the NixOS module sets them.
    pub unit_properties: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SupervisorConfig {
    #[default]
    Process,
    Systemd,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyConfig {
    #[default]
    BinPack,
    Spread,
}

impl Default for VmsConfig {
    fn default() -> Self {
        Self {
            state_dir: None,
            console_max_mib: 8,
            down_timeout_ms: 30_000,
            fence_timeout_ms: 15_000,
            stop_timeout_ms: 10_000,
            strategy: StrategyConfig::BinPack,
            cpu_overcommit_pct: 100,
            memory_overcommit_pct: 100,
            hooks: Vec::new(),
            hook_timeout_ms: 5_000,
            declared_file: None,
            supervisor: SupervisorConfig::Process,
            unit_properties: Vec::new(),
        }
    }
}

/// Where images go on this host, and the binary cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// The store dir closures are unpacked into (on hosts whose store Nix does not manage).
    pub store_dir: String,
    /// Where the binary cache listens (HTTP); `None` turns it off.
    pub cache_listen: Option<SocketAddr>,
    /// Evict unpinned images least-recently-used beyond this many MiB; unset keeps all.
    pub cache_size_mib: Option<u64>,
    /// The binary cache's connections at once; more are answered 503 and closed.
    pub cache_max_connections: usize,
    /// NAR downloads the binary cache sends at once; more are answered 503.
    pub cache_max_streams: usize,
    /// How long a binary-cache client may take to send a request head (from connecting,
    /// or from the head's first byte), in milliseconds.
    pub cache_header_timeout_ms: u64,
    /// How long a binary-cache connection may sit with nothing moving while the cache
    /// waits on the client (its next request, or reading a response), in milliseconds.
    pub cache_idle_timeout_ms: u64,
    /// How fetched closures reach the host's store: `unpack` them into `store_dir`
    /// (hosts without a Nix daemon), or hand them to `nix` through this node's own binary
    /// cache (`nix copy --from`), so Nix registers them.
    pub materialise: Materialise,
    /// With `materialise = "nix"`: the Nix store to copy into (`nix copy --to`); unset
    /// means the host's store.
    pub nix_store: Option<String>,
    /// Where callers other than this node's own admin credential may import from: an
    /// import reads files on this host, so it is limited to these directories (the Nix
    /// store, which is world-readable anyway, by default).
    pub import_paths: Vec<String>,
    /// How often the image janitor runs (drops the copies of removed images, gives up
    /// holding images this node lost, evicts beyond `cache_size_mib`), in milliseconds.
    pub janitor_interval_ms: u64,
}

/// See [`ImagesConfig::materialise`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Materialise {
    #[default]
    Unpack,
    Nix,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            store_dir: "/nix/store".into(),
            cache_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7380))),
            cache_size_mib: None,
            cache_max_connections: CacheLimits::DEFAULT_MAX_CONNECTIONS,
            cache_max_streams: CacheLimits::DEFAULT_MAX_STREAMS,
            cache_header_timeout_ms: millis(CacheLimits::DEFAULT_HEADER_TIMEOUT),
            cache_idle_timeout_ms: millis(CacheLimits::DEFAULT_IDLE_TIMEOUT),
            materialise: Materialise::Unpack,
            nix_store: None,
            import_paths: vec!["/nix/store".into()],
            janitor_interval_ms: 3000,
        }
    }
}

impl ImagesConfig {
    /// The binary cache's limits and timeouts.
    pub fn cache_limits(&self) -> CacheLimits {
        CacheLimits {
            max_connections: self.cache_max_connections,
            max_streams: self.cache_max_streams,
            header_timeout: std::time::Duration::from_millis(self.cache_header_timeout_ms),
            idle_timeout: std::time::Duration::from_millis(self.cache_idle_timeout_ms),
        }
    }

    pub fn janitor_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.janitor_interval_ms)
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What this node offers to VMs; detected from the host when unset.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
}

/// Consensus tunables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// One raft tick, in milliseconds.
    pub tick_ms: u64,
    /// Ticks without a heartbeat before a follower campaigns.
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Compact the log when it grows past this many applied entries.
    pub snapshot_threshold: u64,
    /// How often the leader has the members compare digests of their state (0: never).
    pub state_check_interval_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_threshold: 10_000,
            state_check_interval_ms: 60_000,
        }
    }
}

impl RaftConfig {
    /// `state_check_interval_ms`, or `None` when checks are off.
    pub fn state_check_interval(&self) -> Option<std::time::Duration> {
        (self.state_check_interval_ms > 0)
            .then(|| std::time::Duration::from_millis(self.state_check_interval_ms))
    }
}

/// Trace export (`docs/monitoring.md`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP endpoint trace spans go to, e.g. "http://127.0.0.1:4318" (posted to
    /// its `/v1/traces`). Unset: the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else no traces.
    pub otlp_endpoint: Option<String>,
}

/// The metrics endpoint (`docs/monitoring.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served (HTTP), e.g. "127.0.0.1:7390", or "off".
    #[serde(with = "listen_or_off")]
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 7390))),
        }
    }
}

/// An address as "HOST:PORT", or "off" for none.
mod listen_or_off {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "off" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "expected \"HOST:PORT\" or \"off\", not {text:?}: {e}"
            ))
        })
    }
}

/// The audit log (`docs/security.md`, "Audit log").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// What a request does when the audit log is behind: wait for room (`block`, the
    /// default) or be refused at once (`fail`). Either way nothing runs unrecorded.
    pub on_full: OnFullConfig,
    /// Lines of callers' records that may wait for the writer (at least 2: a mutating
    /// request takes room for its decision and its outcome before it runs).
    pub queue: usize,
    /// The longest a written line waits for an fsync, in milliseconds.
    pub sync_interval_ms: u64,
}

/// See [`AuditConfig::on_full`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFullConfig {
    #[default]
    Block,
    Fail,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            on_full: OnFullConfig::Block,
            queue: 4096,
            sync_interval_ms: 1000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: BadConfig,
    },
}

/// Why a config text was refused.
#[derive(Debug, thiserror::Error)]
pub enum BadConfig {
    /// Not TOML, or a key or value the schema does not know (serde's message).
    #[error("{0}")]
    Toml(String),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
}

/// A setting that parses but breaks a rule.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {rule}")]
pub struct InvalidSetting {
    pub setting: &'static str,
    pub rule: String,
}

/// `shutdown_timeout_ms` when unset.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 5000;

impl Config {
    /// How long a stop may take.
    pub fn shutdown_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.shutdown_timeout_ms
                .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_MS),
        )
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            Self::parse_json(&text)
        } else {
            Self::parse(&text)
        };
        parsed.map_err(|source| ConfigError::Parse { path: p, source })
    }

    /// The same configuration as JSON (what the NixOS module's pure functions produce).
    pub fn parse_json(text: &str) -> Result<Self, BadConfig> {
        let config: Config = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, BadConfig> {
        let config: Config =
            toml::from_str(text).map_err(|e| BadConfig::Toml(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules a parsed config must follow.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let bad = |setting: &'static str, rule: String| Err(InvalidSetting { setting, rule });
        let r = &self.raft;
        if r.tick_ms == 0 || r.tick_ms > 10_000 {
            return bad("raft.tick_ms", "must be between 1 and 10000".into());
        }
        if r.heartbeat_ticks == 0 || r.election_ticks <= r.heartbeat_ticks {
            return bad(
                "raft.election_ticks",
                "must be greater than raft.heartbeat_ticks (≥ 1)".into(),
            );
        }
        if r.snapshot_threshold == 0 {
            return bad("raft.snapshot_threshold", "must be at least 1".into());
        }
        if let Err(e) = blixard_images::nix::StoreDir::new(&self.images.store_dir) {
            return bad("images.store_dir", e.to_string());
        }
        if let Some(p) = self
            .images
            .import_paths
            .iter()
            .find(|p| !p.starts_with('/'))
        {
            return bad(
                "images.import_paths",
                format!("{p:?} is not an absolute path"),
            );
        }
        if self.images.materialise == Materialise::Nix && self.images.cache_listen.is_none() {
            return bad(
                "images.materialise",
                "\"nix\" copies from this node's binary cache; set images.cache_listen".into(),
            );
        }
        let i = &self.images;
        if !(1..=65_536).contains(&i.cache_max_connections) {
            return bad(
                "images.cache_max_connections",
                "must be between 1 and 65536".into(),
            );
        }
        if i.cache_max_streams == 0 || i.cache_max_streams > i.cache_max_connections {
            return bad(
                "images.cache_max_streams",
                format!(
                    "must be between 1 and images.cache_max_connections ({})",
                    i.cache_max_connections
                ),
            );
        }
        for (setting, ms) in [
            ("images.cache_header_timeout_ms", i.cache_header_timeout_ms),
            ("images.cache_idle_timeout_ms", i.cache_idle_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&ms) {
                return bad(setting, "must be between 100 and 3600000 (an hour)".into());
            }
        }
        if !(10..=3_600_000).contains(&i.janitor_interval_ms) {
            return bad(
                "images.janitor_interval_ms",
                "must be between 10 and 3600000 (an hour)".into(),
            );
        }
        if let Some(e) = &self.telemetry.otlp_endpoint {
            if let Err(e) = crate::telemetry::check_endpoint(e) {
                return bad("telemetry.otlp_endpoint", e.to_string());
            }
        }
        let v = &self.vms;
        if let Some(p) = v
            .unit_properties
            .iter()
            .find(|p| !p.contains('=') || p.contains('\n'))
        {
            return bad(
                "vms.unit_properties",
                format!("{p:?} is not a Key=value property"),
            );
        }
        // raft-rs randomises the election timeout up to twice the configured one.
        let election_ms = r
            .tick_ms
            .saturating_mul(r.election_ticks as u64)
            .saturating_mul(2);
        let needed = v
            .fence_timeout_ms
            .saturating_add(v.stop_timeout_ms)
            .saturating_add(election_ms);
        if needed >= v.down_timeout_ms {
            return bad(
                "vms.down_timeout_ms",
                format!(
                    "vms.fence_timeout_ms ({}) + vms.stop_timeout_ms ({}) + the longest election timeout ({election_ms}) must be less than vms.down_timeout_ms ({}): a partitioned host must have stopped its VMs before the leader starts them elsewhere",
                    v.fence_timeout_ms, v.stop_timeout_ms, v.down_timeout_ms
                ),
            );
        }
        if v.cpu_overcommit_pct == 0 || v.memory_overcommit_pct == 0 {
            return bad(
                "vms.cpu_overcommit_pct",
                "vms.cpu_overcommit_pct and vms.memory_overcommit_pct must be at least 1".into(),
            );
        }
        if let Some(f) = v.declared_file.as_ref().filter(|f| !f.starts_with('/')) {
            return bad(
                "vms.declared_file",
                format!("{f:?} is not an absolute path"),
            );
        }
        if let Some(h) = v.hooks.iter().find(|p| !p.starts_with('/')) {
            return bad("vms.hooks", format!("{h:?} is not an absolute path"));
        }
        if let Some(f) = self
            .expected_members
            .as_ref()
            .filter(|f| !f.starts_with('/'))
        {
            return bad("expected_members", format!("{f:?} is not an absolute path"));
        }
        if self.shutdown_timeout_ms == Some(0) {
            return bad("shutdown_timeout_ms", "must be at least 1".into());
        }
        let a = &self.audit;
        if !(2..=1 << 20).contains(&a.queue) {
            return bad("audit.queue", "must be between 2 and 1048576".into());
        }
        if !(1..=60_000).contains(&a.sync_interval_ms) {
            return bad(
                "audit.sync_interval_ms",
                "must be between 1 and 60000".into(),
            );
        }
        if let Some(url) = &self.relay_url {
            if let Err(e) = url.parse::<iroh::RelayUrl>() {
                return bad("relay_url", format!("{url:?}: {e}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_and_rejects_typos_and_nonsense() {
        let c = Config::parse(
            "listen = \"127.0.0.1:7001\"\n[labels]\nzone = \"a\"\n[raft]\nsnapshot_threshold = 50\n",
        )
        .unwrap();
        assert_eq!(c.raft.snapshot_threshold, 50);
        assert_eq!(c.raft.tick_ms, 100);
        assert_eq!(c.labels["zone"], "a");
        assert!(Config::parse("lsiten = \"x\"")
            .unwrap_err()
            .to_string()
            .contains("lsiten"));
        assert!(matches!(
            Config::parse("[raft]\nelection_ticks = 1\nheartbeat_ticks = 2"),
            Err(BadConfig::Invalid(InvalidSetting {
                setting: "raft.election_ticks",
                ..
            }))
        ));
        assert!(Config::parse("listen = \"nope\"").is_err());
        let j =
            Config::parse_json(r#"{"listen": "127.0.0.1:7001", "raft": {"tick_ms": 50}}"#).unwrap();
        assert_eq!(j.raft.tick_ms, 50);
        assert_eq!(j.raft.election_ticks, 10);
        assert!(Config::parse_json(r#"{"lisen": 1}"#)
            .unwrap_err()
            .to_string()
            .contains("lisen"));
    }

    #[test]
    fn cache_limits_default_parse_and_are_checked() {
        let d = Config::default().images.cache_limits();
        assert_eq!(d, CacheLimits::default());
        let c = Config::parse(
            "[images]\ncache_max_connections = 10\ncache_max_streams = 10\ncache_header_timeout_ms = 500\ncache_idle_timeout_ms = 700\n",
        )
        .unwrap();
        let l = c.images.cache_limits();
        assert_eq!((l.max_connections, l.max_streams), (10, 10));
        assert_eq!(l.header_timeout, std::time::Duration::from_millis(500));
        assert_eq!(l.idle_timeout, std::time::Duration::from_millis(700));
        let refused = |text: &str| match Config::parse(text) {
            Err(BadConfig::Invalid(InvalidSetting { setting, .. })) => setting,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(
            refused("[images]\ncache_max_connections = 0"),
            "images.cache_max_connections"
        );
        assert_eq!(
            refused("[images]\ncache_max_connections = 100000"),
            "images.cache_max_connections"
        );
        assert_eq!(
            refused("[images]\njanitor_interval_ms = 0"),
            "images.janitor_interval_ms"
        );
        assert_eq!(
            refused("[images]\ncache_max_streams = 0"),
            "images.cache_max_streams"
        );
        assert_eq!(
            refused("[images]\ncache_max_connections = 8\ncache_max_streams = 9"),
            "images.cache_max_streams"
        );
        assert_eq!(
            refused("[images]\ncache_header_timeout_ms = 0"),
            "images.cache_header_timeout_ms"
        );
        assert_eq!(
            refused("[images]\ncache_idle_timeout_ms = 3600001"),
            "images.cache_idle_timeout_ms"
        );
        assert!(Config::parse("[images]\ncache_max_streams = -1").is_err());
    }

    #[test]
    fn the_audit_section_has_defaults_and_limits() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.audit, AuditConfig::default());
        assert_eq!(c.audit.on_full, OnFullConfig::Block);
        let c = Config::parse("[audit]\non_full = \"fail\"\nqueue = 16\nsync_interval_ms = 5\n")
            .unwrap();
        assert_eq!(
            (c.audit.on_full, c.audit.queue, c.audit.sync_interval_ms),
            (OnFullConfig::Fail, 16, 5)
        );
        for (text, setting) in [
            ("[audit]\nqueue = 1", "audit.queue"),
            ("[audit]\nsync_interval_ms = 0", "audit.sync_interval_ms"),
        ] {
            assert!(
                matches!(Config::parse(text), Err(BadConfig::Invalid(InvalidSetting { setting: s, .. })) if s == setting),
                "{text}"
            );
        }
        assert!(Config::parse("[audit]\non_full = \"drop\"").is_err());
        assert!(Config::parse("[audit]\nqeue = 16").is_err());
    }
}
