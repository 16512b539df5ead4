//! The guest's log channel: the agent connects to host port
//! [`LOG_PORT`](crate::LOG_PORT); its lines are re-emitted here as tracing
//! events with target `guest`, so they land in the host's own log.

use std::path::{Path, PathBuf};

use tokio::io::AsyncBufReadExt;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::vsock::listener_path;

/// Listens at `<uds>_<LOG_PORT>` and forwards every line. The socket file is
/// removed when the returned guard drops.
pub struct LogForwarder {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl LogForwarder {
    pub fn start(uds: &Path, vm: &str) -> std::io::Result<Self> {
        let path = listener_path(uds, crate::LOG_PORT);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let vm = vm.to_string();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let vm = vm.clone();
                tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(s).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::info!(target: "guest", vm = %vm, "{}", line.trim_end());
                    }
                });
            }
        });
        Ok(Self { path, task })
    }
}

impl Drop for LogForwarder {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}
