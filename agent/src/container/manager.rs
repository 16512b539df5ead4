//! The containers of the sandbox: create (check the spec, make the stdio
//! pipes), start (clone and exec, relay stdout and stderr to the host's
//! streams), wait (the exit status, only once the output is delivered),
//! signal, remove.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::process::{self, ContainerError, Stdio};
use super::spec::{self, SpecError, ValidSpec};
use super::stdio::Hub;
use crate::reaper::{ExitStatus, Reaper};

/// The exec id of a container's own (init) process.
pub const INIT: &str = "-";
/// How long output waits for the host to attach before it is discarded.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("container {0} already exists")]
    Exists(String),
    #[error("no container {0}")]
    NotFound(String),
    #[error("container {id} is {state}")]
    State { id: String, state: &'static str },
    #[error("no sandbox share is mounted: CreateSandbox with a shared fs first")]
    NoShare,
    #[error("invalid container id {0:?}")]
    BadId(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Start(#[from] ContainerError),
    #[error("{0}")]
    Io(String),
}

enum State {
    Created {
        out_r: OwnedFd,
        err_r: OwnedFd,
        out_w: OwnedFd,
        err_w: OwnedFd,
    },
    Running {
        pid: Pid,
    },
    Stopped,
    /// Between states, while a call works on it.
    Busy,
}

struct Container {
    spec: ValidSpec,
    state: State,
    exit: watch::Receiver<Option<ExitStatus>>,
    exit_tx: Option<watch::Sender<Option<ExitStatus>>>,
    relays: Vec<JoinHandle<()>>,
}

#[derive(Clone)]
pub struct Manager {
    containers: Arc<Mutex<HashMap<String, Container>>>,
    share: Arc<Mutex<Option<PathBuf>>>,
    reaper: Reaper,
    hub: Hub,
}

fn state_name(s: &State) -> &'static str {
    match s {
        State::Created { .. } => "created",
        State::Running { .. } => "running",
        State::Stopped => "stopped",
        State::Busy => "busy",
    }
}

impl Manager {
    pub fn new(reaper: Reaper, hub: Hub) -> Self {
        Self {
            containers: Arc::default(),
            share: Arc::default(),
            reaper,
            hub,
        }
    }

    /// Where the sandbox share is mounted (set by CreateSandbox).
    pub fn set_share(&self, p: Option<PathBuf>) {
        *self.share.lock().unwrap_or_else(PoisonError::into_inner) = p;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn create(&self, id: &str, spec_json: &[u8]) -> Result<(), ManagerError> {
        if id.is_empty()
            || id.len() > 128
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            || id == INIT
        {
            return Err(ManagerError::BadId(id.to_string()));
        }
        if self
            .share
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
        {
            return Err(ManagerError::NoShare);
        }
        let spec = spec::validate(spec_json)?;
        let mut all = self.lock();
        if all.contains_key(id) {
            return Err(ManagerError::Exists(id.to_string()));
        }
        let (out_r, out_w) = process::pipe().map_err(|e| ManagerError::Io(e.to_string()))?;
        let (err_r, err_w) = process::pipe().map_err(|e| ManagerError::Io(e.to_string()))?;
        let (exit_tx, exit) = watch::channel(None);
        all.insert(
            id.to_string(),
            Container {
                spec,
                state: State::Created {
                    out_r,
                    err_r,
                    out_w,
                    err_w,
                },
                exit,
                exit_tx: Some(exit_tx),
                relays: Vec::new(),
            },
        );
        Ok(())
    }

    pub fn start(&self, id: &str) -> Result<(), ManagerError> {
        let share = self
            .share
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(ManagerError::NoShare)?;
        let mut all = self.lock();
        let c = all
            .get_mut(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        let State::Created {
            out_r,
            err_r,
            out_w,
            err_w,
        } = std::mem::replace(&mut c.state, State::Busy)
        else {
            let state = state_name(&c.state);
            return Err(ManagerError::State {
                id: id.to_string(),
                state,
            });
        };
        let stdio = Stdio {
            stdin: process::null_stdin().map_err(|e| ManagerError::Io(e.to_string()))?,
            stdout: out_w,
            stderr: err_w,
        };
        let started = self
            .reaper
            .register_with(|| process::start(&c.spec, &share, stdio));
        let (pid, exited) = match started {
            Ok(v) => v,
            Err(e) => {
                c.state = State::Stopped;
                return Err(e.into());
            }
        };
        c.state = State::Running { pid };
        c.relays.push(relay(self.hub.clone(), id, "stdout", out_r));
        c.relays.push(relay(self.hub.clone(), id, "stderr", err_r));
        let exit_tx = c.exit_tx.take();
        let containers = self.containers.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let status = exited.await.unwrap_or(ExitStatus(255));
            if let Some(c) = containers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&id)
            {
                c.state = State::Stopped;
            }
            if let Some(tx) = exit_tx {
                let _ = tx.send(Some(status));
            }
        });
        Ok(())
    }

    /// The exit status, once the process has ended and its output is out.
    pub async fn wait(&self, id: &str) -> Result<i32, ManagerError> {
        let (mut exit, relays) = {
            let mut all = self.lock();
            let c = all
                .get_mut(id)
                .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
            if matches!(c.state, State::Created { .. }) {
                return Err(ManagerError::State {
                    id: id.to_string(),
                    state: "created",
                });
            }
            (c.exit.clone(), std::mem::take(&mut c.relays))
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

    pub fn signal(&self, id: &str, signal: i32) -> Result<(), ManagerError> {
        let all = self.lock();
        let c = all
            .get(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        let State::Running { pid } = c.state else {
            return Err(ManagerError::State {
                id: id.to_string(),
                state: state_name(&c.state),
            });
        };
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|e| ManagerError::Io(format!("signal {signal}: {e}")))?;
        nix::sys::signal::kill(pid, sig)
            .map_err(|e| ManagerError::Io(format!("signalling {pid}: {e}")))
    }

    pub fn remove(&self, id: &str) -> Result<(), ManagerError> {
        let mut all = self.lock();
        let c = all
            .get(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        if matches!(c.state, State::Running { .. } | State::Busy) {
            return Err(ManagerError::State {
                id: id.to_string(),
                state: state_name(&c.state),
            });
        }
        all.remove(id);
        self.hub.forget(id);
        Ok(())
    }
}

/// Copies a process's pipe to the host's stream for it, then closes the
/// stream. Without a stream within ATTACH_TIMEOUT the output is drained and
/// dropped, so the process never blocks on a full pipe.
fn relay(hub: Hub, id: &str, stream: &'static str, pipe: OwnedFd) -> JoinHandle<()> {
    let attached = hub.expect((id.to_string(), INIT.to_string(), stream.to_string()));
    tokio::spawn(async move {
        let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("{stream} pipe: {e}");
                return;
            }
        };
        match tokio::time::timeout(ATTACH_TIMEOUT, attached).await {
            Ok(Ok(mut s)) => {
                if let Err(e) = tokio::io::copy(&mut pipe, &mut s).await {
                    tracing::debug!("{stream} relay ended: {e}");
                }
                let _ = AsyncWriteExt::shutdown(&mut s).await;
            }
            _ => {
                tracing::warn!("nobody attached {stream} within {ATTACH_TIMEOUT:?}; discarding it");
                let _ = tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await;
            }
        }
    })
}
