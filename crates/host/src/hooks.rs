//! VM lifecycle hooks: code that runs before a VM is created, after it starts, and before
//! it is deleted. A `before_*` hook may veto, and its reason reaches the user who asked.
//!
//! Hooks are Rust values ([`VmLifecycleHook`]) run in order by a [`HookChain`]; an operator's
//! executable from the node's config is one of them ([`ExecHook`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, Command};

/// What a hook sees of a VM (also the JSON an operator hook gets on stdin).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HookVm {
    pub name: String,
    pub tenant: String,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub labels: BTreeMap<String, String>,
    /// The host it runs on, when placed (e.g. "n2").
    pub node: Option<String>,
}

/// The lifecycle events hooks see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookEvent {
    BeforeVmCreate,
    AfterVmStart,
    BeforeVmDelete,
}

impl HookEvent {
    /// The name an operator hook gets (the same as the JSON form).
    fn as_str(self) -> &'static str {
        match self {
            HookEvent::BeforeVmCreate => "before_vm_create",
            HookEvent::AfterVmStart => "after_vm_start",
            HookEvent::BeforeVmDelete => "before_vm_delete",
        }
    }
}

/// A hook's refusal: the reason reaches the user who asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{hook}: {reason}")]
pub struct Veto {
    pub hook: String,
    pub reason: String,
}

/// What a hook method returns.
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Veto>> + Send + 'a>>;

/// Code that runs around a VM's lifecycle. `before_*` may veto; `after_vm_start` cannot (its
/// errors are logged by the chain and ignored).
pub trait VmLifecycleHook: Send + Sync {
    /// Names the hook in vetoes and logs.
    fn name(&self) -> &str;

    fn before_vm_create<'a>(&'a self, _vm: &'a HookVm) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    fn after_vm_start<'a>(&'a self, _vm: &'a HookVm) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    fn before_vm_delete<'a>(&'a self, _vm: &'a HookVm) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

fn call<'a>(hook: &'a dyn VmLifecycleHook, event: HookEvent, vm: &'a HookVm) -> HookFuture<'a> {
    match event {
        HookEvent::BeforeVmCreate => hook.before_vm_create(vm),
        HookEvent::AfterVmStart => hook.after_vm_start(vm),
        HookEvent::BeforeVmDelete => hook.before_vm_delete(vm),
    }
}

/// Runs hooks in order; the first veto stops the chain and is returned.
#[derive(Default, Clone)]
pub struct HookChain {
    hooks: Vec<Arc<dyn VmLifecycleHook>>,
}

impl std::fmt::Debug for HookChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.hooks.iter().map(|h| h.name()))
            .finish()
    }
}

impl HookChain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `hook` at the end of the chain.
    pub fn push(&mut self, hook: Arc<dyn VmLifecycleHook>) {
        self.hooks.push(hook);
    }

    pub fn len(&self) -> usize {
        self.hooks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    pub async fn before_vm_create(&self, vm: &HookVm) -> Result<(), Veto> {
        self.before(HookEvent::BeforeVmCreate, vm).await
    }

    /// Runs every hook; an error is logged and the next hook runs.
    pub async fn after_vm_start(&self, vm: &HookVm) {
        for hook in &self.hooks {
            if let Err(veto) = hook.after_vm_start(vm).await {
                tracing::warn!(vm = %vm.name, hook = %veto.hook, reason = %veto.reason, "after_vm_start hook failed");
            }
        }
    }

    pub async fn before_vm_delete(&self, vm: &HookVm) -> Result<(), Veto> {
        self.before(HookEvent::BeforeVmDelete, vm).await
    }

    async fn before(&self, event: HookEvent, vm: &HookVm) -> Result<(), Veto> {
        for hook in &self.hooks {
            if let Err(veto) = call(hook.as_ref(), event, vm).await {
                tracing::info!(vm = %vm.name, hook = %veto.hook, reason = %veto.reason, "{} vetoed", event.as_str());
                return Err(veto);
            }
        }
        Ok(())
    }
}

/// The environment variable that names the event for an [`ExecHook`].
const EVENT_ENV: &str = "BLIXARD_HOOK_EVENT";
/// At most this much of a hook's stderr becomes the reason.
const REASON_CAP: usize = 1024;
/// At most this much stderr is kept (before trimming); the rest is read and dropped.
const STDERR_KEEP: usize = 4 * REASON_CAP;
/// How long stderr is still read after the hook exits (something it left behind may hold
/// it open).
const STDERR_GRACE: Duration = Duration::from_millis(200);
/// How long reaping a killed hook may take.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// An operator hook: an executable from the node's config. It runs for every event with
/// the event name as its only argument (`before_vm_create`, `after_vm_start`,
/// `before_vm_delete`) and the VM as JSON on stdin; env BLIXARD_HOOK_EVENT is also set.
/// Exit 0 allows; any other exit vetoes with its stderr (trimmed, at most 1 KiB, or
/// "exited with status N" when stderr is empty) as the reason. Not finishing within the
/// timeout vetoes too ("timed out after 5s"), and the process (its whole process group) is
/// killed. An executable that cannot be started vetoes with that error. For after_vm_start
/// the outcome is only logged.
#[derive(Clone, Debug)]
pub struct ExecHook {
    path: PathBuf,
    name: String,
    timeout: Duration,
}

impl ExecHook {
    pub fn new(path: PathBuf, timeout: Duration) -> Self {
        let name = path.display().to_string();
        Self {
            path,
            name,
            timeout,
        }
    }

    async fn run(&self, event: HookEvent, vm: &HookVm) -> Result<(), Veto> {
        let veto = |reason: String| Veto {
            hook: self.name.clone(),
            reason,
        };
        let input =
            serde_json::to_vec(vm).map_err(|e| veto(format!("encoding the VM failed: {e}")))?;
        let mut child = Command::new(&self.path)
            .arg(event.as_str())
            .env(EVENT_ENV, event.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own group, so a timeout kills whatever it started too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| veto(format!("cannot start: {e}")))?;
        let mut group = Group(child.id());
        let stdin = child.stdin.take();
        let stderr = child.stderr.take();
        let mut err = Vec::new();
        let done = tokio::time::timeout(
            self.timeout,
            supervise(&mut child, stdin, input, stderr, &mut err),
        )
        .await;
        let failed = match done {
            Ok(Ok(status)) => {
                group.disarm();
                return if status.success() {
                    Ok(())
                } else {
                    Err(veto(reason(status, &err)))
                };
            }
            Ok(Err(e)) => format!("waiting for it failed: {e}"),
            Err(_) => format!("timed out after {:?}", self.timeout),
        };
        group.kill();
        let _ = child.start_kill();
        let _ = tokio::time::timeout(REAP_WAIT, child.wait()).await;
        Err(veto(failed))
    }
}

impl VmLifecycleHook for ExecHook {
    fn name(&self) -> &str {
        &self.name
    }

    fn before_vm_create<'a>(&'a self, vm: &'a HookVm) -> HookFuture<'a> {
        Box::pin(self.run(HookEvent::BeforeVmCreate, vm))
    }

    fn after_vm_start<'a>(&'a self, vm: &'a HookVm) -> HookFuture<'a> {
        Box::pin(self.run(HookEvent::AfterVmStart, vm))
    }

    fn before_vm_delete<'a>(&'a self, vm: &'a HookVm) -> HookFuture<'a> {
        Box::pin(self.run(HookEvent::BeforeVmDelete, vm))
    }
}

/// Feeds `input` to the hook and collects its stderr into `out` while waiting for it.
async fn supervise(
    child: &mut Child,
    stdin: Option<ChildStdin>,
    input: Vec<u8>,
    mut stderr: Option<ChildStderr>,
    out: &mut Vec<u8>,
) -> io::Result<ExitStatus> {
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A hook that does not read stdin may exit first: a broken pipe is fine.
            match stdin.write_all(&input).await {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                    tracing::debug!("writing a hook's stdin: {e}");
                }
                _ => {}
            }
        } // Dropping stdin closes it.
    };
    tokio::pin!(feed);
    let mut fed = false;
    let mut chunk = [0u8; 4096];
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            () = &mut feed, if !fed => fed = true,
            n = read_some(stderr.as_mut(), &mut chunk), if stderr.is_some() => match n {
                Ok(n) if n > 0 => keep(out, &chunk[..n]),
                _ => stderr = None,
            },
        }
    };
    if let Some(mut rest) = stderr {
        let drain = async {
            while let Ok(n @ 1..) = rest.read(&mut chunk).await {
                keep(out, &chunk[..n]);
            }
        };
        let _ = tokio::time::timeout(STDERR_GRACE, drain).await;
    }
    Ok(status)
}

async fn read_some(stream: Option<&mut ChildStderr>, buf: &mut [u8]) -> io::Result<usize> {
    match stream {
        Some(s) => s.read(buf).await,
        None => Ok(0),
    }
}

fn keep(out: &mut Vec<u8>, data: &[u8]) {
    let room = STDERR_KEEP.saturating_sub(out.len());
    out.extend_from_slice(&data[..data.len().min(room)]);
}

/// The veto reason for a hook that exited with `status` and wrote `stderr`.
fn reason(status: ExitStatus, stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if !text.is_empty() {
        let mut end = text.len().min(REASON_CAP);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        return text[..end].trim_end().to_string();
    }
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("exited with {status}"),
    }
}

/// A hook's process group, killed on drop unless disarmed (so a cancelled hook does not
/// leave anything behind).
struct Group(Option<u32>);

impl Group {
    fn disarm(&mut self) {
        self.0 = None;
    }

    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            crate::process::signal_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // A hook's future dropped before it finished leaves nothing behind.
        self.kill();
    }
}
