//! `blixard vm …` and `blixard node drain|undrain`.

use std::io::Write;
use std::time::{Duration, Instant};

use blixard_core::{NodeId, Phase, RestartPolicy, Vm, VmSpec};
use blixard_net::api::{
    NodeDrain, VmControl, VmCreate, VmDelete, VmList, VmLogs, VmOp, VmRef, VmShow,
};
use blixard_net::client::ApiClient;
use blixard_net::EndpointAddr;
use clap::{Subcommand, ValueEnum};

use super::format::{self as output, Format};
use super::parse::parse_mib;
use super::{client, fail, Context};
use blixard_node::exit::{self, Failure};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RestartArg {
    Always,
    OnFailure,
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WaitFor {
    /// The runner is up.
    Running,
    /// The guest printed the VM's ready marker (without one: the runner is up).
    Ready,
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Create a VM from an image; it is placed on a host and started there.
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// e.g. 256 (MiB), 512MiB, 2GiB.
        #[arg(long, default_value = "256")]
        memory: String,
        /// The tenant (default: yours, else `default`).
        #[arg(long)]
        tenant: Option<String>,
        /// A label on the VM, KEY=VALUE; repeatable.
        #[arg(long = "label", value_parser = super::parse::parse_label)]
        labels: Vec<(String, String)>,
        /// Only hosts with this label, KEY=VALUE; repeatable.
        #[arg(long = "constraint", value_parser = super::parse::parse_label)]
        constraints: Vec<(String, String)>,
        /// VMs of the same group never share a host.
        #[arg(long)]
        anti_affinity: Option<String>,
        /// With --anti-affinity: nor a value of this node label (e.g. `zone`: one VM of
        /// the group per zone). Hosts without the label take none of the group's VMs.
        #[arg(long, value_name = "LABEL", requires = "anti_affinity")]
        spread_over: Option<String>,
        /// What the host does when the runner exits.
        #[arg(long, value_enum, default_value_t = RestartArg::Always)]
        restart: RestartArg,
        /// A line the guest prints on its console once ready (for `--wait ready`).
        #[arg(long)]
        ready_marker: Option<String>,
        /// Create it stopped.
        #[arg(long)]
        no_start: bool,
        /// Wait until the VM is running (or ready); fail if it fails.
        #[arg(long, value_enum)]
        wait: Option<WaitFor>,
        /// How long `--wait` waits, in seconds.
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
    },
    /// List the VMs you may see.
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// Only the VMs on this host (e.g. n2). (`--node` is taken: it picks the node
        /// the CLI talks to.)
        #[arg(long)]
        host: Option<NodeId>,
        #[arg(long)]
        stale: bool,
    },
    /// A VM's spec, placement, status and history.
    Show {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        stale: bool,
    },
    /// Start a stopped VM.
    Start(VmArgs),
    /// Stop a VM (it stays placed, resources reserved).
    Stop(VmArgs),
    /// Restart a VM's runner.
    Restart(VmArgs),
    /// Delete a VM (its host stops it).
    Delete {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The guest's console, read on the VM's host (from any node).
    Logs {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
        /// Keep printing what the guest writes.
        #[arg(long, short)]
        follow: bool,
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: u32,
    },
}

#[derive(clap::Args, Debug)]
pub struct VmArgs {
    name: String,
    #[arg(long)]
    tenant: Option<String>,
    /// Return once the request is recorded, without waiting for the host to act.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the host, in seconds.
    #[arg(long, default_value_t = 120)]
    wait_timeout: u64,
}

fn age(ms: u64) -> String {
    output::duration_ms(blixard_node::cluster::now_ms().saturating_sub(ms))
}

fn desired(vm: &Vm) -> &'static str {
    match vm.desired {
        blixard_core::Desired::Running => "running",
        blixard_core::Desired::Stopped => "stopped",
    }
}

fn print_vms(ctx: &Context, vms: &[Vm]) -> Result<(), Failure> {
    if ctx.output == Format::Json {
        return output::json(&vms).map_err(fail);
    }
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.spec.name.clone(),
                v.spec.tenant.clone(),
                v.node
                    .map(|n| format!("n{n}"))
                    .unwrap_or_else(|| "-".into()),
                desired(v).into(),
                v.phase.to_string(),
                format!("{}/{}MiB", v.spec.vcpus, v.spec.memory_mib),
                age(v.created_at_ms),
                v.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME", "TENANT", "NODE", "DESIRED", "OBSERVED", "SIZE", "AGE", "REASON",
        ],
        &rows,
    );
    Ok(())
}

fn print_vm(ctx: &Context, vm: &Vm) -> Result<(), Failure> {
    if ctx.output == Format::Json {
        return output::json(vm).map_err(fail);
    }
    let s = &vm.spec;
    out!("name:        {}", s.name);
    out!("tenant:      {}", s.tenant);
    out!("image:       {} ({})", s.image, vm.manifest);
    out!("size:        {} vCPUs, {} MiB", s.vcpus, s.memory_mib);
    let restart = match s.restart {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    };
    out!("restart:     {restart}");
    if !s.labels.is_empty() {
        out!("labels:      {}", output::labels(&s.labels));
    }
    if !s.constraints.is_empty() {
        out!("constraints: {}", output::labels(&s.constraints));
    }
    if let Some(g) = s.group() {
        match s.spread_over() {
            Some(label) => out!("anti-affinity: {g} (one per {label})"),
            None => out!("anti-affinity: {g}"),
        }
    }
    out!(
        "node:        {}",
        vm.node
            .map(|n| format!("n{n}"))
            .unwrap_or_else(|| "-".into())
    );
    out!("desired:     {}", desired(vm));
    out!("observed:    {}", vm.phase);
    if let Some(r) = &vm.reason {
        out!("reason:      {r}");
    }
    out!("history:");
    for t in &vm.history {
        out!(
            "  {:>6} ago  {:<9} {:<4} {}",
            age(t.at_ms),
            t.phase.to_string(),
            t.node
                .map(|n| format!("n{n}"))
                .unwrap_or_else(|| "-".into()),
            t.reason.clone().unwrap_or_default()
        );
    }
    Ok(())
}

fn vm_ref(name: String, tenant: Option<String>) -> VmRef {
    VmRef { name, tenant }
}

/// Polls the VM (linearizable reads: the node asked may not have applied the create yet,
/// when the leader answered it) until it is running (or ready); its failure is the
/// command's failure.
async fn wait_for(
    client: &ApiClient,
    to: &EndpointAddr,
    vm: VmRef,
    what: WaitFor,
    within: Duration,
) -> Result<Vm, Failure> {
    let deadline = Instant::now() + within;
    loop {
        let v = client
            .call(
                to,
                VmShow {
                    vm: vm.clone(),
                    stale: false,
                },
            )
            .await?
            .vm;
        let done = match what {
            WaitFor::Running => v.phase.is_up(),
            WaitFor::Ready if v.spec.ready_marker.is_none() => v.phase.is_up(),
            WaitFor::Ready => v.phase == Phase::Ready,
        };
        if done {
            return Ok(*v);
        }
        // A failure the host will retry (its restart policy) is worth waiting through.
        let retrying = v
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("restarting in"));
        if v.phase == Phase::Failed && !retrying {
            return Err(Failure::new(
                exit::REFUSED,
                format!(
                    "VM {} failed: {}",
                    v.id(),
                    v.reason.unwrap_or_else(|| "no reason given".into())
                ),
            ));
        }
        if Instant::now() > deadline {
            return Err(Failure::new(
                exit::UNAVAILABLE,
                format!(
                    "VM {} is still {} after {}s{}",
                    v.id(),
                    v.phase,
                    within.as_secs(),
                    v.reason.map(|r| format!(": {r}")).unwrap_or_default()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(ctx: &Context, cmd: VmCommand) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let result = run_with(ctx, &client, &to, cmd).await;
    client.endpoint().close().await;
    result
}

async fn run_with(
    ctx: &Context,
    client: &ApiClient,
    to: &EndpointAddr,
    cmd: VmCommand,
) -> Result<(), Failure> {
    match cmd {
        VmCommand::Create {
            name,
            image,
            vcpus,
            memory,
            tenant,
            labels,
            constraints,
            anti_affinity,
            spread_over,
            restart,
            ready_marker,
            no_start,
            wait,
            wait_timeout,
        } => {
            if no_start && wait.is_some() {
                return Err(Failure::new(
                    exit::USAGE,
                    "--wait needs the VM to start; drop --no-start",
                ));
            }
            let spec = VmSpec {
                name: name.clone(),
                tenant: tenant.clone().unwrap_or_default(),
                image,
                vcpus,
                memory_mib: parse_mib(&memory)?,
                labels: labels.into_iter().collect(),
                constraints: constraints.into_iter().collect(),
                anti_affinity: match (anti_affinity, spread_over) {
                    (Some(g), Some(label)) => {
                        Some(format!("{g}{}{label}", blixard_core::SPREAD_SEPARATOR))
                    }
                    (g, _) => g,
                },
                restart: match restart {
                    RestartArg::Always => RestartPolicy::Always,
                    RestartArg::OnFailure => RestartPolicy::OnFailure,
                    RestartArg::Never => RestartPolicy::Never,
                },
                ready_marker,
            };
            let created = client
                .call(
                    to,
                    VmCreate {
                        spec: Box::new(spec),
                        start: !no_start,
                    },
                )
                .await?
                .vm;
            let vm = match wait {
                Some(what) => {
                    let r = vm_ref(name, Some(created.spec.tenant.clone()));
                    wait_for(client, to, r, what, Duration::from_secs(wait_timeout)).await?
                }
                None => *created,
            };
            print_vm(ctx, &vm)
        }
        VmCommand::List {
            tenant,
            host,
            stale,
        } => {
            let vms = client
                .call(
                    to,
                    VmList {
                        tenant,
                        node: host,
                        stale,
                    },
                )
                .await?
                .vms;
            print_vms(ctx, &vms)
        }
        VmCommand::Show {
            name,
            tenant,
            stale,
        } => {
            let vm = client
                .call(
                    to,
                    VmShow {
                        vm: vm_ref(name, tenant),
                        stale,
                    },
                )
                .await?
                .vm;
            print_vm(ctx, &vm)
        }
        VmCommand::Start(a) => control(ctx, client, to, a, VmOp::Start).await,
        VmCommand::Stop(a) => control(ctx, client, to, a, VmOp::Stop).await,
        VmCommand::Restart(a) => control(ctx, client, to, a, VmOp::Restart).await,
        VmCommand::Delete { name, tenant } => {
            client
                .call(
                    to,
                    VmDelete {
                        vm: vm_ref(name.clone(), tenant.clone()),
                    },
                )
                .await?;
            if ctx.output == Format::Json {
                let result = serde_json::json!({ "vm": name, "tenant": tenant, "deleted": true });
                return super::applied(ctx, result, "");
            }
            out!("deleted VM {name}");
            Ok(())
        }
        VmCommand::Logs {
            name,
            tenant,
            follow,
            lines,
        } => {
            let vm = vm_ref(name, tenant);
            let mut from = None;
            // With --output json, one object per console line: a line split across two
            // reads is held until its end arrives (or the last read).
            let mut partial = String::new();
            loop {
                let c = client
                    .call(
                        to,
                        VmLogs {
                            vm: vm.clone(),
                            lines,
                            from,
                        },
                    )
                    .await?;
                let mut out = std::io::stdout().lock();
                if ctx.output == Format::Json {
                    partial.push_str(&c.text);
                    let done = partial.rfind('\n').map_or(0, |i| i + 1);
                    let complete: String = partial.drain(..done).collect();
                    let last =
                        (!follow && !partial.is_empty()).then(|| std::mem::take(&mut partial));
                    for line in complete.lines().map(str::to_string).chain(last) {
                        let object =
                            serde_json::json!({ "vm": vm.name, "tenant": vm.tenant, "line": line });
                        let _ = writeln!(out, "{object}");
                    }
                } else {
                    let _ = out.write_all(c.text.as_bytes());
                }
                let _ = out.flush();
                if !follow {
                    return Ok(());
                }
                from = Some(c.next);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// `vm start|stop|restart`: records the request, then (unless `--no-wait`) waits until
/// the host has carried it out.
async fn control(
    ctx: &Context,
    client: &ApiClient,
    to: &EndpointAddr,
    a: VmArgs,
    op: VmOp,
) -> Result<(), Failure> {
    let r = vm_ref(a.name, a.tenant);
    let asked = client.call(to, VmControl { vm: r.clone(), op }).await?.vm;
    if a.no_wait || asked.node.is_none() {
        // Not placed: nothing to wait for until a host has room.
        return print_vm(ctx, &asked);
    }
    let r = vm_ref(r.name, Some(asked.spec.tenant.clone()));
    let deadline = Instant::now() + Duration::from_secs(a.wait_timeout);
    // What happened since the request: the history after its last entry then (the hosts'
    // clocks are not compared with each other).
    let seen = asked.history.len();
    let last = asked.history.last().cloned();
    loop {
        let v = client
            .call(
                to,
                VmShow {
                    vm: r.clone(),
                    stale: false,
                },
            )
            .await?
            .vm;
        let after = match &last {
            Some(l) => v.history.iter().rposition(|t| t == l).map_or(0, |i| i + 1),
            None => seen.min(v.history.len()),
        };
        let restarted = || {
            v.history[after..]
                .iter()
                .any(|t| t.phase == Phase::Starting)
        };
        let done = match op {
            VmOp::Stop => matches!(v.phase, Phase::Stopped | Phase::Failed),
            VmOp::Start => v.phase.is_up(),
            VmOp::Restart => v.phase.is_up() && restarted(),
        };
        if done || (op != VmOp::Stop && v.phase == Phase::Failed && restarted()) {
            print_vm(ctx, &v)?;
            if v.phase == Phase::Failed && op != VmOp::Stop {
                return Err(Failure::new(
                    exit::REFUSED,
                    format!(
                        "VM {} failed: {}",
                        v.id(),
                        v.reason.clone().unwrap_or_default()
                    ),
                ));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Failure::new(
                exit::UNAVAILABLE,
                format!(
                    "VM {} is still {} after {}s",
                    v.id(),
                    v.phase,
                    a.wait_timeout
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `node drain` / `node undrain`; with `wait`, until the moved VMs run elsewhere (or
/// cannot be placed).
pub async fn drain(
    ctx: &Context,
    node: NodeId,
    drained: bool,
    wait: Option<Duration>,
) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let result = async {
        let moved = client.call(&to, NodeDrain { node, drained }).await?.moved;
        // With --output json, one object at the end: what was applied and, after a
        // --wait, where the moved VMs are.
        let json = ctx.output == Format::Json;
        let done = |vms: Option<&[Vm]>| {
            let result = serde_json::json!({
                "node": node, "drained": drained, "moved": moved, "vms": vms,
            });
            super::applied(ctx, result, "")
        };
        if !json {
            if drained {
                out!("node {node} drained; moving {} VMs", moved.len());
            } else {
                out!("node {node} takes VMs again");
            }
        }
        let Some(within) = wait.filter(|_| drained) else {
            return if json { done(None) } else { Ok(()) };
        };
        let deadline = Instant::now() + within;
        loop {
            let vms = client
                .call(
                    &to,
                    VmList {
                        tenant: None,
                        node: None,
                        stale: false,
                    },
                )
                .await?
                .vms;
            let waiting: Vec<&Vm> = vms
                .iter()
                .filter(|v| moved.contains(&v.id()))
                .filter(|v| {
                    v.desired == blixard_core::Desired::Running
                        && !v.phase.is_up()
                        && !(v.phase == Phase::Pending
                            && v.reason.is_some()
                            && v.node.is_none()
                            && v.reason
                                .as_deref()
                                .is_some_and(|r| r.starts_with("unschedulable")))
                })
                .collect();
            if waiting.is_empty() {
                let placed: Vec<Vm> = vms
                    .iter()
                    .filter(|v| moved.contains(&v.id()))
                    .cloned()
                    .collect();
                return if json {
                    done(Some(&placed))
                } else {
                    print_vms(ctx, &placed)
                };
            }
            if Instant::now() > deadline {
                let names: Vec<String> = waiting
                    .iter()
                    .map(|v| format!("{} ({})", v.id(), v.phase))
                    .collect();
                return Err(Failure::new(
                    exit::UNAVAILABLE,
                    format!(
                        "still moving after {}s: {}",
                        within.as_secs(),
                        names.join(", ")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    .await;
    client.endpoint().close().await;
    result
}
