//! Trace context through raft: a proposal carries its caller's `traceparent` in the
//! entry's context, every member applies the entry in a span of that trace, and the VM
//! work the entry causes on a host (the image fetch, the runner's exec) joins it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blixard_core::{Command, Vm};
use blixard_net::trace::{self, TARGET};

/// How many VMs' latest traces a node remembers.
const REMEMBERED: usize = 1024;
/// How long after the entry a host's work on the VM still joins its trace.
const JOIN_WITHIN: Duration = Duration::from_secs(600);

/// The node's [`blixard_raft::EntryTracing`], and the trace each VM's latest command
/// belongs to (kept in memory: a trace is about the minutes after a request).
#[derive(Debug, Default)]
pub struct EntryTraces {
    vms: Mutex<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    by_vm: HashMap<String, (String, Instant)>,
    order: VecDeque<String>,
}

impl EntryTraces {
    /// A span for work on VM `key` (`what`: "schedule", "image fetch", "runner exec"), in
    /// the trace of the command that asked for it; a disabled span when there is none.
    pub fn vm_span(&self, key: &str, what: &'static str) -> tracing::Span {
        let Some(parent) = self.vm_trace(key) else {
            return tracing::Span::none();
        };
        let span = tracing::info_span!(
            target: TARGET,
            "vm",
            otel.name = what,
            blixard.vm = %key,
            otel.status_code = tracing::field::Empty,
        );
        trace::set_parent(&span, Some(&parent));
        span
    }

    fn vm_trace(&self, key: &str) -> Option<String> {
        let vms = self.vms.lock().ok()?;
        let (parent, at) = vms.by_vm.get(key)?;
        (at.elapsed() < JOIN_WITHIN).then(|| parent.clone())
    }

    fn remember(&self, key: String, parent: Option<String>) {
        let Ok(mut vms) = self.vms.lock() else { return };
        let Remembered { by_vm, order } = &mut *vms;
        match parent {
            Some(p) => {
                if by_vm.insert(key.clone(), (p, Instant::now())).is_none() {
                    order.push_back(key);
                }
                while by_vm.len() > REMEMBERED {
                    match order.pop_front() {
                        Some(old) => {
                            by_vm.remove(&old);
                        }
                        None => break,
                    }
                }
            }
            None => {
                if by_vm.remove(&key).is_some() {
                    order.retain(|k| k != &key);
                }
            }
        }
    }
}

/// The VM a command acts on, and whether it removes it.
fn vm_of(command: &Command) -> Option<(String, bool)> {
    match command {
        Command::CreateVm { spec, .. } => Some((Vm::key(&spec.tenant, &spec.name), false)),
        Command::PlaceVm { key, .. } | Command::SetVmDesired { key, .. } => {
            Some((key.clone(), false))
        }
        Command::DeleteVm { key } => Some((key.clone(), true)),
        Command::Once { command, .. } => vm_of(command),
        _ => None,
    }
}

impl blixard_raft::EntryTracing for EntryTraces {
    fn context(&self) -> Vec<u8> {
        trace::current().map(String::into_bytes).unwrap_or_default()
    }

    fn apply_span(&self, context: &[u8], index: u64, command: &Command) -> tracing::Span {
        let span = tracing::info_span!(
            target: TARGET,
            "apply",
            otel.name = %format_args!("raft apply {}", command.kind()),
            blixard.index = index,
        );
        trace::set_parent(&span, std::str::from_utf8(context).ok());
        if let Some((key, deleted)) = vm_of(command) {
            let parent = if deleted {
                None
            } else {
                trace::traceparent(&span)
            };
            self.remember(key, parent);
        }
        span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_traces_are_bounded_and_go_with_their_vm() {
        let t = EntryTraces::default();
        for i in 0..REMEMBERED + 10 {
            t.remember(format!("t/vm{i}"), Some(format!("tp{i}")));
        }
        assert_eq!(t.vm_trace("t/vm0"), None);
        assert_eq!(t.vm_trace("t/vm10").as_deref(), Some("tp10"));
        let last = format!("t/vm{}", REMEMBERED + 9);
        assert!(t.vm_trace(&last).is_some());
        t.remember(last.clone(), None);
        assert_eq!(t.vm_trace(&last), None);
        let vms = t.vms.lock().unwrap();
        assert_eq!(vms.by_vm.len(), vms.order.len());
    }
}
