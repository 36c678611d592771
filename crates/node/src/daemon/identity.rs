//! Start-up phase 3: who this node is in which cluster. A data dir that holds a cluster
//! resumes it (the join ticket is not needed again); `--init` starts a new one; otherwise
//! the node joins with its ticket, which it reads only then.

use std::path::{Path, PathBuf};
use std::time::Duration;

use blixard_core::{ClusterId, Command, NewMember, NodeId, State};
use blixard_net::api::{ApiError, JoinCluster, Joined};
use blixard_net::client::{ApiClient, ClientError};
use blixard_net::ticket::JoinTicket;
use blixard_net::{key_of, keys, member_addr};
use blixard_store::NodeRecord;

use super::open::Opened;
use super::settings::{detect_capacity, host_name};
use super::{data_err, store_err, RunArgs};
use crate::cluster::now_ms;
use crate::config::Config;
use crate::datadir;
use crate::exit::{self, Failure};
use crate::peers::Seeds;

/// Where the join ticket comes from (`--join` or `--join-file`). It is read only when the
/// data dir holds no cluster yet: a node that has joined keeps its identity and membership
/// in its data dir and never needs the ticket again, so a missing, empty or used-up ticket
/// (`/run/keys` is empty after a reboot) does not keep it from starting.
#[derive(Clone, Copy, Debug)]
enum TicketArg<'a> {
    None,
    Inline(&'a str),
    File(&'a Path),
}

/// Why no ticket could be had from a [`TicketArg`].
#[derive(Debug, thiserror::Error)]
enum TicketReadError {
    #[error("cannot read the join ticket file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the join ticket file {0} is empty")]
    Empty(PathBuf),
    #[error("the join ticket {origin} is damaged: {source}")]
    Damaged {
        origin: String,
        source: blixard_net::ticket::TicketError,
    },
}

impl<'a> TicketArg<'a> {
    fn of(args: &'a RunArgs) -> Self {
        match (&args.join, &args.join_file) {
            (Some(t), _) => Self::Inline(t),
            (None, Some(p)) => Self::File(p),
            (None, None) => Self::None,
        }
    }

    /// The ticket, `Ok(None)` when none was given.
    fn read(self) -> Result<Option<JoinTicket>, TicketReadError> {
        let (text, origin) = match self {
            Self::None => return Ok(None),
            Self::Inline(t) => (t.to_string(), "given with --join".to_string()),
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| {
                    TicketReadError::Unreadable {
                        path: path.to_owned(),
                        source,
                    }
                })?;
                if text.trim().is_empty() {
                    return Err(TicketReadError::Empty(path.to_owned()));
                }
                (text, format!("in {}", path.display()))
            }
        };
        text.parse::<JoinTicket>()
            .map(Some)
            .map_err(|source| TicketReadError::Damaged { origin, source })
    }
}

/// How to get a ticket, for errors on a node that needs one.
const NEW_TICKET: &str = "create one on a member with `blixard cluster token create` and pass it with --join or --join-file (NixOS: services.blixard.joinTicketFile)";

/// This node's place in its cluster: its record, and the members it was given when it
/// joined (to reach before it has the cluster state).
pub(super) async fn establish(
    data_dir: &Path,
    args: &RunArgs,
    config: &Config,
    opened: &Opened,
) -> Result<(NodeRecord, Seeds), Failure> {
    let timeout = Duration::from_millis(config.request_timeout_ms.unwrap_or(10_000));
    let name = config.name.clone().unwrap_or_else(host_name);
    let capacity = detect_capacity(config);
    let (record, seeds): (NodeRecord, Seeds) = match opened.record.clone() {
        Some(r) => {
            match TicketArg::of(args).read() {
                Ok(Some(t)) if t.cluster_id != r.cluster_id => {
                    return Err(data_err(format!(
                        "data dir {} belongs to cluster {}, but the join ticket is for cluster {}",
                        data_dir.display(),
                        r.cluster_id,
                        t.cluster_id
                    )));
                }
                Ok(Some(_)) => tracing::info!(
                    "already a member of cluster {}; ignoring the join ticket",
                    r.cluster_id
                ),
                Ok(None) => {}
                Err(e) => tracing::info!(
                    "already a member of cluster {}; the join ticket is not needed ({e})",
                    r.cluster_id
                ),
            }
            if args.init {
                tracing::info!("cluster {} already initialised; resuming", r.cluster_id);
            }
            (r, Vec::new())
        }
        None if args.init => {
            let admin = keys::create(&datadir::admin_key(data_dir)).map_err(data_err)?;
            let cluster_id = ClusterId(rand::random());
            let mut state = State::new();
            state
                .apply(&Command::Bootstrap {
                    cluster_id,
                    name: args.cluster_name.clone(),
                    member: NewMember {
                        name: name.clone(),
                        endpoint: key_of(&opened.ep.id()),
                        addrs: opened.advertise.clone(),
                        labels: config.labels.clone(),
                        capacity,
                    },
                    admin: key_of(&admin.public()),
                    now_ms: now_ms(),
                })
                .map_err(|e| Failure::new(exit::ERROR, e))?;
            // A new cluster starts at the log version of the release that made it.
            let version =
                crate::version::log_version().map_err(|e| Failure::new(exit::CONFIG, e))?;
            state
                .apply(&Command::SetClusterVersion { version })
                .map_err(|e| Failure::new(exit::ERROR, e))?;
            opened.store.bootstrap(&state, &[1]).map_err(store_err)?;
            let r = NodeRecord {
                cluster_id,
                node_id: NodeId(1),
                removed: false,
            };
            opened.store.set_node_record(&r).map_err(store_err)?;
            tracing::info!(%cluster_id, "initialised a new cluster");
            (r, Vec::new())
        }
        None => {
            let ticket = match TicketArg::of(args).read() {
                Ok(Some(t)) => t,
                Ok(None) => {
                    return Err(data_err(format!(
                        "data dir {} holds no cluster: pass --init to start one, or a join ticket to join one ({NEW_TICKET})",
                        data_dir.display()
                    )))
                }
                Err(e @ TicketReadError::Damaged { .. }) => {
                    return Err(Failure::new(exit::USAGE, format!("{e}; {NEW_TICKET}")))
                }
                Err(e) => {
                    return Err(Failure::new(
                        exit::CONFIG,
                        format!(
                            "data dir {} holds no cluster, so this node needs a join ticket, but {e}; {NEW_TICKET}",
                            data_dir.display()
                        ),
                    ))
                }
            };
            let admin = keys::load_or_create(&datadir::admin_key(data_dir)).map_err(data_err)?;
            let client = ApiClient::new(opened.ep.clone(), Some(ticket.cluster_id), timeout);
            let request = JoinCluster {
                secret: ticket.secret,
                endpoint: key_of(&opened.ep.id()),
                name: name.clone(),
                addrs: opened.advertise.clone(),
                labels: config.labels.clone(),
                capacity,
                admin: key_of(&admin.public()),
            };
            let joined = join(&client, &ticket, request).await?;
            let r = NodeRecord {
                cluster_id: joined.cluster_id,
                node_id: joined.node,
                removed: false,
            };
            opened.store.set_node_record(&r).map_err(store_err)?;
            tracing::info!(node = %joined.node, cluster = %joined.cluster_id, "joined the cluster");
            (r, joined.members)
        }
    };
    Ok((record, seeds))
}

/// Tries each member in the ticket until one admits us.
async fn join(
    client: &ApiClient,
    ticket: &JoinTicket,
    request: JoinCluster,
) -> Result<Joined, Failure> {
    let mut last = None;
    for (key, addrs) in &ticket.members {
        let Some(addr) = member_addr(key, addrs) else {
            continue;
        };
        match client.call(&addr, request.clone()).await {
            Ok(joined) => return Ok(joined),
            // A used, expired or unknown token (a node whose data dir was lost, say):
            // only a new ticket helps.
            Err(ClientError::Api(ApiError::Rejected(m))) if m.contains("join token") => {
                return Err(Failure::new(
                    exit::REFUSED,
                    format!("the cluster refused the join ticket: {m}; a ticket admits one node, once, before it expires: {NEW_TICKET}"),
                ));
            }
            Err(e @ ClientError::Api(_)) => return Err(Failure::from(e)),
            Err(e) => {
                tracing::warn!("join via {key}: {e}");
                last = Some(e);
            }
        }
    }
    Err(match last {
        Some(e) => Failure::new(
            exit::UNREACHABLE,
            format!("could not reach any member of the cluster: {e}"),
        ),
        None => Failure::new(exit::USAGE, "the join ticket lists no members"),
    })
}
