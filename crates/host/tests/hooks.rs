//! VM lifecycle hooks: operator hooks as real `#!/bin/sh` executables (what they receive,
//! how they veto, timeouts that kill the whole process group) and the chain's order.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_host::{ExecHook, HookChain, HookFuture, HookVm, Veto, VmLifecycleHook};
use blixard_tests::alive;

fn vm() -> HookVm {
    HookVm {
        name: "web-1".into(),
        tenant: "acme".into(),
        image: "nginx".into(),
        vcpus: 2,
        memory_mib: 1024,
        labels: BTreeMap::from([("tier".to_string(), "front".to_string())]),
        node: Some("n2".into()),
    }
}

/// Writes an executable `#!/bin/sh` script. `install` writes it from a child process, so
/// no write handle is open in this (multi-threaded) process while another test forks, which
/// could make executing it fail with ETXTBSY.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let src = dir.join(format!("{name}.src"));
    std::fs::write(&src, format!("#!/bin/sh\n{body}\n")).unwrap();
    let path = dir.join(name);
    let status = std::process::Command::new("install")
        .args(["-m", "755"])
        .arg(&src)
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success(), "install {}", path.display());
    path
}

fn exec(path: &Path, timeout: Duration) -> Arc<ExecHook> {
    Arc::new(ExecHook::new(path.to_owned(), timeout))
}

fn chain(hooks: Vec<Arc<dyn VmLifecycleHook>>) -> HookChain {
    let mut chain = HookChain::new();
    for hook in hooks {
        chain.push(hook);
    }
    chain
}

fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

async fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out waiting for {what}: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn exit_zero_allows_and_gets_the_vm_on_stdin_and_the_event() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = sh_quote(&out);
    let hook = script(
        dir.path(),
        "hook",
        &format!(
            "cat > {o}/\"$1.json\"\nprintf '%s %s' \"$1\" \"$BLIXARD_HOOK_EVENT\" > {o}/\"$1.args\"\nexit 0"
        ),
    );
    let chain = chain(vec![exec(&hook, Duration::from_secs(10))]);
    let vm = vm();
    chain.before_vm_create(&vm).await.unwrap();
    chain.after_vm_start(&vm).await;
    chain.before_vm_delete(&vm).await.unwrap();

    for event in ["before_vm_create", "after_vm_start", "before_vm_delete"] {
        let args = std::fs::read_to_string(out.join(format!("{event}.args"))).unwrap();
        assert_eq!(args, format!("{event} {event}"));
        let json = std::fs::read_to_string(out.join(format!("{event}.json"))).unwrap();
        let got: HookVm = serde_json::from_str(&json).unwrap();
        assert_eq!(got, vm);
        let raw: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(raw["node"], "n2");
        assert_eq!(raw["memory_mib"], 1024);
        assert_eq!(raw["labels"]["tier"], "front");
    }
}

#[tokio::test]
async fn exit_one_vetoes_with_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "gpu", "echo 'no GPUs left' >&2\nexit 1");
    let veto = exec(&hook, Duration::from_secs(10))
        .before_vm_create(&vm())
        .await
        .unwrap_err();
    assert_eq!(
        veto,
        Veto {
            hook: hook.display().to_string(),
            reason: "no GPUs left".into()
        }
    );
    assert_eq!(
        veto.to_string(),
        format!("{}: no GPUs left", hook.display())
    );
}

#[tokio::test]
async fn exit_three_without_stderr_says_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "quiet", "exit 3");
    let veto = exec(&hook, Duration::from_secs(10))
        .before_vm_delete(&vm())
        .await
        .unwrap_err();
    assert_eq!(veto.reason, "exited with status 3");
}

#[tokio::test]
async fn chatty_hook_does_not_block_and_its_reason_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    // Far more than a pipe buffer holds: the hook would block if nobody read stderr.
    let hook = script(
        dir.path(),
        "chatty",
        "head -c 300000 /dev/zero | tr '\\0' x >&2\nexit 1",
    );
    let veto = exec(&hook, Duration::from_secs(10))
        .before_vm_create(&vm())
        .await
        .unwrap_err();
    assert_eq!(veto.reason, "x".repeat(1024));
}

#[tokio::test]
async fn hook_that_ignores_a_large_stdin_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "deaf", "exit 0");
    let mut vm = vm();
    // Larger than a pipe buffer, so writing it meets the closed pipe.
    vm.labels.insert("big".into(), "y".repeat(1 << 20));
    exec(&hook, Duration::from_secs(10))
        .before_vm_create(&vm)
        .await
        .unwrap();
}

#[tokio::test]
async fn timeout_vetoes_and_kills_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pids = sh_quote(&dir.path().join("pids"));
    let hook = script(
        dir.path(),
        "slow",
        &format!("sleep 30 &\necho \"$$ $!\" > {pids}.tmp\nmv {pids}.tmp {pids}\nsleep 30"),
    );
    let started = Instant::now();
    let veto = exec(&hook, Duration::from_millis(500))
        .before_vm_create(&vm())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(veto.reason, "timed out after 500ms");
    assert!(took < Duration::from_secs(10), "took {took:?}");

    let pids = std::fs::read_to_string(dir.path().join("pids")).unwrap();
    let pids: Vec<u32> = pids
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    wait_for(
        "the hook and its child to die",
        Duration::from_secs(5),
        || match pids.iter().find(|p| alive(**p)) {
            Some(p) => Err(format!("{p} still runs")),
            None => Ok(()),
        },
    )
    .await;
}

#[tokio::test]
async fn missing_executable_vetoes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope");
    let veto = exec(&path, Duration::from_secs(10))
        .before_vm_create(&vm())
        .await
        .unwrap_err();
    assert_eq!(veto.hook, path.display().to_string());
    assert!(veto.reason.starts_with("cannot start: "), "{veto}");
    assert!(veto.reason.contains("No such file"), "{veto}");
}

/// A Rust hook that counts its calls and vetoes when told to.
struct Counting {
    name: &'static str,
    veto: bool,
    calls: AtomicUsize,
}

impl Counting {
    fn new(name: &'static str, veto: bool) -> Arc<Self> {
        Arc::new(Self {
            name,
            veto,
            calls: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn answer<'a>(&'a self) -> HookFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.veto {
                Err(Veto {
                    hook: self.name.into(),
                    reason: format!("{} says no", self.name),
                })
            } else {
                Ok(())
            }
        })
    }
}

impl VmLifecycleHook for Counting {
    fn name(&self) -> &str {
        self.name
    }

    fn before_vm_create<'a>(&'a self, _vm: &'a HookVm) -> HookFuture<'a> {
        self.answer()
    }

    fn after_vm_start<'a>(&'a self, _vm: &'a HookVm) -> HookFuture<'a> {
        self.answer()
    }

    fn before_vm_delete<'a>(&'a self, _vm: &'a HookVm) -> HookFuture<'a> {
        self.answer()
    }
}

#[tokio::test]
async fn chain_stops_at_the_first_veto() {
    let dir = tempfile::tempdir().unwrap();
    let allow = script(dir.path(), "allow", "exit 0");
    let first = exec(&allow, Duration::from_secs(10));
    let second = Counting::new("second", true);
    let third = Counting::new("third", false);
    let chain = chain(vec![first, second.clone(), third.clone()]);
    assert_eq!(chain.len(), 3);
    assert!(!chain.is_empty());

    let veto = chain.before_vm_create(&vm()).await.unwrap_err();
    assert_eq!(veto.to_string(), "second: second says no");
    let veto = chain.before_vm_delete(&vm()).await.unwrap_err();
    assert_eq!(veto.hook, "second");
    assert_eq!(second.calls(), 2);
    assert_eq!(third.calls(), 0);
}

#[tokio::test]
async fn after_vm_start_never_fails_and_runs_every_hook() {
    let dir = tempfile::tempdir().unwrap();
    let failing = script(dir.path(), "failing", "echo broken >&2\nexit 1");
    let missing = dir.path().join("missing");
    let vetoing = Counting::new("vetoing", true);
    let last = Counting::new("last", false);
    let chain = chain(vec![
        exec(&failing, Duration::from_secs(10)),
        exec(&missing, Duration::from_secs(10)),
        vetoing.clone(),
        last.clone(),
    ]);
    chain.after_vm_start(&vm()).await;
    assert_eq!(vetoing.calls(), 1);
    assert_eq!(last.calls(), 1);

    let empty = HookChain::new();
    assert!(empty.is_empty());
    empty.after_vm_start(&vm()).await;
    empty.before_vm_create(&vm()).await.unwrap();
}
