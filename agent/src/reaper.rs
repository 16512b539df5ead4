//! Reaping: PID 1 must collect every process that exits in the guest, its
//! own children and the orphans re-parented to it, or they pile up as
//! zombies. Processes the agent started and wants to wait for are registered
//! when they are spawned; their exit status goes to the waiter, the rest are
//! logged and dropped. No lock is held across a fork or the wait for an
//! exec: an exit that comes before its registration is kept meanwhile.
//!
//! Nobody may call `waitpid` on a specific child elsewhere in the agent: the
//! reaper's `waitpid(-1)` would race it. Hence [`Reaper::spawn`] instead of
//! `Child::wait`. (Its tests live in `agent/tests/reaper.rs`, a process of
//! their own, for the same reason.)

use std::collections::{HashMap, VecDeque};
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

/// How many exits of not-yet-registered pids are kept while spawns are in
/// flight: a bound against a storm of orphans; the oldest goes first.
const MAX_PENDING: usize = 4096;

#[derive(Default)]
struct Inner {
    waiters: HashMap<Pid, oneshot::Sender<ExitStatus>>,
    /// Spawns between their fork and their registration.
    spawning: usize,
    /// Exits of unknown pids reaped while a spawn was in flight: one may be
    /// that spawn's child, which exited before it was registered. Kept only
    /// while spawns are in flight (cleared when the last ends), so a stale
    /// orphan's exit cannot meet a later child that reuses its pid.
    pending: HashMap<Pid, ExitStatus>,
    pending_order: VecDeque<Pid>,
}

/// A spawn in flight: while it lives, exits of unknown pids are kept for
/// [`Reaper::register`].
struct Spawning<'a>(&'a Reaper);

impl Drop for Spawning<'_> {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.spawning -= 1;
        if inner.spawning == 0 {
            inner.pending.clear();
            inner.pending_order.clear();
        }
    }
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn begin_spawn(&self) -> Spawning<'_> {
        self.lock().spawning += 1;
        Spawning(self)
    }

    /// Spawns `cmd` and registers it; even an instant exit reaches the
    /// waiter (see [`Reaper::register_with`]).
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(Pid, oneshot::Receiver<ExitStatus>)> {
        self.register_with(|| {
            let child = cmd.spawn()?;
            // Dropping `Child` neither waits nor kills: the reaper owns the
            // pid now.
            Ok(Pid::from_raw(child.id() as i32))
        })
    }

    /// Runs `start` (which forks, and may block until its child execs) and
    /// registers the pid it returns. No lock is held across `start`: while
    /// it runs the reaper keeps the exits of pids it does not know, and the
    /// registration takes the child's from there if it already ended. For
    /// processes not made by `Command` (containers are cloned).
    pub fn register_with<E>(
        &self,
        start: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, oneshot::Receiver<ExitStatus>), E> {
        self.register_value_with(|| start().map(|pid| (pid, ())))
            .map(|(pid, (rx, ()))| (pid, rx))
    }

    /// [`Reaper::register_with`] for a `start` that returns more than the
    /// pid (a held process).
    pub fn register_value_with<T, E>(
        &self,
        start: impl FnOnce() -> Result<(Pid, T), E>,
    ) -> Result<(Pid, (oneshot::Receiver<ExitStatus>, T)), E> {
        let _spawning = self.begin_spawn();
        let (pid, value) = start()?;
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        match inner.pending.remove(&pid) {
            Some(status) => {
                inner.pending_order.retain(|p| *p != pid);
                let _ = tx.send(status);
            }
            None => {
                inner.waiters.insert(pid, tx);
            }
        }
        Ok((pid, (rx, value)))
    }

    /// Collects every process that has exited. Returns how many.
    pub fn reap(&self) -> usize {
        let mut n = 0;
        let mut inner = self.lock();
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
                            None if inner.spawning > 0 => {
                                // Perhaps a child whose spawn is not
                                // registered yet: keep it for that.
                                if inner.pending.len() >= MAX_PENDING {
                                    if let Some(old) = inner.pending_order.pop_front() {
                                        inner.pending.remove(&old);
                                    }
                                }
                                inner.pending.insert(pid, status);
                                inner.pending_order.push_back(pid);
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
