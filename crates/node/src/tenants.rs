//! Tenants, quotas and the host list: the API handlers.

use blixard_authz::Resource;
use blixard_core::{Command, Quota, Tenant};
use blixard_net::api::{
    ApiError, NodeEntries, NodeEntry, Response, ResponseFrame, TenantEntries, TenantInfo,
};
use blixard_net::authz::Principal;

use crate::service::{now_ms, NodeService};

impl NodeService {
    fn tenant_info(&self, tenant: &Tenant) -> TenantInfo {
        TenantInfo {
            tenant: tenant.clone(),
            used: self.node.state().tenant_usage(&tenant.name),
        }
    }

    fn tenant_named(&self, name: &str) -> Result<TenantInfo, ApiError> {
        let tenant = self
            .node
            .state()
            .tenant(name)
            .cloned()
            .ok_or_else(|| ApiError::Rejected(format!("no tenant {name}")))?;
        Ok(self.tenant_info(&tenant))
    }

    pub(crate) async fn tenant_create(&self, name: &str) -> ResponseFrame {
        self.propose(Command::CreateTenant {
            name: name.to_string(),
            now_ms: now_ms(),
        })
        .await?;
        Ok(Response::TenantCreate(self.tenant_named(name)?))
    }

    pub(crate) async fn quota_set(&self, tenant: &str, quota: Quota) -> ResponseFrame {
        if quota.max_vms == Some(0) || quota.max_vcpus == Some(0) || quota.max_memory_mib == Some(0)
        {
            return Err(ApiError::BadRequest(
                "a quota of 0 allows nothing; leave a limit out for no limit".into(),
            ));
        }
        self.propose(Command::SetQuota {
            tenant: tenant.to_string(),
            quota,
        })
        .await?;
        Ok(Response::QuotaSet(self.tenant_named(tenant)?))
    }

    pub(crate) async fn quota_show(&self, tenant: &str, stale: bool) -> ResponseFrame {
        self.barrier(stale).await?;
        Ok(Response::QuotaShow(self.tenant_named(tenant)?))
    }

    pub(crate) async fn tenant_list(&self, principal: &Principal, stale: bool) -> ResponseFrame {
        self.barrier(stale).await?;
        let may = self.may(principal);
        let tenants: Vec<Tenant> = self.node.state().tenants().cloned().collect();
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
            .map(|t| self.tenant_info(t))
            .collect();
        Ok(Response::TenantList(TenantEntries { tenants }))
    }

    pub(crate) async fn node_list(&self, stale: bool) -> ResponseFrame {
        self.barrier(stale).await?;
        let leader = self.node.status().await.ok().and_then(|s| s.leader);
        let state = self.node.state();
        let ledger = state.ledger();
        let nodes = state
            .members()
            .map(|m| NodeEntry {
                member: m.clone(),
                allocated: ledger.allocated.get(&m.id).copied().unwrap_or_default(),
                drained: state.is_drained(m.id),
                leader: leader == Some(m.id.0),
                down_since_ms: state.down_since(m.id),
            })
            .collect();
        Ok(Response::NodeList(NodeEntries { nodes }))
    }
}
