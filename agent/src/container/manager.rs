//! The containers of the sandbox and their processes: create (check the
//! spec, make the cgroup and the stdio ends), start and exec (clone, then
//! relay stdio to the host's streams), wait (the exit status, only once the
//! output is delivered), signal, stdin, terminal size, pause and resume,
//! stats, limits, OOM events, remove.
//!
//! The map's lock guards short, non-blocking work only; the slow part of a
//! start or an exec runs on a blocking thread with none held (see
//! [`Manager::start`]).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::cgroup::{Cgroup, CgroupError, Stats};
use super::process::{self, ContainerError, Stdio};
use super::pty;
use super::seccomp::{self, Program};
use super::spec::{self, SpecError, ValidProcess, ValidSpec};
use super::stdio::Hub;
use crate::reaper::{ExitStatus, Reaper};

use husk_agent_api::stdio::{Handshake, Stream};
use husk_agent_api::INIT_PROCESS;

/// Where containers' overlay layers live: the agent's root, a tmpfs.
const OVERLAY_DIR: &str = "/run/husk/overlay";
/// How long output waits for the host to attach before it is discarded.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("container {0} already exists")]
    Exists(String),
    #[error("no container {0}")]
    NotFound(String),
    #[error("container {id} has no process {exec_id}")]
    NoProcess { id: String, exec_id: String },
    #[error("process {exec_id} already exists in container {id}")]
    ProcessExists { id: String, exec_id: String },
    #[error("container {id} is {state}")]
    State { id: String, state: &'static str },
    #[error("process {exec_id} of container {id} is running")]
    ProcessRunning { id: String, exec_id: String },
    #[error("{0} is not a signal")]
    BadSignal(i32),
    #[error("process {exec_id:?} of container {id} has no terminal (or has not started)")]
    NoTerminal { id: String, exec_id: String },
    #[error("no sandbox share is mounted: CreateSandbox with a shared fs first")]
    NoShare,
    #[error("invalid {what} {id:?}")]
    BadId { what: &'static str, id: String },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Start(#[from] ContainerError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{0}")]
    Io(String),
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> ManagerError + '_ {
    move |e| ManagerError::Io(format!("{what}: {e}"))
}

/// A process's stdio, made before it starts: what the child gets (taken by
/// the set-up at create for a container's own process), and the agent's
/// ends, which the relays take once it runs.
struct Ends {
    child: Option<Stdio>,
    host: HostEnds,
}

/// The agent's ends of a process's stdio.
struct HostEnds {
    /// Its output: a pipe's read end, or (a terminal) the socket its pty
    /// master comes back on.
    out: OwnedFd,
    err: Option<OwnedFd>,
    /// The write end of its stdin pipe (None: /dev/null, or a terminal).
    stdin: Option<OwnedFd>,
    tty: bool,
    want_stdin: bool,
}

fn make_ends(tty: bool, want_stdin: bool) -> Result<Ends, ManagerError> {
    if tty {
        // The pty is made in the container (see Stdio::console); `out` is
        // our end of the socket its master comes back on.
        let (ours, theirs) = process::console_pair().map_err(io_err("socketpair"))?;
        let null = || process::null_stdin().map_err(io_err("/dev/null"));
        return Ok(Ends {
            child: Some(Stdio {
                stdin: null()?,
                stdout: null()?,
                stderr: null()?,
                console: Some(theirs),
            }),
            host: HostEnds {
                out: ours,
                err: None,
                stdin: None,
                tty,
                want_stdin,
            },
        });
    }
    let (out_r, out_w) = process::pipe().map_err(io_err("pipe"))?;
    let (err_r, err_w) = process::pipe().map_err(io_err("pipe"))?;
    let (stdin, stdin_w) = if want_stdin {
        let (r, w) = process::pipe().map_err(io_err("pipe"))?;
        (r, Some(w))
    } else {
        (process::null_stdin().map_err(io_err("/dev/null"))?, None)
    };
    Ok(Ends {
        child: Some(Stdio {
            stdin,
            stdout: out_w,
            stderr: err_w,
            console: None,
        }),
        host: HostEnds {
            out: out_r,
            err: Some(err_r),
            stdin: stdin_w,
            tty,
            want_stdin,
        },
    })
}

/// Where a process is in its life, as far as starting it goes.
#[derive(Debug, Clone, Copy)]
enum Launch {
    NotYet,
    /// Being cloned, on a blocking thread, with no lock held: until the
    /// child has exec'd (or failed) other calls see it as "starting".
    Starting,
    Started(Pid),
    /// Its start failed: it never ran, and it reads as stopped (exit 127).
    Failed,
}

/// One process: a container's own or an exec.
struct Proc {
    spec: ValidProcess,
    launch: Launch,
    /// Until started.
    ends: Option<Ends>,
    exit: watch::Receiver<Option<ExitStatus>>,
    exit_tx: Option<watch::Sender<Option<ExitStatus>>>,
    /// Output relays: the exit is reported after they finish.
    relays: Vec<JoinHandle<()>>,
    stdin_relay: Option<JoinHandle<()>>,
    pty: Option<pty::Master>,
}

impl Proc {
    fn new(spec: ValidProcess, want_stdin: bool) -> Result<Self, ManagerError> {
        let ends = make_ends(spec.terminal, want_stdin)?;
        let (exit_tx, exit) = watch::channel(None);
        Ok(Self {
            spec,
            launch: Launch::NotYet,
            ends: Some(ends),
            exit,
            exit_tx: Some(exit_tx),
            relays: Vec::new(),
            stdin_relay: None,
            pty: None,
        })
    }

    /// The pid, while it is one of a process that ran.
    fn pid(&self) -> Option<Pid> {
        match self.launch {
            Launch::Started(pid) => Some(pid),
            Launch::NotYet | Launch::Starting | Launch::Failed => None,
        }
    }

    fn running(&self) -> bool {
        self.pid().is_some() && self.exit.borrow().is_none()
    }

    fn state(&self) -> &'static str {
        match (self.launch, *self.exit.borrow()) {
            (Launch::NotYet, _) => "created",
            (Launch::Starting, _) => "starting",
            (Launch::Started(_), None) => "running",
            (Launch::Started(_), Some(_)) | (Launch::Failed, _) => "stopped",
        }
    }

    fn starting(&self) -> bool {
        matches!(self.launch, Launch::Starting)
    }

    fn abort_relays(&mut self) {
        for r in self.relays.drain(..) {
            r.abort();
        }
        if let Some(r) = self.stdin_relay.take() {
            r.abort();
        }
    }
}

/// A container's own process as CreateContainer's set-up left it: held
/// before its exec, with its terminal's master if it has one.
struct Prepared {
    held: process::Held,
    exited: oneshot::Receiver<ExitStatus>,
    master: Result<Option<OwnedFd>, ManagerError>,
}

struct Container {
    /// The compiled profile, for the container's processes and its execs.
    seccomp: Vec<Program>,
    /// `<OVERLAY_DIR>/<id>` when the rootfs has a writable layer.
    overlay: Option<PathBuf>,
    cgroup: Cgroup,
    init: Proc,
    /// The init's set-up, begun at create, until StartContainer (or
    /// RemoveContainer) takes it.
    prepared: Option<JoinHandle<Result<Prepared, ManagerError>>>,
    execs: HashMap<String, Proc>,
    oom_watch: Option<JoinHandle<()>>,
}

impl Container {
    fn proc_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Proc, ManagerError> {
        if exec_id == INIT_PROCESS {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| ManagerError::NoProcess {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            })
    }
}

type StartHook = Arc<dyn Fn(&str, &str) + Send + Sync>;
type AfterStartHook = Arc<dyn Fn(&str, &str) -> Result<(), String> + Send + Sync>;

/// Seams for tests (in-process, agent/tests): run on the start's blocking
/// thread with (container id, exec id). None in the agent.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Before the clone (a container's own process: as its set-up begins
    /// at create): a test makes a start slow here.
    pub before_start: Option<StartHook>,
    /// Once the child exists: an error here is a failure past the start.
    pub after_start: Option<AfterStartHook>,
}

#[derive(Clone)]
pub struct Manager {
    /// Held only for short, non-blocking work: never across a clone, an
    /// exec wait or an await.
    containers: Arc<Mutex<HashMap<String, Container>>>,
    hooks: Hooks,
    share: Arc<Mutex<Option<PathBuf>>>,
    reaper: Reaper,
    hub: Hub,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
}

fn check_id(what: &'static str, id: &str) -> Result<(), ManagerError> {
    if id.is_empty()
        || id.len() > 128
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        // "-" names the init process on the stdio handshake line.
        || id == "-"
    {
        return Err(ManagerError::BadId {
            what,
            id: id.to_string(),
        });
    }
    Ok(())
}

impl Manager {
    pub fn new(reaper: Reaper, hub: Hub) -> Self {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        Self {
            containers: Arc::default(),
            hooks: Hooks::default(),
            share: Arc::default(),
            reaper,
            hub,
            oom_tx,
            oom_rx: Arc::new(tokio::sync::Mutex::new(oom_rx)),
        }
    }

    /// The same manager with test seams (see [`Hooks`]).
    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Where the sandbox share is mounted (set by CreateSandbox).
    pub fn set_share(&self, p: Option<PathBuf>) {
        *self.share.lock().unwrap_or_else(PoisonError::into_inner) = p;
    }

    fn share(&self) -> Option<PathBuf> {
        self.share
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> Result<T, ManagerError>,
    ) -> Result<T, ManagerError> {
        let mut all = self.lock();
        let c = all
            .get_mut(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        f(c)
    }

    pub fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        want_stdin: bool,
        overlay: bool,
    ) -> Result<(), ManagerError> {
        check_id("container id", id)?;
        let share = self.share().ok_or(ManagerError::NoShare)?;
        let spec = spec::validate(spec_json)?;
        let mut seccomp = match &spec.seccomp {
            Some(profile) => seccomp::compile(profile)?,
            None => Vec::new(),
        };
        if !spec.vsock_allowed {
            seccomp.extend(seccomp::vsock_guard()?);
        }
        let mut all = self.lock();
        if all.contains_key(id) {
            return Err(ManagerError::Exists(id.to_string()));
        }
        let mut init = Proc::new(spec.process.clone(), want_stdin)?;
        let no_stdio = || ManagerError::Io("no stdio".into());
        let ends = init.ends.as_mut().ok_or_else(no_stdio)?;
        let child = ends.child.take().ok_or_else(no_stdio)?;
        // A terminal's master comes back on our end of the console socket.
        let console = match ends.host.tty {
            true => Some(ends.host.out.try_clone().map_err(io_err("dup"))?),
            false => None,
        };
        // Last: nothing below can fail and leave the cgroup behind.
        let cgroup = Cgroup::create(id, spec.resources.as_ref())?;
        let oom_watch = Some(watch_oom(
            id.to_string(),
            cgroup.clone(),
            self.oom_tx.clone(),
        ));
        let overlay = overlay.then(|| Path::new(OVERLAY_DIR).join(id));
        let prepared = tokio::task::spawn_blocking({
            let (seccomp, overlay) = (seccomp.clone(), overlay.clone());
            let (reaper, hooks, procs) =
                (self.reaper.clone(), self.hooks.clone(), cgroup.procs_file());
            let id = id.to_string();
            move || {
                prepare_init(
                    &reaper, &hooks, &id, &spec, &share, overlay, &procs, &seccomp, child, console,
                )
            }
        });
        all.insert(
            id.to_string(),
            Container {
                seccomp,
                overlay,
                cgroup,
                init,
                prepared: Some(prepared),
                execs: HashMap::new(),
                oom_watch,
            },
        );
        Ok(())
    }

    /// Starts the container's process: lets the process CreateContainer set
    /// up go on to its exec, waiting first for that set-up where it is still
    /// running, on a blocking thread with no lock held, so a start that
    /// hangs (a slow exec over virtio-fs, a hung mount) holds up no other
    /// call.
    pub async fn start(&self, id: &str) -> Result<(), ManagerError> {
        let (prepared, host) = self.with(id, |c| {
            let (Some(prepared), Some(Ends { host, .. })) = (c.prepared.take(), c.init.ends.take())
            else {
                return Err(ManagerError::State {
                    id: id.to_string(),
                    state: c.init.state(),
                });
            };
            c.init.launch = Launch::Starting;
            Ok((prepared, host))
        })?;
        let (hooks, cid) = (self.hooks.clone(), id.to_string());
        let started = match prepared.await {
            Err(e) => Err(ManagerError::Io(format!("the set-up thread: {e}"))),
            Ok(Err(e)) => Err(e),
            Ok(Ok(p)) => tokio::task::spawn_blocking(move || {
                let Prepared {
                    held,
                    exited,
                    master,
                } = p;
                let pid = held.release()?;
                Ok(finish_start(
                    (pid, exited),
                    master,
                    &hooks,
                    &cid,
                    INIT_PROCESS,
                ))
            })
            .await
            .unwrap_or_else(|e| Err(ManagerError::Io(format!("the start thread: {e}")))),
        };
        self.with(id, |c| {
            launch(&self.hub, id, INIT_PROCESS, &mut c.init, started, host)
        })
    }

    /// Starts `exec_id` in the running container `id` (the slow part on a
    /// blocking thread with no lock held, as [`Manager::start`]).
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        want_stdin: bool,
    ) -> Result<(), ManagerError> {
        check_id("exec id", exec_id)?;
        let p = spec::validate_exec(process_json)?;
        let (init_pid, spec, seccomp, procs, child, host) = self.with(id, |c| {
            let (true, Some(init_pid)) = (c.init.running(), c.init.pid()) else {
                return Err(ManagerError::State {
                    id: id.to_string(),
                    state: c.init.state(),
                });
            };
            if c.execs.contains_key(exec_id) {
                return Err(ManagerError::ProcessExists {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
            let mut proc_ = Proc::new(p, want_stdin)?;
            let Some(Ends {
                child: Some(child),
                host,
            }) = proc_.ends.take()
            else {
                return Err(ManagerError::Io("no stdio".into()));
            };
            proc_.launch = Launch::Starting;
            let spec = proc_.spec.clone();
            // Inserted now: the id is taken while it starts.
            c.execs.insert(exec_id.to_string(), proc_);
            Ok((
                init_pid,
                spec,
                c.seccomp.clone(),
                c.cgroup.procs_file(),
                child,
                host,
            ))
        })?;
        let (reaper, hooks) = (self.reaper.clone(), self.hooks.clone());
        let (cid, eid) = (id.to_string(), exec_id.to_string());
        let tty = host.tty;
        let console = host.out.try_clone().map_err(io_err("dup"));
        let started = tokio::task::spawn_blocking(move || {
            if let Some(h) = &hooks.before_start {
                h(&cid, &eid);
            }
            let started =
                reaper.register_with(|| process::exec(&spec, init_pid, child, &procs, &seccomp))?;
            // The child sent its terminal's master before its exec.
            let master = match tty {
                false => Ok(None),
                true => console.and_then(|c| {
                    process::receive_console(&c)
                        .map(Some)
                        .map_err(io_err("the terminal"))
                }),
            };
            Ok(finish_start(started, master, &hooks, &cid, &eid))
        })
        .await
        .unwrap_or_else(|e| Err(ManagerError::Io(format!("the exec thread: {e}"))));
        self.with(id, |c| {
            let p = c.proc_mut(id, exec_id)?;
            let r = launch(&self.hub, id, exec_id, p, started, host);
            // An exec that never ran leaves its id free, as before; one that
            // ran and was killed stays until RemoveProcess (its exit waitable).
            if r.is_err() && matches!(p.launch, Launch::Failed) {
                c.execs.remove(exec_id);
            }
            r
        })
    }

    /// The exit status, once the process has ended and its output is out.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<i32, ManagerError> {
        let (mut exit, relays) = loop {
            let got = self.with(id, |c| {
                let p = c.proc_mut(id, exec_id)?;
                match p.launch {
                    Launch::NotYet => Err(ManagerError::State {
                        id: id.to_string(),
                        state: "created",
                    }),
                    // Its relays are not there yet: ask again shortly.
                    Launch::Starting => Ok(None),
                    Launch::Started(_) | Launch::Failed => {
                        Ok(Some((p.exit.clone(), std::mem::take(&mut p.relays))))
                    }
                }
            })?;
            match got {
                Some(v) => break v,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let status = loop {
            if let Some(s) = *exit.borrow_and_update() {
                break s;
            }
            if exit.changed().await.is_err() {
                break exit.borrow().unwrap_or(ExitStatus(255));
            }
        };
        // The exit is reported only after the output reached the host.
        for r in relays {
            let _ = r.await;
        }
        Ok(status.0)
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ManagerError> {
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| ManagerError::BadSignal(signal))?;
        self.with(id, |c| {
            if all {
                if sig == nix::sys::signal::Signal::SIGKILL {
                    c.cgroup.kill_all();
                } else {
                    for pid in c.cgroup.pids() {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
                    }
                }
                return Ok(());
            }
            let p = c.proc_mut(id, exec_id)?;
            let (true, Some(pid)) = (p.running(), p.pid()) else {
                return Err(ManagerError::State {
                    id: id.to_string(),
                    state: p.state(),
                });
            };
            nix::sys::signal::kill(pid, sig)
                .map_err(|e| ManagerError::Io(format!("signalling {pid}: {e}")))
        })
    }

    /// Closes a process's stdin now, whatever its stream still carries.
    /// Forgets an exec'd process that has ended; its id is free again.
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<(), ManagerError> {
        if exec_id == INIT_PROCESS {
            return Err(ManagerError::BadId {
                what: "exec id (the container's own process goes with RemoveContainer)",
                id: exec_id.to_string(),
            });
        }
        self.with(id, |c| {
            let p = c.proc_mut(id, exec_id)?;
            if p.running() || p.starting() {
                return Err(ManagerError::ProcessRunning {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
            if let Some(mut p) = c.execs.remove(exec_id) {
                p.abort_relays();
            }
            Ok(())
        })?;
        self.hub.forget_process(id, exec_id);
        Ok(())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ManagerError> {
        self.with(id, |c| {
            let p = c.proc_mut(id, exec_id)?;
            if let Some(r) = p.stdin_relay.take() {
                r.abort();
            }
            if let Some(e) = p.ends.as_mut() {
                e.host.stdin = None;
            }
            Ok(())
        })
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), ManagerError> {
        self.with(id, |c| {
            let p = c.proc_mut(id, exec_id)?;
            let Some(m) = &p.pty else {
                return Err(ManagerError::NoTerminal {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            };
            let fd = m.fd();
            pty::resize(fd, rows, cols).map_err(io_err("TIOCSWINSZ"))
        })
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>, ManagerError> {
        self.with(id, |c| Ok(c.cgroup.pids()))
    }

    pub fn stats(&self, id: &str) -> Result<Stats, ManagerError> {
        self.with(id, |c| Ok(c.cgroup.stats()))
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ManagerError> {
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(resources_json).map_err(|e| SpecError {
                field: "linux.resources".into(),
                problem: e.to_string(),
            })?;
        self.with(id, |c| Ok(c.cgroup.update(&r)?))
    }

    pub async fn freeze(&self, id: &str, frozen: bool) -> Result<(), ManagerError> {
        let cg = self.with(id, |c| {
            if !c.init.running() {
                return Err(ManagerError::State {
                    id: id.to_string(),
                    state: c.init.state(),
                });
            }
            Ok(c.cgroup.clone())
        })?;
        tokio::task::spawn_blocking(move || cg.freeze(frozen))
            .await
            .map_err(|e| ManagerError::Io(e.to_string()))??;
        Ok(())
    }

    /// Kills the processes of containers created and never started (at
    /// the guest's shutdown): each waits in its set-up as its pid
    /// namespace's init, which SIGTERM from the agent does not end, and
    /// holds the agent's signal handlers, so the shutdown's SIGTERM would
    /// cost its whole grace period.
    pub fn kill_unstarted(&self) {
        for c in self.lock().values() {
            if c.prepared.is_some() {
                c.cgroup.kill_all();
            }
        }
    }

    /// The next container an OOM kill happened in.
    pub async fn next_oom(&self) -> Option<String> {
        self.oom_rx.lock().await.recv().await
    }

    /// Forgets a stopped (or never started) container: leftover processes
    /// (an exec's orphans, a held process that was never started) are
    /// killed with the cgroup, relays and streams are dropped.
    pub async fn remove(&self, id: &str) -> Result<(), ManagerError> {
        let mut c = {
            let mut all = self.lock();
            let c = all
                .get(id)
                .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
            if c.init.running() {
                return Err(ManagerError::State {
                    id: id.to_string(),
                    state: "running",
                });
            }
            // A start in flight comes back to its entry: let it finish.
            if c.init.starting() || c.execs.values().any(Proc::starting) {
                return Err(ManagerError::State {
                    id: id.to_string(),
                    state: "starting a process",
                });
            }
            all.remove(id)
                .ok_or_else(|| ManagerError::NotFound(id.to_string()))?
        };
        if let Some(w) = c.oom_watch.take() {
            w.abort();
        }
        if let Some(prepared) = c.prepared.take() {
            // Created, never started: a process stuck in its set-up dies
            // with the cgroup; one that got to its hold is killed as its
            // Held drops. Waited for, so that its overlay is not mounted
            // after it is taken down.
            c.cgroup.kill_all();
            drop(prepared.await);
        }
        c.init.abort_relays();
        for p in c.execs.values_mut() {
            p.abort_relays();
        }
        c.cgroup.destroy();
        if let Some(dir) = &c.overlay {
            drop_overlay(dir);
        }
        self.hub.forget(id);
        Ok(())
    }
}

/// Mounts `<dir>/rootfs`: overlayfs with `lower` (in the share) read-only
/// below and `<dir>/upper` (the agent's tmpfs) taking the writes.
fn mount_overlay(dir: &Path, lower: &Path) -> Result<PathBuf, ManagerError> {
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(io_err("overlay directory"))?;
    }
    // Commas and colons would split the option string: refuse them.
    let paths = [lower, &upper, &work];
    if paths.iter().any(|p| {
        let s = p.to_string_lossy();
        s.contains(',') || s.contains(':')
    }) {
        return Err(ManagerError::Io(format!(
            "overlay paths may not hold ',' or ':' ({})",
            lower.display()
        )));
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| ManagerError::Io(format!("mounting the rootfs overlay: {e}")))?;
    Ok(merged)
}

/// Unmounts and deletes a container's overlay layer.
fn drop_overlay(dir: &Path) {
    let merged = dir.join("rootfs");
    if let Err(e) = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH) {
        if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
            tracing::warn!("unmounting {}: {e}", merged.display());
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// A child that exists: its pid, its exit, and (a terminal) its pty master
/// or why that could not be had. Made on the blocking thread.
struct Child {
    pid: Pid,
    exited: oneshot::Receiver<ExitStatus>,
    /// What went wrong after the child existed, if anything: it is killed.
    after: Result<Option<OwnedFd>, ManagerError>,
}

/// The blocking tail of a start, once the child has exec'd, with its
/// terminal's master (or why that could not be had).
fn finish_start(
    (pid, exited): (Pid, oneshot::Receiver<ExitStatus>),
    master: Result<Option<OwnedFd>, ManagerError>,
    hooks: &Hooks,
    id: &str,
    exec_id: &str,
) -> Child {
    let after = (|| {
        if let Some(h) = &hooks.after_start {
            h(id, exec_id).map_err(ManagerError::Io)?;
        }
        master
    })();
    Child { pid, exited, after }
}

/// CreateContainer's set-up of a container's own process, on a blocking
/// thread: its overlay, then the process as far as its hold (see
/// [`process::prepare`]), with its terminal's master.
#[allow(clippy::too_many_arguments)]
fn prepare_init(
    reaper: &Reaper,
    hooks: &Hooks,
    id: &str,
    spec: &ValidSpec,
    share: &Path,
    overlay: Option<PathBuf>,
    procs: &Path,
    seccomp: &[Program],
    child: Stdio,
    console: Option<OwnedFd>,
) -> Result<Prepared, ManagerError> {
    if let Some(h) = &hooks.before_start {
        h(id, INIT_PROCESS);
    }
    let t0 = std::time::Instant::now();
    let lower = share.join(&spec.root);
    let root = match &overlay {
        None => lower,
        Some(dir) => mount_overlay(dir, &lower)?,
    };
    let mounted = t0.elapsed();
    let (pid, (exited, held)) = reaper.register_value_with(|| {
        let held = process::prepare(spec, &root, share, child, Some(procs), seccomp)?;
        Ok::<_, ManagerError>((held.pid(), held))
    })?;
    let master = match &console {
        None => Ok(None),
        // Sent before the hold.
        Some(c) => process::receive_console(c)
            .map(Some)
            .map_err(io_err("the terminal")),
    };
    tracing::debug!(
        container = id,
        %pid,
        overlay_us = mounted.as_micros() as u64,
        prepare_us = t0.elapsed().saturating_sub(mounted).as_micros() as u64,
        "init process set up"
    );
    Ok(Prepared {
        held,
        exited,
        master,
    })
}

/// After a clone (under the container's lock, nothing blocking): record the
/// pid, watch for the exit, start the relays. On any failure once the child
/// exists it is killed and its exit recorded as usual, so WaitProcess
/// answers and RemoveContainer can go ahead.
fn launch(
    hub: &Hub,
    id: &str,
    exec_id: &str,
    p: &mut Proc,
    started: Result<Child, ManagerError>,
    ends: HostEnds,
) -> Result<(), ManagerError> {
    let child = match started {
        Ok(v) => v,
        Err(e) => {
            // Never started: it can be removed.
            p.launch = Launch::Failed;
            if let Some(tx) = p.exit_tx.take() {
                let _ = tx.send(Some(ExitStatus(127)));
            }
            return Err(e);
        }
    };
    let pid = child.pid;
    p.launch = Launch::Started(pid);
    // First, before anything that can fail: the exit is always recorded.
    let exit_tx = p.exit_tx.take();
    let exited = child.exited;
    tokio::spawn(async move {
        let status = exited.await.unwrap_or(ExitStatus(255));
        if let Some(tx) = exit_tx {
            let _ = tx.send(Some(status));
        }
    });
    let relayed = child
        .after
        .and_then(|master| start_relays(hub, id, exec_id, p, master, ends));
    if let Err(e) = relayed {
        tracing::warn!(container = id, exec = exec_id, %pid, "killing a process whose start failed: {e}");
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        p.abort_relays();
        p.pty = None;
        return Err(e);
    }
    Ok(())
}

fn start_relays(
    hub: &Hub,
    id: &str,
    exec_id: &str,
    p: &mut Proc,
    master: Option<OwnedFd>,
    ends: HostEnds,
) -> Result<(), ManagerError> {
    let key = |s: Stream| Handshake::new(id, exec_id, s);
    if let Some(master) = master {
        let master = pty::Master::new(master).map_err(io_err("pty"))?;
        p.relays.push(relay_out(
            hub.expect(key(Stream::Stdout)),
            master.clone(),
            "stdout",
        ));
        if ends.want_stdin {
            p.stdin_relay = Some(relay_in(
                hub.expect(key(Stream::Stdin)),
                master.clone(),
                false,
            ));
        }
        p.pty = Some(master);
        return Ok(());
    }
    let rx =
        |fd: OwnedFd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).map_err(io_err("pipe"));
    p.relays.push(relay_out(
        hub.expect(key(Stream::Stdout)),
        rx(ends.out)?,
        "stdout",
    ));
    if let Some(err) = ends.err {
        p.relays.push(relay_out(
            hub.expect(key(Stream::Stderr)),
            rx(err)?,
            "stderr",
        ));
    }
    if let Some(w) = ends.stdin {
        let tx = tokio::net::unix::pipe::Sender::from_owned_fd(w).map_err(io_err("pipe"))?;
        p.stdin_relay = Some(relay_in(hub.expect(key(Stream::Stdin)), tx, true));
    }
    Ok(())
}

type Attached = tokio::sync::oneshot::Receiver<tokio_vsock::VsockStream>;

/// Copies a process's output to the host's stream for it, then closes the
/// stream. Without a stream within ATTACH_TIMEOUT the output is drained and
/// dropped, so the process never blocks on a full pipe.
fn relay_out<R>(attached: Attached, mut src: R, stream: &'static str) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        match tokio::time::timeout(ATTACH_TIMEOUT, attached).await {
            Ok(Ok(mut s)) => {
                if let Err(e) = tokio::io::copy(&mut src, &mut s).await {
                    tracing::debug!("{stream} relay ended: {e}");
                }
                let _ = AsyncWriteExt::shutdown(&mut s).await;
            }
            _ => {
                tracing::warn!("nobody attached {stream} within {ATTACH_TIMEOUT:?}; discarding it");
                let _ = tokio::io::copy(&mut src, &mut tokio::io::sink()).await;
            }
        }
    })
}

/// Copies the host's stdin stream into the process. At the stream's end a
/// pipe is closed (the process sees EOF); a terminal stays open, as it does
/// when a user's terminal goes quiet.
fn relay_in<W>(attached: Attached, mut dst: W, close_at_eof: bool) -> JoinHandle<()>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        match tokio::time::timeout(ATTACH_TIMEOUT, attached).await {
            Ok(Ok(mut s)) => {
                if let Err(e) = tokio::io::copy(&mut s, &mut dst).await {
                    tracing::debug!("stdin relay ended: {e}");
                }
            }
            _ => tracing::warn!("nobody attached stdin within {ATTACH_TIMEOUT:?}; closing it"),
        }
        if close_at_eof {
            drop(dst);
        } else {
            // Keep the terminal's master open as long as the output relay.
            std::future::pending::<()>().await;
        }
    })
}

/// Reports each new OOM kill in the container's cgroup. memory.events
/// raises a "modified" event on every change (cgroup v2), so inotify wakes
/// this only when something happened.
fn watch_oom(id: String, cgroup: Cgroup, tx: mpsc::UnboundedSender<String>) -> JoinHandle<()> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    tokio::spawn(async move {
        let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(i) => i,
            Err(e) => return tracing::warn!("OOM events for {id}: inotify: {e}"),
        };
        if let Err(e) = inotify.add_watch(&cgroup.memory_events_file(), AddWatchFlags::IN_MODIFY) {
            return tracing::warn!("OOM events for {id}: {e}");
        }
        let fd = match std::os::fd::AsFd::as_fd(&inotify).try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => return tracing::warn!("OOM events for {id}: {e}"),
        };
        drop(inotify);
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open, the
        // same descriptor, for as long as the AsyncFd lives.
        let fd = match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
            Ok(fd) => fd,
            Err(e) => return tracing::warn!("OOM events for {id}: {e}"),
        };
        let mut seen = cgroup.oom_kills();
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            // Drain the events; the counter says what happened.
            let mut buf = [0u8; 4096];
            while matches!(nix::unistd::read(guard.get_inner().as_raw_fd(), &mut buf), Ok(n) if n > 0)
            {
            }
            guard.clear_ready();
            let now = cgroup.oom_kills();
            if now > seen {
                tracing::warn!(container = %id, kills = now - seen, "OOM kill");
                seen = now;
                if tx.send(id.clone()).is_err() {
                    return;
                }
            }
        }
    })
}
