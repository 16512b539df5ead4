//! One container of a sandbox and its processes (the init and its execs):
//! each process is its own object with its own lock and a [`State`], so one
//! container's slow call never waits on another's. No lock is held across
//! an agent call: a call takes what it needs under the lock, lets go, calls,
//! and comes back to record the outcome through a state transition.

pub mod fdmount;
pub mod logfile;
pub mod mounts;
pub mod spec;
pub mod state;
pub mod stdio;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use husk_agent_client::agent::StatsContainerResponse;
use tokio::sync::watch;

pub use state::{Exit, State};
pub use stdio::{Endpoint, StdioConfig};

use crate::agent::{Agent, INIT};
use crate::error::{Error, Result};
use stdio::Relays;

/// How long an exited process's output may take to reach the host side.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// How long a process may take to end after SIGKILL reaches its guest. A
/// guest that lets it outlive this is not to be trusted to end anything:
/// the sandbox stops its VM from the host (which ends every process in it,
/// each then reported killed). Generous for a slow nested guest; a healthy
/// guest reports an exit well within a second.
/// Makes a container's rootfs read-only on the host (see
/// [`Container::seal_rootfs_at_start`]): a few syscalls, no I/O that waits.
pub(crate) type Seal = Box<dyn FnOnce() -> Result<()> + Send>;

pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// The highest signal number Linux has (SIGRTMAX).
const MAX_SIGNAL: u32 = 64;

/// What the runtime tells its front end as processes end and containers
/// run out of memory (the shim publishes containerd events).
#[async_trait]
pub trait Events: Send + Sync {
    async fn process_exited(&self, container_id: &str, exec_id: &str, pid: u32, exit: Exit);
    async fn oom(&self, container_id: &str);
}

/// Events nobody listens to.
pub struct NoEvents;

#[async_trait]
impl Events for NoEvents {
    async fn process_exited(&self, _: &str, _: &str, _: u32, _: Exit) {}
    async fn oom(&self, _: &str) {}
}

/// Locks a mutex whose holder may have panicked: the data is a state enum
/// or a map, each update of which is one assignment, so it is whole.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One process: a container's init or an exec.
pub struct Process {
    exec_id: String,
    stdio: StdioConfig,
    /// An exec's OCI `process` (JSON); `None` for the init process.
    exec_spec: Option<Vec<u8>>,
    pub(crate) state: Mutex<State>,
    exit: watch::Sender<Option<Exit>>,
    relays: Mutex<Relays>,
}

impl Process {
    fn new(exec_id: &str, stdio: StdioConfig, exec_spec: Option<Vec<u8>>, state: State) -> Self {
        Self {
            exec_id: exec_id.to_string(),
            stdio,
            exec_spec,
            state: Mutex::new(state),
            exit: watch::channel(None).0,
            relays: Mutex::new(Relays::default()),
        }
    }

    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }
    pub fn stdio(&self) -> &StdioConfig {
        &self.stdio
    }
    pub fn state(&self) -> State {
        *lock(&self.state)
    }

    /// Records the exit once; true when this call recorded it.
    fn record_exit(&self, exit: Exit) -> bool {
        if !lock(&self.state).exited(exit) {
            return false;
        }
        lock(&self.relays).close_stdin();
        self.exit.send_replace(Some(exit));
        true
    }

    /// Waits until the process has ended.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            // The sender lives as long as `self`: this does not fail.
            if rx.changed().await.is_err() {
                return Exit::now(128 + libc::SIGKILL as u32);
            }
        }
    }
}

/// What a container is made of, as the front end gives it.
pub struct ContainerConfig {
    pub id: String,
    /// The OCI spec for the guest (paths relative to the share).
    pub spec: serde_json::Value,
    /// Mounts to make in the share, from the host's mount namespace,
    /// before the agent creates the container (the shim's rootfs and
    /// volumes; the CLI binds in husk-vmm's namespace at boot instead).
    pub share_mounts: Vec<mounts::ShareMount>,
    pub stdio: StdioConfig,
    /// A writable layer in guest memory over a read-only shared rootfs.
    pub rootfs_overlay: bool,
    /// Where the container came from (containerd's bundle), for the front end.
    pub bundle: String,
}

/// One container.
pub struct Container {
    id: String,
    bundle: String,
    /// Its directory in the share, unmounted and removed on delete.
    dir: PathBuf,
    vmm_pid: u32,
    agent: Arc<dyn Agent>,
    events: Arc<dyn Events>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Told when the guest ignores a SIGKILL: the sandbox then stops the VM.
    distrust: Arc<tokio::sync::Notify>,
    /// What makes this container's rootfs read-only on the host once its
    /// init has started (`root.readonly`): the agent makes the mount points
    /// the spec needs in it while it starts, as runc does before its own
    /// read-only remount.
    seal_rootfs: Mutex<Option<Seal>>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("id", &self.id)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Container {
    pub(crate) fn new(
        cfg: &ContainerConfig,
        dir: PathBuf,
        vmm_pid: u32,
        agent: Arc<dyn Agent>,
        events: Arc<dyn Events>,
        state: State,
        distrust: Arc<tokio::sync::Notify>,
    ) -> Self {
        Self {
            id: cfg.id.clone(),
            bundle: cfg.bundle.clone(),
            dir,
            vmm_pid,
            agent,
            events,
            init: Arc::new(Process::new(INIT, cfg.stdio.clone(), None, state)),
            execs: Mutex::new(HashMap::new()),
            distrust,
            seal_rootfs: Mutex::new(None),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn bundle(&self) -> &str {
        &self.bundle
    }
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
    /// The pid containerd shows for the container's processes: husk-vmm's.
    pub fn pid(&self) -> u32 {
        self.vmm_pid
    }
    /// The container's state: its init process's.
    pub fn state(&self) -> State {
        self.init.state()
    }

    fn what(&self, exec_id: &str) -> String {
        if exec_id == INIT {
            format!("container {}", self.id)
        } else {
            format!("exec {exec_id} in {}", self.id)
        }
    }

    /// The process `exec_id` ([`INIT`] for the container's own).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id == INIT {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(self.what(exec_id)))
    }

    pub(crate) fn init(&self) -> &Arc<Process> {
        &self.init
    }

    /// Attaches the init process's stdio (at create, so nothing is missed).
    pub(crate) async fn attach_init(&self) -> Result<()> {
        let relays = Relays::attach(&*self.agent, &self.id, INIT, &self.init.stdio).await?;
        *lock(&self.init.relays) = relays;
        Ok(())
    }

    /// Makes the rootfs read-only on the host, with `seal`, once init starts.
    pub(crate) fn seal_rootfs_at_start(&self, seal: Seal) {
        *lock(&self.seal_rootfs) = Some(seal);
    }

    /// Starts a process: the container's init, or an exec added before.
    pub async fn start(self: &Arc<Self>, exec_id: &str) -> Result<()> {
        let p = self.process(exec_id)?;
        if exec_id != INIT {
            // Execs run in a running container only.
            let st = self.state();
            if !matches!(st, State::Running) {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is {}: cannot start an exec in it",
                    self.id,
                    st.name()
                )));
            }
        }
        lock(&p.state).begin_start(&self.what(exec_id))?;
        let started = self.start_in_guest(&p).await;
        match started {
            Ok(()) => {
                lock(&p.state).started();
                self.watch_exit(p);
                Ok(())
            }
            Err(e) => {
                lock(&p.state).start_failed();
                Err(e)
            }
        }
    }

    async fn start_in_guest(&self, p: &Process) -> Result<()> {
        match &p.exec_spec {
            None => {
                self.agent
                    .start_container(&self.id)
                    .await
                    .map_err(Error::agent("StartContainer"))?;
                let seal = lock(&self.seal_rootfs).take();
                if let Some(seal) = seal {
                    if let Err(e) = seal() {
                        // Its promise cannot be kept: it does not run.
                        let _ = self.agent.signal_all(&self.id, libc::SIGKILL).await;
                        return Err(e);
                    }
                }
                Ok(())
            }
            Some(spec) => {
                let relays = Relays::attach(&*self.agent, &self.id, &p.exec_id, &p.stdio).await?;
                self.agent
                    .exec_process(&self.id, &p.exec_id, spec.clone(), !p.stdio.stdin.is_none())
                    .await
                    .map_err(Error::agent("ExecProcess"))?;
                *lock(&p.relays) = relays;
                Ok(())
            }
        }
    }

    /// Waits for a started process in the guest, then records its exit
    /// (after its output has reached the host side) and reports it.
    fn watch_exit(self: &Arc<Self>, p: Arc<Process>) {
        let this = self.clone();
        tokio::spawn(async move {
            let status = match this.agent.wait_process(&this.id, &p.exec_id).await {
                Ok(c) => c.max(0) as u32,
                Err(e) => {
                    // The VM or the agent went away: the process is gone with it.
                    tracing::warn!(container = %this.id, exec = %p.exec_id, error = %e, "WaitProcess failed; reporting SIGKILL");
                    128 + libc::SIGKILL as u32
                }
            };
            this.finish(&p, status).await;
        });
    }

    /// Drains the output, records the exit, reports it once.
    async fn finish(&self, p: &Process, status: u32) {
        let outputs = lock(&p.relays).take_outputs();
        stdio::drain(outputs, DRAIN_LIMIT).await;
        let exit = Exit::now(status);
        if p.record_exit(exit) {
            tracing::info!(container = %self.id, exec = %p.exec_id, status, "process exited");
            self.events
                .process_exited(&self.id, &p.exec_id, self.vmm_pid, exit)
                .await;
        }
    }

    /// Adds an exec (started by [`Container::start`]).
    pub fn add_exec(&self, exec_id: &str, process_spec: Vec<u8>, stdio: StdioConfig) -> Result<()> {
        if exec_id == INIT || exec_id == "-" {
            return Err(Error::InvalidArgument(
                "an exec needs an id other than \"\" and \"-\"".into(),
            ));
        }
        crate::layout::check_id("exec", exec_id)?;
        let st = self.state();
        if !matches!(st, State::Running | State::Paused | State::Created) {
            return Err(Error::FailedPrecondition(format!(
                "container {} is {}: cannot exec in it",
                self.id,
                st.name()
            )));
        }
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(Error::AlreadyExists(self.what(exec_id)));
        }
        execs.insert(
            exec_id.to_string(),
            Arc::new(Process::new(
                exec_id,
                stdio,
                Some(process_spec),
                State::Created,
            )),
        );
        Ok(())
    }

    /// Sends `signal` to a process; with `all` (the init only), to every
    /// process of the container, orphans included.
    pub async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        if signal == 0 || signal > MAX_SIGNAL {
            return Err(Error::InvalidArgument(format!("signal {signal}")));
        }
        let p = self.process(exec_id)?;
        match p.state() {
            State::Created => {
                // Nothing runs yet: the "process" ends here, as runc's would.
                self.finish(&p, 128 + signal).await;
                Ok(())
            }
            State::Stopped(_) => Err(Error::NotFound(format!(
                "{}: already finished",
                self.what(exec_id)
            ))),
            State::Creating | State::Deleting(_) => Err(Error::NotFound(self.what(exec_id))),
            State::Starting | State::Running | State::Paused => {
                if signal == libc::SIGKILL as u32 {
                    // Watched before the call: an agent that never answers
                    // must not keep the process alive either.
                    self.watch_kill(p.clone(), exec_id);
                }
                let r = if all && exec_id == INIT {
                    self.agent.signal_all(&self.id, signal as i32).await
                } else {
                    self.agent
                        .signal_process(&self.id, exec_id, signal as i32)
                        .await
                };
                r.map_err(Error::agent("SignalProcess"))
            }
        }
    }

    /// After a SIGKILL: if the process has not ended within [`KILL_GRACE`],
    /// the guest is ignoring kills, and the sandbox is told to stop the VM.
    fn watch_kill(&self, p: Arc<Process>, exec_id: &str) {
        let (distrust, what) = (self.distrust.clone(), self.what(exec_id));
        tokio::spawn(async move {
            if tokio::time::timeout(KILL_GRACE, p.wait()).await.is_err() {
                tracing::error!(
                    "{what} still runs {KILL_GRACE:?} after SIGKILL: the guest ignores kills; stopping its VM"
                );
                distrust.notify_one();
            }
        });
    }

    /// Waits for a process to end.
    pub async fn wait(&self, exec_id: &str) -> Result<Exit> {
        let p = self.process(exec_id)?;
        Ok(p.wait().await)
    }

    pub async fn pause(&self) -> Result<()> {
        let what = self.what(INIT);
        lock(&self.init.state).pause(&what)?;
        if let Err(e) = self.agent.pause(&self.id).await {
            let _ = lock(&self.init.state).resume(&what);
            return Err(Error::agent("PauseContainer")(e));
        }
        Ok(())
    }

    pub async fn resume(&self) -> Result<()> {
        let what = self.what(INIT);
        if !matches!(self.state(), State::Paused) {
            return Err(Error::FailedPrecondition(format!("{what} is not paused")));
        }
        self.agent
            .resume(&self.id)
            .await
            .map_err(Error::agent("ResumeContainer"))?;
        // It may have been killed while frozen: then it stays Stopped.
        let _ = lock(&self.init.state).resume(&what);
        Ok(())
    }

    /// Removes an exec that never started or has ended; its exit, if any.
    pub async fn delete_exec(&self, exec_id: &str) -> Result<Option<Exit>> {
        if exec_id == INIT {
            return Err(Error::InvalidArgument(
                "the init process goes with its container".into(),
            ));
        }
        let p = self.process(exec_id)?;
        let exit = lock(&p.state).begin_delete(&self.what(exec_id))?;
        lock(&self.execs).remove(exec_id);
        lock(&p.relays).close_stdin();
        if exit.is_some() {
            // The agent keeps an ended exec until told: free its id there.
            if let Err(e) = self.agent.remove_process(&self.id, exec_id).await {
                tracing::info!(container = %self.id, exec = exec_id, error = %e, "RemoveProcess");
            }
        }
        Ok(exit)
    }

    pub async fn close_stdin(&self, exec_id: &str) -> Result<()> {
        let p = self.process(exec_id)?;
        lock(&p.relays).close_stdin();
        if let Err(e) = self.agent.close_stdin(&self.id, exec_id).await {
            tracing::debug!(error = %e, "CloseStdin");
        }
        Ok(())
    }

    pub async fn resize(&self, exec_id: &str, rows: u32, columns: u32) -> Result<()> {
        let p = self.process(exec_id)?;
        if !p.stdio.terminal {
            return Err(Error::FailedPrecondition(format!(
                "{} has no terminal",
                self.what(exec_id)
            )));
        }
        self.agent
            .tty_resize(&self.id, exec_id, rows, columns)
            .await
            .map_err(Error::agent("TtyWinResize"))
    }

    pub async fn pids(&self) -> Result<Vec<u32>> {
        self.agent
            .list_processes(&self.id)
            .await
            .map_err(Error::agent("ListProcesses"))
    }

    pub async fn stats(&self) -> Result<StatsContainerResponse> {
        self.agent
            .stats(&self.id)
            .await
            .map_err(Error::agent("StatsContainer"))
    }

    /// `resources` is `linux.resources` as JSON.
    pub async fn update(&self, resources: Vec<u8>) -> Result<()> {
        self.agent
            .update(&self.id, resources)
            .await
            .map_err(Error::agent("UpdateContainer"))
    }

    /// Closes every stdin relay (the container is going).
    pub(crate) fn close_all_stdin(&self) {
        lock(&self.init.relays).close_stdin();
        for p in lock(&self.execs).values() {
            lock(&p.relays).close_stdin();
        }
    }
}
