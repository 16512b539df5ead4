//! A fake agent and a fake VM, and the sandbox and container logic tested
//! against them: state transitions, racing calls, a VM that dies, error
//! codes. (Real VMs are tested in `tests/`.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use husk_agent_api::ttrpc::{self, Code};
use husk_agent_client::agent::{
    CreateContainerRequest, CreateSandboxRequest, StatsContainerResponse,
};
use husk_agent_client::ClientError;
use tokio::net::UnixStream;
use tokio::sync::{watch, Notify};

use crate::agent::{Agent, Stream, INIT};
use crate::container::{lock, ContainerConfig, Events, Exit, State, StdioConfig};
use crate::error::Error;
use crate::hypervisor::{VmExit, VmProcess};
use crate::layout::SandboxLayout;
use crate::sandbox::Sandbox;

type R<T> = Result<T, ClientError>;
/// (container id, exec id)
type ProcessKey = (String, String);

#[derive(Default)]
pub struct FakeAgent {
    pub calls: Mutex<Vec<String>>,
    /// When set, StartContainer waits for it.
    pub start_gate: Mutex<Option<Arc<Notify>>>,
    /// When set, CreateContainer fails with this (and the VM dies).
    pub vm_dies_on_create: Mutex<Option<Arc<FakeVm>>>,
    exits: Mutex<HashMap<ProcessKey, watch::Sender<Option<i32>>>>,
    /// OOM notices GetOomEvent hands out, in order; then UNIMPLEMENTED.
    pub ooms: Mutex<std::collections::VecDeque<String>>,
    /// The VM this agent lives in: its calls fail once it has died.
    pub vm: Mutex<Option<Arc<FakeVm>>>,
}

impl FakeAgent {
    fn call(&self, c: String) {
        lock(&self.calls).push(c);
    }

    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    fn exit_tx(&self, id: &str, exec_id: &str) -> watch::Sender<Option<i32>> {
        lock(&self.exits)
            .entry((id.to_string(), exec_id.to_string()))
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Makes a process in the "guest" end with `code`.
    pub fn exit(&self, id: &str, exec_id: &str, code: i32) {
        self.exit_tx(id, exec_id).send_replace(Some(code));
    }
}

fn rpc(call: &'static str, code: Code, message: &str) -> ClientError {
    ClientError::Rpc {
        call,
        code,
        message: message.into(),
    }
}

#[async_trait]
impl Agent for FakeAgent {
    async fn create_sandbox(&self, req: CreateSandboxRequest) -> R<()> {
        self.call(format!("create_sandbox {}", req.sandbox_id));
        Ok(())
    }
    async fn shutdown(&self, _: Duration) -> R<()> {
        self.call("shutdown".into());
        Ok(())
    }
    async fn create_container(&self, req: CreateContainerRequest) -> R<()> {
        self.call(format!("create_container {}", req.container_id));
        if let Some(vm) = lock(&self.vm_dies_on_create).take() {
            vm.die();
            return Err(ClientError::Transport {
                call: "CreateContainer",
                source: ttrpc::Error::Others("connection reset".into()),
            });
        }
        Ok(())
    }
    async fn start_container(&self, id: &str) -> R<()> {
        self.call(format!("start_container {id}"));
        let gate = lock(&self.start_gate).clone();
        if let Some(g) = gate {
            g.notified().await;
        }
        Ok(())
    }
    async fn remove_container(&self, id: &str) -> R<()> {
        self.call(format!("remove_container {id}"));
        Ok(())
    }
    async fn exec_process(&self, id: &str, exec_id: &str, _: Vec<u8>, _: bool) -> R<()> {
        self.call(format!("exec_process {id} {exec_id}"));
        Ok(())
    }
    async fn wait_process(&self, id: &str, exec_id: &str) -> R<i32> {
        let mut rx = self.exit_tx(id, exec_id).subscribe();
        let vm = lock(&self.vm).clone();
        let died = async move {
            match vm {
                Some(vm) => FakeVmHandle(vm).wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(died);
        loop {
            if let Some(c) = *rx.borrow_and_update() {
                return Ok(c);
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return Err(rpc("WaitProcess", Code::NOT_FOUND, "gone"));
                },
                _ = &mut died => return Err(ClientError::Transport {
                    call: "WaitProcess",
                    source: ttrpc::Error::Others("the VM is gone".into()),
                }),
            }
        }
    }
    async fn signal_process(&self, id: &str, exec_id: &str, signal: i32) -> R<()> {
        self.call(format!("signal_process {id} {exec_id:?} {signal}"));
        Ok(())
    }
    async fn signal_all(&self, id: &str, signal: i32) -> R<()> {
        self.call(format!("signal_all {id} {signal}"));
        Ok(())
    }
    async fn remove_process(&self, id: &str, exec_id: &str) -> R<()> {
        self.call(format!("remove_process {id} {exec_id}"));
        Ok(())
    }
    async fn close_stdin(&self, _: &str, _: &str) -> R<()> {
        Ok(())
    }
    async fn tty_resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> R<()> {
        self.call(format!("tty_resize {id} {exec_id:?} {rows}x{cols}"));
        Ok(())
    }
    async fn list_processes(&self, _: &str) -> R<Vec<u32>> {
        Ok(vec![1])
    }
    async fn stats(&self, _: &str) -> R<StatsContainerResponse> {
        Ok(StatsContainerResponse::default())
    }
    async fn update(&self, _: &str, _: Vec<u8>) -> R<()> {
        Ok(())
    }
    async fn pause(&self, id: &str) -> R<()> {
        self.call(format!("pause {id}"));
        Ok(())
    }
    async fn resume(&self, id: &str) -> R<()> {
        self.call(format!("resume {id}"));
        Ok(())
    }
    async fn oom_event(&self) -> R<String> {
        if let Some(id) = lock(&self.ooms).pop_front() {
            return Ok(id);
        }
        Err(rpc(
            "GetOomEvent",
            Code::UNIMPLEMENTED,
            "no OOM notices here",
        ))
    }
    async fn attach(&self, _: &str, _: &str, _: Stream) -> R<UnixStream> {
        // The "guest" end closes at once: the relay ends at EOF.
        let (host, _guest) = UnixStream::pair().expect("socketpair");
        Ok(host)
    }
}

/// A VM that runs until told to die.
pub struct FakeVm {
    exit: watch::Sender<Option<VmExit>>,
}

impl FakeVm {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            exit: watch::channel(None).0,
        })
    }
    pub fn die(&self) {
        use std::os::unix::process::ExitStatusExt;
        self.exit
            .send_replace(Some(VmExit::Status(std::process::ExitStatus::from_raw(
                libc::SIGKILL,
            ))));
    }
}

/// The boxed handle a sandbox owns, sharing the fake's state.
struct FakeVmHandle(Arc<FakeVm>);

#[async_trait]
impl VmProcess for FakeVmHandle {
    fn pid(&self) -> u32 {
        4242
    }
    fn exited(&self) -> Option<VmExit> {
        *self.0.exit.borrow()
    }
    async fn wait(&self) -> VmExit {
        let mut rx = self.0.exit.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            let _ = rx.changed().await;
        }
    }
    async fn stop(&self, _: Duration) -> VmExit {
        self.0.die();
        self.wait().await
    }
    fn release(&self) {}
}

/// Exits and OOMs, as they were reported.
#[derive(Default)]
pub struct RecordedEvents(
    pub Mutex<Vec<(String, String, u32)>>,
    pub Mutex<Vec<String>>,
);

#[async_trait]
impl Events for RecordedEvents {
    async fn process_exited(&self, id: &str, exec_id: &str, _pid: u32, exit: Exit) {
        lock(&self.0).push((id.into(), exec_id.into(), exit.status));
    }
    async fn oom(&self, id: &str) {
        lock(&self.1).push(id.into());
    }
}

struct Rig {
    _root: tempfile::TempDir,
    agent: Arc<FakeAgent>,
    vm: Arc<FakeVm>,
    events: Arc<RecordedEvents>,
    sandbox: Sandbox,
}

fn rig() -> Rig {
    let root = tempfile::tempdir().unwrap();
    let layout = SandboxLayout::under(root.path(), "pod").unwrap();
    std::fs::create_dir_all(layout.share()).unwrap();
    let agent = Arc::new(FakeAgent::default());
    let vm = FakeVm::new();
    *lock(&agent.vm) = Some(vm.clone());
    let events = Arc::new(RecordedEvents::default());
    let sandbox = Sandbox::from_parts(
        layout,
        Box::new(FakeVmHandle(vm.clone())),
        agent.clone(),
        events.clone(),
    );
    Rig {
        _root: root,
        agent,
        vm,
        events,
        sandbox,
    }
}

fn config(id: &str) -> ContainerConfig {
    ContainerConfig {
        id: id.into(),
        spec: serde_json::json!({"process": {"args": ["true"]}}),
        share_mounts: Vec::new(),
        stdio: StdioConfig::default(),
        rootfs_overlay: false,
        bundle: format!("/b/{id}"),
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never: {what}");
}

#[tokio::test]
async fn a_container_lives_and_is_deleted() {
    let r = rig();
    let c = r.sandbox.create_container(config("c1")).await.unwrap();
    assert_eq!(c.state(), State::Created);
    assert!(matches!(
        r.sandbox.create_container(config("c1")).await,
        Err(Error::AlreadyExists(_))
    ));
    c.start(INIT).await.unwrap();
    assert_eq!(c.state(), State::Running);
    assert!(matches!(
        c.start(INIT).await,
        Err(Error::FailedPrecondition(_))
    ));
    let e = r.sandbox.delete_container("c1").await.unwrap_err();
    assert_eq!(e.code(), Code::FAILED_PRECONDITION, "{e}");
    r.agent.exit("c1", INIT, 7);
    assert_eq!(c.wait(INIT).await.unwrap().status, 7);
    eventually("the exit event", || !lock(&r.events.0).is_empty()).await;
    assert_eq!(lock(&r.events.0)[0], ("c1".into(), "".into(), 7));
    assert_eq!(
        r.sandbox
            .delete_container("c1")
            .await
            .unwrap()
            .unwrap()
            .status,
        7
    );
    assert!(matches!(r.sandbox.container("c1"), Err(Error::NotFound(_))));
    assert!(!r.sandbox.layout().container_dir("c1").exists());
    assert!(r.agent.calls().contains(&"remove_container c1".to_string()));
}

/// A guest that ignores SIGKILL (this fake agent never ends a process it
/// is told to kill) cannot keep its pod: after the grace the VM is stopped
/// from the host, the process is reported killed, and it can be deleted.
#[tokio::test(start_paused = true)]
async fn a_guest_that_ignores_sigkill_loses_its_vm() {
    let r = rig();
    let c = r.sandbox.create_container(config("c1")).await.unwrap();
    c.start(INIT).await.unwrap();
    c.kill(INIT, libc::SIGTERM as u32, false).await.unwrap();
    tokio::time::sleep(crate::container::KILL_GRACE * 2).await;
    assert!(r.sandbox.vm_exited().is_none(), "SIGTERM may be ignored");
    c.kill(INIT, libc::SIGKILL as u32, true).await.unwrap();
    tokio::time::sleep(crate::container::KILL_GRACE - Duration::from_secs(1)).await;
    assert!(r.sandbox.vm_exited().is_none(), "not before the grace");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        r.sandbox.vm_exited().is_some(),
        "the VM is stopped from the host"
    );
    assert_eq!(c.wait(INIT).await.unwrap().status, 137);
    eventually("the exit event", || !lock(&r.events.0).is_empty()).await;
    assert_eq!(lock(&r.events.0)[0], ("c1".into(), "".into(), 137));
    assert!(r.sandbox.delete_container("c1").await.is_ok());
}

/// A process that ends after SIGKILL, as a healthy guest's does, leaves the
/// VM alone.
#[tokio::test(start_paused = true)]
async fn a_guest_that_ends_a_killed_process_keeps_its_vm() {
    let r = rig();
    let c = r.sandbox.create_container(config("c1")).await.unwrap();
    c.start(INIT).await.unwrap();
    c.kill(INIT, libc::SIGKILL as u32, false).await.unwrap();
    r.agent.exit("c1", INIT, 137);
    tokio::time::sleep(crate::container::KILL_GRACE * 2).await;
    assert!(r.sandbox.vm_exited().is_none());
}

#[tokio::test]
async fn oom_notices_for_containers_the_pod_does_not_have_are_not_published() {
    let r = rig();
    r.sandbox.create_container(config("c1")).await.unwrap();
    lock(&r.agent.ooms).extend(["other-pods-container".to_string(), "c1".to_string()]);
    // The watcher ends at the fake's UNIMPLEMENTED after the two notices.
    r.sandbox.oom_watcher().await;
    assert_eq!(*lock(&r.events.1), vec!["c1".to_string()]);
}

#[tokio::test]
async fn a_delete_racing_a_start_is_refused_not_a_panic() {
    let r = rig();
    let c = r.sandbox.create_container(config("c1")).await.unwrap();
    let gate = Arc::new(Notify::new());
    *lock(&r.agent.start_gate) = Some(gate.clone());
    let starting = {
        let c = c.clone();
        tokio::spawn(async move { c.start(INIT).await })
    };
    eventually("the start reached the agent", || {
        r.agent.calls().contains(&"start_container c1".to_string())
    })
    .await;
    assert_eq!(c.state(), State::Starting);
    let e = r.sandbox.delete_container("c1").await.unwrap_err();
    assert_eq!(e.code(), Code::FAILED_PRECONDITION, "{e}");
    gate.notify_one();
    starting.await.unwrap().unwrap();
    assert_eq!(c.state(), State::Running);

    // The other order: deleted first, the start finds nothing.
    let d = r.sandbox.create_container(config("c2")).await.unwrap();
    r.sandbox.delete_container("c2").await.unwrap();
    assert_eq!(d.start(INIT).await.unwrap_err().code(), Code::NOT_FOUND);
}

#[tokio::test]
async fn one_containers_slow_start_does_not_block_another() {
    let r = rig();
    let slow = r.sandbox.create_container(config("slow")).await.unwrap();
    let other = r.sandbox.create_container(config("other")).await.unwrap();
    let gate = Arc::new(Notify::new());
    *lock(&r.agent.start_gate) = Some(gate.clone());
    let starting = {
        let slow = slow.clone();
        tokio::spawn(async move { slow.start(INIT).await })
    };
    eventually("the slow start is in the agent", || {
        slow.state() == State::Starting
    })
    .await;
    *lock(&r.agent.start_gate) = None;
    let quick = tokio::time::timeout(Duration::from_secs(2), async {
        other.start(INIT).await?;
        other.kill(INIT, 15, false).await?;
        r.sandbox.container("slow")?.kill(INIT, 9, false).await
    })
    .await
    .expect("the other container's calls did not wait for the slow start");
    quick.unwrap();
    gate.notify_one();
    starting.await.unwrap().unwrap();
}

#[tokio::test]
async fn kill_reaches_the_right_processes() {
    let r = rig();
    let c = r.sandbox.create_container(config("c1")).await.unwrap();
    assert_eq!(
        c.kill(INIT, 0, false).await.unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        c.kill(INIT, 65, false).await.unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
    c.start(INIT).await.unwrap();
    c.kill(INIT, 9, true).await.unwrap();
    c.add_exec("e1", b"{}".to_vec(), StdioConfig::default())
        .unwrap();
    assert_eq!(
        c.add_exec("e1", b"{}".to_vec(), StdioConfig::default())
            .unwrap_err()
            .code(),
        Code::ALREADY_EXISTS
    );
    assert_eq!(
        c.add_exec("-", b"{}".to_vec(), StdioConfig::default())
            .unwrap_err()
            .code(),
        Code::INVALID_ARGUMENT
    );
    // A created exec that is killed ends here, as runc's would.
    c.kill("e1", 15, false).await.unwrap();
    assert_eq!(c.wait("e1").await.unwrap().status, 128 + 15);
    assert_eq!(
        c.kill("e1", 15, false).await.unwrap_err().code(),
        Code::NOT_FOUND
    );
    c.add_exec("e2", b"{}".to_vec(), StdioConfig::default())
        .unwrap();
    c.start("e2").await.unwrap();
    c.kill("e2", 2, true).await.unwrap();
    assert_eq!(
        c.resize("e2", 10, 20).await.unwrap_err().code(),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        c.delete_exec("e2").await.unwrap_err().code(),
        Code::FAILED_PRECONDITION
    );
    r.agent.exit("c1", "e2", 0);
    assert_eq!(c.wait("e2").await.unwrap().status, 0);
    assert!(c.delete_exec("e2").await.unwrap().is_some());
    let calls = r.agent.calls();
    for want in [
        "signal_all c1 9",
        "exec_process c1 e2",
        // `all` means the whole container only for its init process.
        "signal_process c1 \"e2\" 2",
        "remove_process c1 e2",
    ] {
        assert!(calls.contains(&want.to_string()), "{want} in {calls:?}");
    }
    assert!(!calls
        .iter()
        .any(|c| c.contains("e1") && c.starts_with("signal")));
}

#[tokio::test]
async fn pause_and_resume_follow_the_state() {
    let r = rig();
    let c = r.sandbox.create_container(config("c1")).await.unwrap();
    assert_eq!(
        c.pause().await.unwrap_err().code(),
        Code::FAILED_PRECONDITION
    );
    c.start(INIT).await.unwrap();
    c.pause().await.unwrap();
    assert_eq!(c.state(), State::Paused);
    let e = r.sandbox.delete_container("c1").await.unwrap_err();
    assert_eq!(e.code(), Code::FAILED_PRECONDITION);
    c.resume().await.unwrap();
    assert_eq!(c.state(), State::Running);
    assert_eq!(
        c.resume().await.unwrap_err().code(),
        Code::FAILED_PRECONDITION
    );
}

#[tokio::test]
async fn a_vm_that_dies_mid_create_leaves_nothing() {
    let r = rig();
    *lock(&r.agent.vm_dies_on_create) = Some(r.vm.clone());
    let share = r.sandbox.layout().share();
    let e = r.sandbox.create_container(config("c1")).await.unwrap_err();
    assert_eq!(e.code(), Code::UNAVAILABLE, "{e}");
    assert!(matches!(r.sandbox.container("c1"), Err(Error::NotFound(_))));
    assert!(!share.join("c1").exists());
    let e = r.sandbox.create_container(config("c2")).await.unwrap_err();
    assert!(matches!(e, Error::VmGone(_)), "{e}");
    assert_eq!(e.code(), Code::UNAVAILABLE);
    assert!(r.sandbox.vm_exited().is_some());
}

#[tokio::test]
async fn a_vm_end_the_host_did_not_ask_for_is_told_once_by_the_shutdown_that_finds_it() {
    // The first sign of such an end is often every WaitProcess failing; the
    // shutdown that follows comes before the helper's next look.
    let mut r = rig();
    r.sandbox.report_unasked_end();
    r.vm.die();
    r.sandbox.shutdown().await;
    assert!(r.sandbox.end_told());
    assert!(!r.agent.calls().contains(&"shutdown".to_string()));
}

#[tokio::test]
async fn a_vm_end_the_helper_saw_first_is_told_by_it() {
    let mut r = rig();
    r.sandbox.report_unasked_end();
    r.vm.die();
    // It looks once a second.
    for _ in 0..60 {
        if r.sandbox.end_told() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the helper never told the VM's end");
}

#[tokio::test]
async fn a_shutdown_the_host_asked_for_is_no_unasked_end() {
    let mut r = rig();
    r.sandbox.report_unasked_end();
    r.sandbox.shutdown().await;
    assert!(!r.sandbox.end_told());
    assert!(r.agent.calls().contains(&"shutdown".to_string()));
}
