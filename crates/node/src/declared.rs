//! Declared VMs: VMs a host's configuration lists (the NixOS module writes the list to
//! `/etc/blixard/vms.json` and names it in `[vms] declared_file`). At start the daemon
//! imports each runner as an image and brings cluster state in line: it creates missing
//! declared VMs, replaces those whose spec changed, and deletes those it declared before
//! and no longer does. VMs it did not declare (imperative ones, or another host's) are
//! never touched: declared VMs carry the label `blixard.declared-by=nN`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blixard_core::{
    valid_name, valid_vm_name, RestartPolicy, Vm, VmSpec, DEFAULT_TENANT, MAX_MEMORY_MIB,
    MAX_VCPUS, MIN_MEMORY_MIB, NODE_CONSTRAINT, VM_NAME_RULE,
};
use blixard_net::api::{ImageImport, ProgressSink, Request, VmCreate, VmDelete, VmRef};
use serde::Deserialize;

use crate::api::Api;
use crate::config::InputFileError;

/// The label that marks a VM as declared by a host's configuration.
pub const DECLARED_BY: &str = "blixard.declared-by";

/// Where a declared VM may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Wherever the scheduler puts it.
    Cluster,
    /// On the host that declares it.
    Local,
}

/// One entry of the declared-VM file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredVm {
    pub name: String,
    /// The microvm.nix runner (a store path, or a plain directory).
    pub runner: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub tenant: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub constraints: BTreeMap<String, String>,
    pub restart: RestartPolicy,
    pub placement: Placement,
    #[serde(default)]
    pub ready_marker: Option<String>,
}

const WHAT: &str = "declared VMs";

/// Reads and checks a declared-VM file; the error names the file and the VM.
pub fn load(path: &Path) -> Result<Vec<DeclaredVm>, InputFileError> {
    parse(&InputFileError::read(WHAT, path)?, path)
}

/// Parses and checks `text`, a declared-VM file read from `path`.
pub fn parse(text: &str, path: &Path) -> Result<Vec<DeclaredVm>, InputFileError> {
    let entries: Vec<serde_json::Value> = InputFileError::parse_json(WHAT, path, text)?;
    // One entry at a time, so an error names the VM it is in.
    let vms = entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let name = entry
                .get("name")
                .and_then(|n| n.as_str())
                .map_or_else(|| format!("number {}", i + 1), |n| format!("{n:?}"));
            serde_json::from_value::<DeclaredVm>(entry)
                .map_err(|e| InputFileError::entry(WHAT, path, format!("VM {name}"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut names = BTreeSet::new();
    for v in &vms {
        let bad = |rule: String| {
            let entry = format!("VM {:?}", v.name);
            Err(InputFileError::entry(WHAT, path, entry, rule))
        };
        if !valid_vm_name(&v.name) {
            return bad(VM_NAME_RULE.into());
        }
        if !names.insert((v.tenant.clone(), v.name.clone())) {
            return bad("declared twice".into());
        }
        if !v.runner.starts_with('/') {
            return bad(format!("runner {:?} is not an absolute path", v.runner));
        }
        if v.vcpus == 0 || v.vcpus > MAX_VCPUS {
            return bad(format!("vcpus must be 1 to {MAX_VCPUS}"));
        }
        if v.memory_mib < MIN_MEMORY_MIB || v.memory_mib > MAX_MEMORY_MIB {
            return bad(format!(
                "memory_mib must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"
            ));
        }
        if v.tenant.as_deref().is_some_and(|t| !valid_name(t)) {
            return bad("invalid tenant name".into());
        }
        if v.labels.contains_key(DECLARED_BY) || v.constraints.contains_key(NODE_CONSTRAINT) {
            return bad(format!(
                "{DECLARED_BY} and {NODE_CONSTRAINT} are set by the daemon"
            ));
        }
        if v.ready_marker
            .as_deref()
            .is_some_and(|m| m.is_empty() || m.contains('\n'))
        {
            return bad("a ready marker is one non-empty line".into());
        }
    }
    Ok(vms)
}

/// The image a runner becomes: named after its store path's hash, so a new build is a
/// new image (a plain directory is named after the VM and its path).
fn image_name(vm: &DeclaredVm) -> String {
    let base = vm.runner.rsplit('/').next().unwrap_or_default();
    let hash = base.split_once('-').map(|(h, _)| h).unwrap_or_default();
    let store_hash = hash.len() == 32
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    if store_hash {
        format!("declared-{hash}")
    } else {
        let digest = blake3_hex(vm.runner.as_bytes());
        format!("declared-{}-{}", vm.name, &digest[..12])
    }
}

fn blake3_hex(bytes: &[u8]) -> String {
    iroh_blobs::Hash::new(bytes).to_hex().to_string()
}

/// The VM spec a declaration means on node `me`.
fn spec_of(vm: &DeclaredVm, me: blixard_core::NodeId) -> VmSpec {
    let mut labels = vm.labels.clone();
    labels.insert(DECLARED_BY.into(), format!("n{me}"));
    let mut constraints = vm.constraints.clone();
    if vm.placement == Placement::Local {
        constraints.insert(NODE_CONSTRAINT.into(), format!("n{me}"));
    }
    VmSpec {
        name: vm.name.clone(),
        tenant: vm.tenant.clone().unwrap_or_else(|| DEFAULT_TENANT.into()),
        image: image_name(vm),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        labels,
        constraints,
        anti_affinity: None,
        restart: vm.restart,
        ready_marker: vm.ready_marker.clone(),
    }
}

/// Keeps cluster state in line with the declared-VM file at `path`: with `first` (the file
/// as read at start) and again, re-read, at every SIGHUP (`systemctl reload blixard`, which
/// the NixOS module triggers when a `nixos-rebuild switch` changes the file). A reload
/// interrupts a pass that is still retrying; the next pass starts from cluster state again.
/// A file that no longer reads is logged, and the VMs declared before stay as they are.
pub async fn watch(
    api: Arc<Api>,
    path: std::path::PathBuf,
    first: Vec<DeclaredVm>,
    mut reload: tokio::sync::mpsc::Receiver<()>,
) {
    let mut declared = first;
    loop {
        tokio::select! {
            () = run(&api, &declared) => {
                if reload.recv().await.is_none() {
                    return;
                }
            }
            r = reload.recv() => if r.is_none() {
                return;
            },
        }
        match load(&path) {
            Ok(vms) => {
                tracing::info!(file = %path.display(), count = vms.len(), "reloaded the declared VMs");
                declared = vms;
            }
            Err(e) => {
                tracing::error!("{e}; the VMs declared before stay as they are");
            }
        }
    }
}

/// Brings cluster state in line with `declared`, retrying until it succeeds (e.g. while
/// there is no leader yet).
pub async fn run(api: &Api, declared: &[DeclaredVm]) {
    let mut delay = Duration::from_millis(500);
    loop {
        match reconcile(api, declared).await {
            Ok(()) => {
                tracing::info!(count = declared.len(), "declared VMs are in cluster state");
                return;
            }
            Err(e) => {
                tracing::warn!("declared VMs: {e}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One pass. Every change is a request of this host's configuration, through the same
/// choke point as any caller's (authorized as `Host`, audited).
async fn reconcile(api: &Api, declared: &[DeclaredVm]) -> Result<(), String> {
    let cluster = &api.cluster;
    cluster.barrier(false).await.map_err(|e| e.to_string())?;
    let me = cluster.me();
    let mine = format!("n{me}");
    let call = |request: Request| api.call_as_host(request, ProgressSink::none());
    let mut wanted = BTreeSet::new();
    for d in declared {
        let spec = spec_of(d, me);
        wanted.insert(Vm::key(&spec.tenant, &spec.name));
        if cluster.state().image(&spec.image).is_none() {
            let import = ImageImport {
                name: spec.image.clone(),
                path: d.runner.clone(),
                tenant: d.tenant.clone(),
                pin: false,
            };
            call(import.into())
                .await
                .map_err(|e| format!("importing {} for VM {}: {e}", d.runner, d.name))?;
        }
        let existing = cluster
            .state()
            .vm(&Vm::key(&spec.tenant, &spec.name))
            .cloned();
        let vm_ref = VmRef {
            name: spec.name.clone(),
            tenant: Some(spec.tenant.clone()),
        };
        if let Some(vm) = existing {
            if vm.spec.labels.get(DECLARED_BY) != Some(&mine) {
                tracing::warn!(vm = %vm.id(), "declared here, but it exists and was not declared by this node; leaving it alone");
                continue;
            }
            if vm.spec == spec {
                continue;
            }
            tracing::info!(vm = %vm.id(), "declaration changed: replacing the VM");
            call(VmDelete { vm: vm_ref }.into())
                .await
                .map_err(|e| format!("replacing VM {}: {e}", vm.id()))?;
        }
        let create = VmCreate {
            spec: Box::new(spec.clone()),
            start: true,
        };
        call(create.into())
            .await
            .map_err(|e| format!("creating VM {}: {e}", d.name))?;
    }
    // What this node declared before and no longer does.
    let stale: Vec<Vm> = cluster
        .state()
        .vms()
        .filter(|v| v.spec.labels.get(DECLARED_BY) == Some(&mine) && !wanted.contains(&v.id()))
        .cloned()
        .collect();
    for vm in stale {
        tracing::info!(vm = %vm.id(), "no longer declared: deleting");
        let r = VmRef {
            name: vm.spec.name.clone(),
            tenant: Some(vm.spec.tenant.clone()),
        };
        call(VmDelete { vm: r }.into())
            .await
            .map_err(|e| format!("deleting VM {}: {e}", vm.id()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vms.json");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    const WEB: &str = r#"{"name": "web", "runner": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-microvm-web",
        "vcpus": 2, "memory_mib": 512, "tenant": null, "labels": {"app": "web"},
        "constraints": {}, "restart": "on-failure", "placement": "local", "ready_marker": null}"#;

    #[test]
    fn declarations_load_and_become_specs() {
        let (_d, p) = write(&format!("[{WEB}]"));
        let vms = load(&p).unwrap();
        let spec = spec_of(&vms[0], blixard_core::NodeId(2));
        assert_eq!(spec.image, "declared-0123456789abcdfghijklmnpqrsvwxyz");
        assert_eq!(spec.tenant, "default");
        assert_eq!(spec.labels[DECLARED_BY], "n2");
        assert_eq!(spec.constraints[NODE_CONSTRAINT], "n2");
        assert_eq!(spec.restart, RestartPolicy::OnFailure);
        // A plain directory is named after the VM and its path.
        let mut plain = vms[0].clone();
        plain.runner = "/srv/runners/web".into();
        assert!(image_name(&plain).starts_with("declared-web-"));
    }

    #[test]
    fn bad_declarations_name_the_vm() {
        for (text, needle) in [
            (format!("[{WEB}, {WEB}]"), "\"web\": declared twice"),
            (
                format!("[{}]", WEB.replace("on-failure", "no")),
                "VM \"web\": unknown variant `no`",
            ),
            (
                r#"[{"runner": "/x"}]"#.into(),
                "VM number 1: missing field `name`",
            ),
            (
                format!("[{}]", WEB.replace("\"vcpus\": 2", "\"vcpus\": 0")),
                "\"web\": vcpus",
            ),
            (
                format!("[{}]", WEB.replace("/nix/store", "nix/store")),
                "not an absolute path",
            ),
            (
                format!(
                    "[{}]",
                    WEB.replace("\"tenant\": null", "\"tenant\": null, \"colour\": 1")
                ),
                "unknown field",
            ),
            ("[{".into(), "EOF"),
        ] {
            let (_d, p) = write(&text);
            let err = load(&p).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(load(Path::new("/nonexistent/vms.json"))
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/vms.json"));
    }
}
