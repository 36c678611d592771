//! The client commands: find the node, call it with a credential, print the answer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use blixard_core::{EndpointKey, MemberRole, MemberStatus, NodeId};
use blixard_net::api::{LeaveCluster, MetaGet, MetaSet, StatusRequest, TokenCreate};
use blixard_net::client::ApiClient;
use blixard_net::ticket::JoinTicket;
use blixard_net::{endpoint, keys, member_addr, EndpointAddr};

use crate::datadir::{self, NodeInfo};
use crate::exit::{self, Failure};
use crate::output::{self, Format};

pub struct Context {
    pub data_dir: PathBuf,
    pub node: Option<String>,
    pub key: Option<PathBuf>,
    pub output: Format,
    pub timeout: Duration,
}

/// Where the CLI should send its request.
fn target(ctx: &Context) -> Result<EndpointAddr, Failure> {
    if let Some(node) = &ctx.node {
        return parse_target(node);
    }
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

async fn client(ctx: &Context) -> Result<(ApiClient, EndpointAddr), Failure> {
    let to = target(ctx)?;
    let key_path = ctx
        .key
        .clone()
        .unwrap_or_else(|| datadir::admin_key(&ctx.data_dir));
    let secret = keys::load(&key_path).map_err(|e| {
        Failure::new(
            exit::UNAUTHORIZED,
            format!("{e} (the CLI needs a credential: run as the node's user, or pass --key)"),
        )
    })?;
    let listen = SocketAddr::from(([0, 0, 0, 0], 0));
    let ep = endpoint::bind(secret, listen, None, vec![])
        .await
        .map_err(|e| Failure::new(exit::ERROR, e))?;
    Ok((ApiClient::new(ep, None, ctx.timeout), to))
}

fn short(key: &EndpointKey) -> String {
    key.to_string().chars().take(10).collect()
}

pub async fn status(ctx: &Context, stale: bool) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let s = client.call(&to, StatusRequest { stale }).await?;
    client.endpoint().close().await;
    if ctx.output == Format::Json {
        return output::json(&s).map_err(|e| Failure::new(exit::ERROR, e));
    }
    let leader = s
        .raft
        .leader
        .map(|l| format!("n{l}"))
        .unwrap_or_else(|| "none".into());
    println!("cluster  {} ({})", s.name, s.cluster_id);
    println!(
        "node     n{} ({}), leader {leader}, term {}, commit {}, applied {}{}",
        s.node,
        s.raft.role,
        s.raft.term,
        s.raft.commit,
        s.raft.applied,
        if s.stale { " (stale read)" } else { "" }
    );
    println!();
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            let role = match (m.status, m.role) {
                (MemberStatus::Joining, _) => "joining",
                (_, MemberRole::Voter) => "voter",
                (_, MemberRole::Learner) => "learner",
            };
            let leader = if Some(m.id.0) == s.raft.leader {
                "*"
            } else {
                ""
            };
            vec![
                format!("n{}{leader}", m.id),
                m.name.clone(),
                role.to_string(),
                m.addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                short(&m.endpoint),
                m.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    output::table(
        &["ID", "NAME", "ROLE", "ADDRESS", "ENDPOINT", "LABELS"],
        &rows,
    );
    Ok(())
}

/// Parses 30s, 10m, 2h, 1d or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, Failure> {
    let bad = || {
        Failure::new(
            exit::USAGE,
            format!("invalid duration {s:?}: use e.g. 30s, 10m, 2h"),
        )
    };
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs))
}

pub async fn token_create(ctx: &Context, ttl: &str) -> Result<(), Failure> {
    let ttl = parse_duration(ttl)?;
    let (client, to) = client(ctx).await?;
    let t = client
        .call(
            &to,
            TokenCreate {
                ttl_secs: ttl.as_secs(),
            },
        )
        .await?;
    client.endpoint().close().await;
    if ctx.output == Format::Json {
        return output::json(&t).map_err(|e| Failure::new(exit::ERROR, e));
    }
    println!("{}", t.ticket);
    Ok(())
}

pub async fn leave(ctx: &Context, node: &str) -> Result<(), Failure> {
    let node: NodeId = node.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
    let (client, to) = client(ctx).await?;
    let left = client.call(&to, LeaveCluster { node }).await?;
    client.endpoint().close().await;
    eprintln!("node n{} removed from the cluster", left.node);
    Ok(())
}

pub async fn meta_set(ctx: &Context, key: String, value: Option<String>) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    client.call(&to, MetaSet { key, value }).await?;
    client.endpoint().close().await;
    Ok(())
}

pub async fn meta_get(ctx: &Context, key: Option<String>, stale: bool) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let m = client.call(&to, MetaGet { key, stale }).await?;
    client.endpoint().close().await;
    if ctx.output == Format::Json {
        let map: std::collections::BTreeMap<_, _> = m.entries.into_iter().collect();
        return output::json(&map).map_err(|e| Failure::new(exit::ERROR, e));
    }
    let rows: Vec<Vec<String>> = m.entries.into_iter().map(|(k, v)| vec![k, v]).collect();
    output::table(&["KEY", "VALUE"], &rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_targets_parse() {
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
