//! The client side: every command finds the node it talks to (`--node`, or the local
//! one through its data dir), calls it with a credential, and prints the answer. This
//! module is that shared part; each group of commands has its file (`cluster`,
//! `images` and `delivery`, `tenants`, `vms`); `format` renders results, `parse` reads
//! arguments.

pub mod backup;
pub mod cluster;
pub mod delivery;
pub mod events;
pub mod format;
pub mod images;
pub mod parse;
pub mod tenants;
pub mod vms;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use blixard_core::{EndpointKey, NodeId};
use blixard_net::api::StatusRequest;
use blixard_net::client::ApiClient;
use blixard_net::ticket::JoinTicket;
use blixard_net::{endpoint, keys, member_addr, EndpointAddr};
use blixard_node::datadir::{self, NodeInfo};
use blixard_node::exit::{self, Failure};

use format::Format;

/// What every command runs with (the global flags).
#[derive(Clone)]
pub struct Context {
    pub data_dir: PathBuf,
    pub node: Option<String>,
    pub key: Option<PathBuf>,
    pub output: Format,
    pub timeout: Duration,
}

/// Where the CLI should send its request.
async fn target(ctx: &Context) -> Result<EndpointAddr, Failure> {
    match &ctx.node {
        // A member by id (`n2` or `2`): ask the local node where it is.
        Some(node) if node.parse::<NodeId>().is_ok() => {
            let id: NodeId = node.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
            let local = Context {
                node: None,
                ..ctx.clone()
            };
            let (client, to) = client_to(&local, local_target(ctx)?).await?;
            let status = client.call(&to, StatusRequest { stale: true }).await;
            client.endpoint().close().await;
            let status = status?;
            let member = status.members.iter().find(|m| m.id == id).ok_or_else(|| {
                Failure::new(
                    exit::USAGE,
                    format!("--node {node}: node {id} is not a member"),
                )
            })?;
            member_addr(&member.endpoint, &member.addrs)
                .ok_or_else(|| Failure::new(exit::UNREACHABLE, format!("node {id} has no address")))
        }
        Some(node) => parse_target(node),
        None => local_target(ctx),
    }
}

/// The node whose data dir the CLI uses.
fn local_target(ctx: &Context) -> Result<EndpointAddr, Failure> {
    let path = datadir::node_info(&ctx.data_dir);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Failure::new(
            exit::UNREACHABLE,
            format!(
                "no running node found in {} ({}: {e}); start one with `blixard node run`, or pass --node",
                ctx.data_dir.display(),
                path.display()
            ),
        )
    })?;
    let info: NodeInfo = serde_json::from_str(&text).map_err(|e| {
        Failure::new(
            exit::DATA_DIR,
            format!("{} is damaged: {e}", path.display()),
        )
    })?;
    // A node that died without removing node.json: say so now, not after a timeout.
    if let Some(why) = info.gone() {
        return Err(Failure::new(
            exit::UNREACHABLE,
            format!(
                "the node in {} is not running ({why}); start it with `blixard node run`, or pass --node",
                ctx.data_dir.display()
            ),
        ));
    }
    // A node listening on 0.0.0.0 is reachable locally on loopback.
    let addrs: Vec<SocketAddr> = info
        .addrs
        .iter()
        .map(|a| {
            if a.ip().is_unspecified() {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), a.port())
            } else {
                *a
            }
        })
        .collect();
    member_addr(&info.endpoint_id, &addrs).ok_or_else(|| {
        Failure::new(
            exit::DATA_DIR,
            format!("{} holds an invalid endpoint id", path.display()),
        )
    })
}

/// Parses `--node`: a join ticket, or ENDPOINT_ID@HOST:PORT.
pub fn parse_target(s: &str) -> Result<EndpointAddr, Failure> {
    if s.starts_with("blixard1") {
        let ticket: JoinTicket = s.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
        return ticket
            .members
            .iter()
            .find_map(|(k, a)| member_addr(k, a))
            .ok_or_else(|| Failure::new(exit::USAGE, "the ticket lists no members"));
    }
    let (id, addr) = s.split_once('@').ok_or_else(|| {
        Failure::new(
            exit::USAGE,
            format!("--node {s:?}: expected a join ticket or ENDPOINT_ID@HOST:PORT"),
        )
    })?;
    let key: EndpointKey = id.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| Failure::new(exit::USAGE, format!("--node {s:?}: {e}")))?;
    member_addr(&key, &[addr])
        .ok_or_else(|| Failure::new(exit::USAGE, format!("--node {s:?}: invalid endpoint id")))
}

/// The credential the CLI calls with: `--key`; else the node's admin credential when this
/// user can read it; else the user's own key, created on first use.
fn credential(ctx: &Context) -> Result<(PathBuf, blixard_net::SecretKey), Failure> {
    let refuse = |e: keys::KeyError| Failure::new(exit::UNAUTHORIZED, e);
    if let Some(path) = &ctx.key {
        return keys::load(path).map(|k| (path.clone(), k)).map_err(refuse);
    }
    let admin = datadir::admin_key(&ctx.data_dir);
    if std::fs::File::open(&admin).is_ok() {
        return keys::load(&admin).map(|k| (admin, k)).map_err(refuse);
    }
    let home = std::env::var_os("HOME").ok_or_else(|| {
        Failure::new(
            exit::UNAUTHORIZED,
            "no credential: HOME is not set; pass --credential",
        )
    })?;
    let dir = PathBuf::from(home).join(".config/blixard");
    std::fs::create_dir_all(&dir).map_err(|e| {
        Failure::new(
            exit::UNAUTHORIZED,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let path = dir.join("key");
    keys::load_or_create(&path)
        .map(|k| (path, k))
        .map_err(refuse)
}

pub fn whoami(ctx: &Context) -> Result<(), Failure> {
    let (path, key) = credential(ctx)?;
    let id = blixard_net::key_of(&key.public());
    if ctx.output == Format::Json {
        return format::json(&serde_json::json!({"key": id.to_string(), "file": path}))
            .map_err(|e| Failure::new(exit::ERROR, e));
    }
    out!("{id}");
    eprintln!("(credential {})", path.display());
    Ok(())
}

/// Prints what `node check-data` found in a data file that passed.
pub fn node_check_data(ctx: &Context, r: &blixard_node::daemon::CheckReport) -> anyhow::Result<()> {
    if ctx.output == Format::Json {
        return format::json(r);
    }
    out!("ok: the data file holds together");
    out!(
        "log        entries {}..={} ({} kept), term {}",
        r.first_index + 1,
        r.last_index,
        r.entries,
        r.term
    );
    out!("commit     {}", r.commit);
    out!("applied    {}", r.applied);
    out!("voters     {:?}", r.voters);
    match r.state_digest {
        Some(d) => out!("state      {} rows, digest {d:016x}", r.rows),
        None => out!("state      {} rows", r.rows),
    }
    Ok(())
}

pub async fn client(ctx: &Context) -> Result<(ApiClient, EndpointAddr), Failure> {
    let to = target(ctx).await?;
    client_to(ctx, to).await
}

async fn client_to(ctx: &Context, to: EndpointAddr) -> Result<(ApiClient, EndpointAddr), Failure> {
    let (_, secret) = credential(ctx)?;
    let listen = SocketAddr::from(([0, 0, 0, 0], 0));
    let ep = endpoint::bind(secret, listen, None, vec![])
        .await
        .map_err(|e| Failure::new(exit::ERROR, e))?;
    Ok((ApiClient::new(ep, None, ctx.timeout), to))
}

/// Sends one request to the node `ctx` names, and closes the connection whatever the
/// answer.
pub async fn call<R: blixard_net::api::Rpc>(
    ctx: &Context,
    request: R,
) -> Result<R::Response, Failure> {
    let (client, to) = client(ctx).await?;
    let r = client.call(&to, request).await;
    client.endpoint().close().await;
    Ok(r?)
}

/// [`format::applied`] for `ctx`: a write's result, as JSON or a confirmation.
pub fn applied(
    ctx: &Context,
    result: serde_json::Value,
    text: impl std::fmt::Display,
) -> Result<(), Failure> {
    format::applied(ctx.output, result, text).map_err(fail)
}

/// A failure that fits none of the documented exit codes (exit 1).
pub fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::ERROR, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_targets_parse() {
        use parse::parse_duration;
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
        let id = blixard_net::key_of(&blixard_net::SecretKey::generate().public());
        let addr = parse_target(&format!("{id}@127.0.0.1:7001")).unwrap();
        assert_eq!(addr.ip_addrs().count(), 1);
        assert!(parse_target(&format!("{id}@nowhere")).is_err());
        assert!(parse_target("127.0.0.1:7001").is_err());
    }
}
