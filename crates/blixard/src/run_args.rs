//! `blixard node run`'s command line, turned into the node's [`RunArgs`].

use std::net::SocketAddr;
use std::path::PathBuf;

use blixard_node::daemon::{Listen, RunArgs};
use clap::Args;

#[derive(Args, Debug)]
pub struct RunCommand {
    /// Address to listen on (UDP), e.g. 0.0.0.0:7000.
    #[arg(long, env = "BLIXARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Start a new cluster with this node as its first member. Ignored (with a note) when
    /// the data dir already holds this node's cluster.
    #[arg(long, conflicts_with_all = ["join", "join_file"])]
    pub init: bool,
    /// Name of the new cluster (with --init).
    #[arg(long, default_value = "blixard")]
    pub cluster_name: String,
    /// Join the cluster of this ticket (from `cluster token create`).
    #[arg(long, env = "BLIXARD_JOIN", conflicts_with = "join_file")]
    pub join: Option<String>,
    /// Read the join ticket from this file (needed only until the node has joined).
    #[arg(long, env = "BLIXARD_JOIN_FILE")]
    pub join_file: Option<PathBuf>,
    /// Config file (default: DATA_DIR/blixard.toml when it exists).
    #[arg(long, env = "BLIXARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long, env = "BLIXARD_NAME")]
    pub name: Option<String>,
    /// A node label, KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = crate::cli::parse::parse_label)]
    pub labels: Vec<(String, String)>,
    /// An Iroh relay URL (relays are off by default).
    #[arg(long, env = "BLIXARD_RELAY_URL")]
    pub relay_url: Option<String>,
    /// Compact the raft log past this many entries.
    #[arg(long)]
    pub snapshot_threshold: Option<u64>,
    /// Unpack image closures into this store dir (default /nix/store).
    #[arg(long, env = "BLIXARD_STORE_DIR")]
    pub store_dir: Option<String>,
    /// Serve the binary cache on this address (default 127.0.0.1:7380), or `off`.
    #[arg(long, env = "BLIXARD_CACHE_LISTEN", value_parser = parse_listen)]
    pub cache_listen: Option<Listen>,
    /// Serve `GET /metrics` (Prometheus) on this address (default 127.0.0.1:7390), or `off`.
    #[arg(long, env = "BLIXARD_METRICS_LISTEN", value_parser = parse_listen)]
    pub metrics_listen: Option<Listen>,
    /// Make this member the only voter of its cluster, keeping its state, when the others
    /// are gone for good (a lost majority). Every other member is removed; their VMs are
    /// placed again. Loud, and once: docs/operations.md.
    #[arg(long, conflicts_with_all = ["init", "join", "join_file"])]
    pub force_new_cluster: bool,
}

impl From<RunCommand> for RunArgs {
    fn from(c: RunCommand) -> Self {
        RunArgs {
            listen: c.listen,
            init: c.init,
            cluster_name: c.cluster_name,
            join: c.join,
            join_file: c.join_file,
            config: c.config,
            name: c.name,
            labels: c.labels,
            relay_url: c.relay_url,
            snapshot_threshold: c.snapshot_threshold,
            store_dir: c.store_dir,
            cache_listen: c.cache_listen,
            metrics_listen: c.metrics_listen,
            force_new_cluster: c.force_new_cluster,
        }
    }
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen::Off);
    }
    s.parse()
        .map(Listen::At)
        .map_err(|e| format!("expected HOST:PORT or off: {e}"))
}
