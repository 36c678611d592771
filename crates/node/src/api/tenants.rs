//! Tenants, quotas and the host list (`tenant …`, `quota …`, `node list`).

use blixard_authz::Resource;
use blixard_core::{Command, Quota, Tenant};
use blixard_net::api::{
    ApiError, NodeEntries, NodeEntry, Response, ResponseFrame, TenantEntries, TenantInfo,
    TenantRemoved,
};
use blixard_net::authz::Principal;

use super::Api;
use crate::cluster::{now_ms, ClusterHandle};

fn tenant_info(cluster: &ClusterHandle, tenant: &Tenant) -> TenantInfo {
    TenantInfo {
        tenant: tenant.clone(),
        used: cluster.state().tenant_usage(&tenant.name),
    }
}

fn tenant_named(cluster: &ClusterHandle, name: &str) -> Result<TenantInfo, ApiError> {
    let tenant = cluster
        .state()
        .tenant(name)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("no tenant {name}")))?;
    Ok(tenant_info(cluster, &tenant))
}

pub(super) async fn create(cluster: &ClusterHandle, name: &str) -> ResponseFrame {
    cluster
        .propose(Command::CreateTenant {
            name: name.to_string(),
            now_ms: now_ms(),
        })
        .await?;
    Ok(Response::TenantCreate(tenant_named(cluster, name)?))
}

pub(super) async fn remove(cluster: &ClusterHandle, name: &str) -> ResponseFrame {
    cluster
        .propose(Command::RemoveTenant {
            name: name.to_string(),
        })
        .await?;
    Ok(Response::TenantRemove(TenantRemoved {}))
}

pub(super) async fn quota_set(
    cluster: &ClusterHandle,
    tenant: &str,
    quota: Quota,
) -> ResponseFrame {
    if quota.max_vms == Some(0) || quota.max_vcpus == Some(0) || quota.max_memory_mib == Some(0) {
        return Err(ApiError::BadRequest(
            "a quota of 0 allows nothing; leave a limit out for no limit".into(),
        ));
    }
    cluster
        .propose(Command::SetQuota {
            tenant: tenant.to_string(),
            quota,
        })
        .await?;
    Ok(Response::QuotaSet(tenant_named(cluster, tenant)?))
}

pub(super) async fn quota_show(
    cluster: &ClusterHandle,
    tenant: &str,
    stale: bool,
) -> ResponseFrame {
    cluster.barrier(stale).await?;
    Ok(Response::QuotaShow(tenant_named(cluster, tenant)?))
}

pub(super) async fn list(api: &Api, principal: &Principal, stale: bool) -> ResponseFrame {
    api.cluster.barrier(stale).await?;
    let may = api.may(principal);
    let tenants: Vec<Tenant> = api.cluster.state().tenants().cloned().collect();
    let tenants = tenants
        .iter()
        .filter(|t| {
            may(
                "tenant:read",
                &Resource::Tenant {
                    name: t.name.clone(),
                },
            )
        })
        .map(|t| tenant_info(&api.cluster, t))
        .collect();
    Ok(Response::TenantList(TenantEntries { tenants }))
}

pub(super) async fn node_list(cluster: &ClusterHandle, stale: bool) -> ResponseFrame {
    cluster.barrier(stale).await?;
    let leader = cluster.leader();
    let state = cluster.state();
    let ledger = state.ledger();
    let nodes = state
        .members()
        .map(|m| NodeEntry {
            member: m.clone(),
            allocated: ledger.allocated.get(&m.id).copied().unwrap_or_default(),
            drained: state.is_drained(m.id),
            leader: leader == Some(m.id),
            down_since_ms: state.down_since(m.id),
        })
        .collect();
    Ok(Response::NodeList(NodeEntries { nodes }))
}
