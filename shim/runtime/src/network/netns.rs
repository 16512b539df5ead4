//! Running host code inside a pod's network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the calling thread only, so the work runs
//! on a thread of its own that enters the namespace, does it and ends: a
//! pooled thread (tokio's blocking pool) would carry the pod's namespace
//! into whatever ran on it next. Netlink sockets and taps made on that
//! thread belong to the pod's namespace for their whole life.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use super::NetError;

/// Runs `f` on a fresh thread in the network namespace at `netns` (a
/// `/var/run/netns/cni-*` bind mount or a `/proc/<pid>/ns/net` link), with a
/// current-thread tokio runtime for netlink, and returns what it returned.
pub async fn run_in<T, F, Fut>(netns: &Path, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetError>>,
{
    // Opened here, so that a missing namespace is an error about its path,
    // before any thread starts.
    let ns = File::open(netns).map_err(|source| NetError::Netns {
        path: netns.to_path_buf(),
        source,
    })?;
    let path: PathBuf = netns.to_path_buf();
    on_own_thread(
        "husk-netns",
        move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Netns {
                path,
                source: e.into(),
            })
        },
        f,
    )
    .await
}

/// Runs `setup` then `f` (on a current-thread tokio runtime) on a thread
/// made for them, which ends after: what `setup` changes for the thread (a
/// namespace) or holds (a lock, its result kept until `f` is done) never
/// reaches other work.
pub(crate) async fn on_own_thread<T, G, S, F, Fut>(
    name: &str,
    setup: S,
    f: F,
) -> Result<T, NetError>
where
    T: Send + 'static,
    S: FnOnce() -> Result<G, NetError> + Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetError>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = (|| {
                let _held = setup()?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(NetError::Socket)?;
                rt.block_on(f())
            })();
            let _ = tx.send(result);
        })
        .map_err(NetError::Socket)?;
    rx.await
        .unwrap_or_else(|_| Err(NetError::Invalid(format!("the {name} thread ended early"))))
}
