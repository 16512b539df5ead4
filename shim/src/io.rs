//! A process's stdio: containerd's FIFOs on the host, relayed to and from
//! the agent's per-process vsock streams.
//!
//! Output FIFOs are opened read-write, as runc's shim does: a FIFO with no
//! reader would fail our writes while containerd restarts, and holding a
//! read end of our own keeps them valid; containerd sees EOF when the relay
//! closes. The stdin FIFO is opened read-only and blocking (on a helper
//! thread), so that its end comes only when containerd's writer closes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use husk_agent_client::{Client, Stream};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

/// The FIFOs containerd named for one process ("" where it wants none).
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The relays of one process.
#[derive(Default)]
pub struct Relays {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<(JoinHandle<()>, PathBuf)>,
}

impl Relays {
    /// Attaches to the process's streams and starts relaying. Call before
    /// StartContainer / ExecProcess so that no output is missed.
    pub async fn attach(client: &Client, id: &str, exec_id: &str, io: &Stdio) -> Result<Relays> {
        let mut relays = Relays::default();
        let mut outs = vec![(Stream::Stdout, io.stdout.as_str())];
        // A terminal process has one stream: the pty.
        if !io.terminal {
            outs.push((Stream::Stderr, io.stderr.as_str()));
        }
        for (kind, fifo) in outs {
            let name = kind.as_str();
            let stream = client
                .attach(id, exec_id, kind)
                .await
                .with_context(|| format!("attaching {name}"))?;
            let sink = if fifo.is_empty() {
                None
            } else {
                Some(
                    pipe::OpenOptions::new()
                        .read_write(true)
                        .open_sender(fifo)
                        .with_context(|| format!("opening {fifo}"))?,
                )
            };
            relays
                .outputs
                .push(tokio::spawn(relay_out(stream, sink, name)));
        }
        if !io.stdin.is_empty() {
            let stream = client
                .attach(id, exec_id, Stream::Stdin)
                .await
                .context("attaching stdin")?;
            let path = PathBuf::from(&io.stdin);
            relays.stdin = Some((tokio::spawn(relay_in(path.clone(), stream)), path));
        }
        Ok(relays)
    }

    /// The output relays, to wait for with [`drain`] outside any lock.
    pub fn take_outputs(&mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.outputs)
    }

    /// Stops relaying stdin: the stream closes, and so does the process's
    /// stdin.
    pub fn close_stdin(&mut self) {
        if let Some((task, path)) = self.stdin.take() {
            task.abort();
            unblock_open(&path);
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        self.close_stdin();
        for t in &self.outputs {
            t.abort();
        }
    }
}

/// Waits (at most `limit`) for output relays to deliver the rest. The agent
/// reports an exit only after the output left the guest, so this is short;
/// the limit guards against a stream that never ends.
pub async fn drain(handles: Vec<JoinHandle<()>>, limit: Duration) {
    let all = async {
        for h in handles {
            let _ = h.await;
        }
    };
    if tokio::time::timeout(limit, all).await.is_err() {
        tracing::warn!("output relay did not finish within {limit:?}");
    }
}

async fn relay_out(mut stream: tokio::net::UnixStream, sink: Option<pipe::Sender>, name: &str) {
    let r = match sink {
        Some(mut fifo) => {
            let r = tokio::io::copy(&mut stream, &mut fifo).await;
            let _ = fifo.flush().await;
            r
        }
        None => tokio::io::copy(&mut stream, &mut tokio::io::sink()).await,
    };
    match r {
        Ok(n) => tracing::debug!(stream = name, bytes = n, "output relay done"),
        Err(e) => tracing::debug!(stream = name, error = %e, "output relay ended"),
    }
}

async fn relay_in(path: PathBuf, mut stream: tokio::net::UnixStream) {
    let p = path.clone();
    // Blocks until containerd opens its writer.
    let opened = tokio::task::spawn_blocking(move || std::fs::File::open(&p)).await;
    let file = match opened {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::warn!(fifo = %path.display(), error = %e, "opening stdin");
            return;
        }
        Err(_) => return,
    };
    let mut rx = match pipe::Receiver::from_file(file) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!(fifo = %path.display(), error = %e, "stdin is not a FIFO");
            return;
        }
    };
    let r = tokio::io::copy(&mut rx, &mut stream).await;
    tracing::debug!(?r, "stdin relay done");
    // Dropping the stream closes the process's stdin.
    let _ = stream.shutdown().await;
}

/// Wakes a helper thread blocked opening `fifo` for reading (no writer ever
/// came): a non-blocking writer open succeeds because that reader counts.
fn unblock_open(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
}
