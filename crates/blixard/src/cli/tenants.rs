//! `blixard tenant …`, `blixard quota …`, `blixard node list` and `blixard node stats`.

use blixard_core::Quota;
use blixard_net::api::{
    NodeList, NodeStatsRequest, QuotaSet, QuotaShow, TenantCreate, TenantInfo, TenantList,
    TenantRemove,
};
use clap::Subcommand;

use super::format::{self as output, human_bytes, Format};
use super::parse::parse_mib;
use super::{call, client, fail, Context};
use blixard_node::exit::Failure;

#[derive(Subcommand, Debug)]
pub enum TenantCommand {
    /// Create a tenant (no quota limits until `quota set`).
    Create { name: String },
    /// List the tenants you may see, with their quotas and usage.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// Remove a tenant; refused while it owns VMs or images or has users.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum QuotaCommand {
    /// Set a tenant's quota; a limit left out is unlimited.
    Set {
        tenant: String,
        #[arg(long)]
        max_vms: Option<u32>,
        #[arg(long)]
        max_vcpus: Option<u32>,
        /// e.g. 8GiB, 512MiB, or plain MiB.
        #[arg(long)]
        max_memory: Option<String>,
    },
    /// Show a tenant's quota and what its VMs use.
    Show {
        tenant: String,
        #[arg(long)]
        stale: bool,
    },
}

fn limit<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn print_tenants(ctx: &Context, tenants: &[TenantInfo]) -> Result<(), Failure> {
    if ctx.output == Format::Json {
        return output::json(&tenants).map_err(fail);
    }
    let rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|t| {
            let q = t.tenant.quota;
            vec![
                t.tenant.name.clone(),
                format!("{}/{}", t.used.vms, limit(q.max_vms)),
                format!("{}/{}", t.used.vcpus, limit(q.max_vcpus)),
                format!(
                    "{}/{}",
                    human_bytes(t.used.memory_mib << 20),
                    q.max_memory_mib
                        .map(|m| human_bytes(m << 20))
                        .unwrap_or_else(|| "-".into())
                ),
            ]
        })
        .collect();
    output::table(&["TENANT", "VMS", "VCPUS", "MEMORY"], &rows);
    Ok(())
}

pub async fn tenant(ctx: &Context, cmd: TenantCommand) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let result = match cmd {
        TenantCommand::Create { name } => client
            .call(&to, TenantCreate { name })
            .await
            .map(|t| vec![t]),
        TenantCommand::List { stale } => client
            .call(&to, TenantList { stale })
            .await
            .map(|t| t.tenants),
        TenantCommand::Rm { name } => {
            let r = client.call(&to, TenantRemove { name: name.clone() }).await;
            client.endpoint().close().await;
            r?;
            let result = serde_json::json!({ "tenant": name, "removed": true });
            return super::applied(ctx, result, format!("tenant {name} removed"));
        }
    };
    client.endpoint().close().await;
    print_tenants(ctx, &result?)
}

pub async fn quota(ctx: &Context, cmd: QuotaCommand) -> Result<(), Failure> {
    let request = match cmd {
        QuotaCommand::Set {
            tenant,
            max_vms,
            max_vcpus,
            max_memory,
        } => {
            let max_memory_mib = max_memory.as_deref().map(parse_mib).transpose()?;
            Ok(QuotaSet {
                tenant,
                quota: Quota {
                    max_vms,
                    max_vcpus,
                    max_memory_mib,
                },
            })
        }
        QuotaCommand::Show { tenant, stale } => Err(QuotaShow { tenant, stale }),
    };
    let (client, to) = client(ctx).await?;
    let result = match request {
        Ok(set) => client.call(&to, set).await,
        Err(show) => client.call(&to, show).await,
    };
    client.endpoint().close().await;
    print_tenants(ctx, &[result?])
}

pub async fn node_list(ctx: &Context, stale: bool) -> Result<(), Failure> {
    let nodes = call(ctx, NodeList { stale }).await?.nodes;
    if ctx.output == Format::Json {
        return output::json(&nodes).map_err(fail);
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let m = &n.member;
            vec![
                format!("n{}{}", m.id, if n.leader { "*" } else { "" }),
                m.name.clone(),
                if n.down_since_ms.is_some() {
                    "down"
                } else if n.drained {
                    "drained"
                } else {
                    "ready"
                }
                .to_string(),
                format!("{}/{}", n.allocated.vcpus, m.capacity.vcpus),
                format!(
                    "{}/{}",
                    human_bytes(n.allocated.memory_mib << 20),
                    human_bytes(m.capacity.memory_mib << 20)
                ),
                n.allocated.vms.to_string(),
                output::labels(&m.labels),
            ]
        })
        .collect();
    output::table(
        &["ID", "NAME", "STATUS", "VCPUS", "MEMORY", "VMS", "LABELS"],
        &rows,
    );
    Ok(())
}

pub async fn node_stats(ctx: &Context) -> Result<(), Failure> {
    let s = call(ctx, NodeStatsRequest {}).await?;
    if ctx.output == Format::Json {
        return output::json(&s).map_err(fail);
    }
    let join = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out!(
        "node       n{} ({}), leader {}, term {}",
        s.node,
        s.role,
        s.leader.map_or("none".to_string(), |l| format!("n{l}")),
        s.term
    );
    out!(
        "raft       commit {}, applied {}, leader changes seen {}",
        s.commit_index,
        s.applied_index,
        s.leader_changes_seen
    );
    out!(
        "proposals  committed {}, failed {}, pending {}",
        s.proposals_committed,
        s.proposals_failed,
        s.proposals_pending
    );
    if s.state_check_alarm {
        out!("ALARM      a state check found this node's state unlike another member's");
    }
    out!("members    {}", join(&s.members));
    out!(
        "capacity   {}/{} vCPUs, {}/{} allocated",
        s.allocated.vcpus,
        s.capacity.vcpus,
        human_bytes(s.allocated.memory_mib << 20),
        human_bytes(s.capacity.memory_mib << 20)
    );
    out!(
        "vms        {}; starts {} ok, {} failed",
        match join(&s.vms) {
            j if j.is_empty() => "none".to_string(),
            j => j,
        },
        s.vm_starts_ok,
        s.vm_starts_failed
    );
    out!(
        "images     {} held ({}), cache sent {}",
        s.images_held,
        human_bytes(s.image_store_bytes),
        human_bytes(s.cache_sent_bytes)
    );
    out!(
        "api        {} ok, {} failed; authz {} allowed, {} denied; audit records dropped {}",
        s.api_requests_ok,
        s.api_requests_failed,
        s.authz_allowed,
        s.authz_denied,
        s.audit_records_dropped
    );
    let peers: Vec<String> = s
        .peers
        .iter()
        .map(|p| {
            format!(
                "n{} {} {:.1} ms",
                p.node,
                p.path,
                p.rtt_micros as f64 / 1000.0
            )
        })
        .collect();
    out!(
        "peers      {}",
        if peers.is_empty() {
            "none connected".to_string()
        } else {
            peers.join(", ")
        }
    );
    out!(
        "process    {} resident, {:.1} s CPU, {} fds, up {} s{}",
        human_bytes(s.resident_memory_bytes),
        s.cpu_millis as f64 / 1000.0,
        s.open_fds,
        s.uptime_secs,
        s.data_dir_available_bytes
            .map(|b| format!(", {} free in the data dir", human_bytes(b)))
            .unwrap_or_default()
    );
    Ok(())
}
