//! Reaping: PID 1 must collect every process that exits in the guest, its
//! own children and the orphans re-parented to it, or they pile up as
//! zombies. Processes the agent started and wants to wait for are registered
//! when they are spawned; their exit status goes to the waiter, the rest are
//! logged and dropped.
//!
//! Nobody may call `waitpid` on a specific child elsewhere in the agent: the
//! reaper's `waitpid(-1)` would race it. Hence [`Reaper::spawn`] instead of
//! `Child::wait`. (Its tests live in `agent/tests/reaper.rs`, a process of
//! their own, for the same reason.)

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a process ended, as a shell would report it: the exit code, or
/// 128 + the signal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus(pub i32);

impl ExitStatus {
    fn from_wait(s: WaitStatus) -> Option<(Pid, Self)> {
        match s {
            WaitStatus::Exited(pid, code) => Some((pid, Self(code))),
            WaitStatus::Signaled(pid, sig, _) => Some((pid, Self(128 + sig as i32))),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<Pid, oneshot::Sender<ExitStatus>>,
}

/// The agent's reaper. Cheap to clone.
#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Mutex<Inner>>,
}

impl Reaper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `cmd` and registers it before it can be reaped: the lock is
    /// held across the fork, so even an instant exit reaches the waiter.
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(Pid, oneshot::Receiver<ExitStatus>)> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let child = cmd.spawn()?;
        let pid = Pid::from_raw(child.id() as i32);
        // Dropping `Child` neither waits nor kills: the reaper owns the pid now.
        drop(child);
        inner.waiters.insert(pid, tx);
        Ok((pid, rx))
    }

    /// Registers the pid that `start` returns, holding the reaper's lock
    /// across the call so that not even an instant exit is missed. For
    /// processes not made by `Command` (containers are cloned).
    pub fn register_with<E>(
        &self,
        start: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, oneshot::Receiver<ExitStatus>), E> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let pid = start()?;
        let (tx, rx) = oneshot::channel();
        inner.waiters.insert(pid, tx);
        Ok((pid, rx))
    }

    /// Collects every process that has exited. Returns how many.
    pub fn reap(&self) -> usize {
        let mut n = 0;
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(s) => {
                    if let Some((pid, status)) = ExitStatus::from_wait(s) {
                        n += 1;
                        match inner.waiters.remove(&pid) {
                            Some(tx) => {
                                let _ = tx.send(status);
                            }
                            None => tracing::debug!(%pid, ?status, "reaped an orphan"),
                        }
                    }
                }
            }
        }
        n
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(self) -> std::io::Result<()> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        loop {
            // Children that exited before the handler was installed count too.
            self.reap();
            sigchld.recv().await;
        }
    }
}
