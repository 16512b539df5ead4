//! A process's stdio: the agent's per-process vsock streams relayed to and
//! from the host side: containerd's FIFOs (the shim) or this process's own
//! stdin/stdout/stderr (the CLI).
//!
//! Output FIFOs are opened read-write, as runc's shim does: a FIFO with no
//! reader would fail our writes while containerd restarts, and holding a
//! read end of our own keeps them valid; containerd sees EOF when the relay
//! closes. The stdin FIFO is opened read-only and blocking (on a helper
//! thread), so that its end comes only when containerd's writer closes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use super::logfile;
use crate::agent::{Agent, Stream};
use crate::error::{Error, Result};

/// Where one stream goes (or comes from) on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Endpoint {
    /// Nowhere (output is read and dropped; no stdin).
    #[default]
    None,
    /// A FIFO containerd made.
    Fifo(PathBuf),
    /// This process's own stream.
    Inherit,
    /// Appended to a log file (the CLI's `husk logs`), at most
    /// [`LOG_LIMIT`] bytes of it. Output only.
    Log(PathBuf),
    /// This process's own stream, and the log file as [`Endpoint::Log`].
    InheritAndLog(PathBuf),
}

/// The most a container's log file takes; then one line says the rest was
/// dropped (the guest must not fill the host's disk through its output).
pub const LOG_LIMIT: u64 = 64 << 20;

impl Endpoint {
    /// containerd's convention: an empty path is no stream.
    pub fn fifo(path: &str) -> Self {
        if path.is_empty() {
            Endpoint::None
        } else {
            Endpoint::Fifo(PathBuf::from(path))
        }
    }

    pub fn is_none(&self) -> bool {
        *self == Endpoint::None
    }

    /// The FIFO's path as containerd gave it ("" for none).
    pub fn path_string(&self) -> String {
        match self {
            Endpoint::Fifo(p) => p.display().to_string(),
            _ => String::new(),
        }
    }
}

/// A process's three streams and whether it has a terminal (then stdout
/// carries the pty and there is no stderr).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioConfig {
    pub stdin: Endpoint,
    pub stdout: Endpoint,
    pub stderr: Endpoint,
    pub terminal: bool,
}

impl StdioConfig {
    /// containerd's FIFO paths ("" for none).
    pub fn fifos(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Self {
        Self {
            stdin: Endpoint::fifo(stdin),
            stdout: Endpoint::fifo(stdout),
            stderr: Endpoint::fifo(stderr),
            terminal,
        }
    }
}

/// The relays of one process.
#[derive(Default)]
pub struct Relays {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<(JoinHandle<()>, Option<PathBuf>)>,
}

impl Relays {
    /// Attaches to the process's streams and starts relaying. Call before
    /// the process starts so that no output is missed.
    pub async fn attach(
        agent: &dyn Agent,
        id: &str,
        exec_id: &str,
        io: &StdioConfig,
    ) -> Result<Relays> {
        let mut relays = Relays::default();
        // Both streams usually log to one file: opened once, counted once.
        let mut log: Option<(PathBuf, Arc<LogFile>)> = None;
        let mut log_for = |path: &PathBuf| -> Result<Arc<LogFile>> {
            match &log {
                Some((p, l)) if p == path => Ok(l.clone()),
                _ => {
                    let l = LogFile::open(path, LOG_LIMIT)?;
                    log = Some((path.clone(), l.clone()));
                    Ok(l)
                }
            }
        };
        let mut outs = vec![(Stream::Stdout, &io.stdout)];
        // A terminal process has one stream: the pty.
        if !io.terminal {
            outs.push((Stream::Stderr, &io.stderr));
        }
        for (name, endpoint) in outs {
            let stream = agent
                .attach(id, exec_id, name)
                .await
                .map_err(Error::agent("attaching an output"))?;
            let sink: Box<dyn AsyncWrite + Send + Unpin> = match endpoint {
                Endpoint::None => Box::new(tokio::io::sink()),
                Endpoint::Fifo(fifo) => Box::new(
                    pipe::OpenOptions::new()
                        .read_write(true)
                        .open_sender(fifo)
                        .map_err(Error::io("opening", fifo))?,
                ),
                Endpoint::Inherit if name == Stream::Stdout => Box::new(tokio::io::stdout()),
                Endpoint::Inherit => Box::new(tokio::io::stderr()),
                Endpoint::Log(path) => {
                    let log = log_for(path)?;
                    relays
                        .outputs
                        .push(tokio::spawn(relay_logged(stream, None, log, name)));
                    continue;
                }
                Endpoint::InheritAndLog(path) => {
                    let log = log_for(path)?;
                    let own: Box<dyn AsyncWrite + Send + Unpin> = if name == Stream::Stdout {
                        Box::new(tokio::io::stdout())
                    } else {
                        Box::new(tokio::io::stderr())
                    };
                    relays
                        .outputs
                        .push(tokio::spawn(relay_logged(stream, Some(own), log, name)));
                    continue;
                }
            };
            relays
                .outputs
                .push(tokio::spawn(relay_out(stream, sink, name)));
        }
        match &io.stdin {
            Endpoint::None | Endpoint::Log(_) | Endpoint::InheritAndLog(_) => {}
            Endpoint::Fifo(path) => {
                let stream = agent
                    .attach(id, exec_id, Stream::Stdin)
                    .await
                    .map_err(Error::agent("attaching stdin"))?;
                let task = tokio::spawn(relay_fifo_in(path.clone(), stream));
                relays.stdin = Some((task, Some(path.clone())));
            }
            Endpoint::Inherit => {
                let stream = agent
                    .attach(id, exec_id, Stream::Stdin)
                    .await
                    .map_err(Error::agent("attaching stdin"))?;
                let task = tokio::spawn(relay_in(tokio::io::stdin(), stream));
                relays.stdin = Some((task, None));
            }
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
            if let Some(path) = path {
                unblock_open(&path);
            }
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

async fn relay_out(
    mut stream: UnixStream,
    mut sink: Box<dyn AsyncWrite + Send + Unpin>,
    name: Stream,
) {
    let r = tokio::io::copy(&mut stream, &mut sink).await;
    let _ = sink.flush().await;
    match r {
        Ok(n) => tracing::debug!(stream = %name, bytes = n, "output relay done"),
        Err(e) => tracing::debug!(stream = %name, error = %e, "output relay ended"),
    }
}

/// A container's log file, shared by the relays of its streams. The bytes
/// it holds are counted here (from its length at open), so the bound costs
/// no fstat per record; past `limit` one note, then nothing more.
struct LogFile {
    file: std::fs::File,
    len: AtomicU64,
    limit: u64,
    full: AtomicBool,
}

impl LogFile {
    fn open(path: &Path, limit: u64) -> Result<Arc<LogFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(Error::io("opening", path))?;
        let len = file.metadata().map_err(Error::io("reading", path))?.len();
        Ok(Arc::new(LogFile {
            file,
            len: AtomicU64::new(len),
            limit,
            full: AtomicBool::new(len >= limit),
        }))
    }

    fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Appends one record, unless the log is full; the record that would
    /// take it past the limit is replaced by a note saying the rest is not
    /// kept (once, whichever stream gets there first). One write per
    /// record: the file is opened for appending, so the two streams'
    /// records never interleave within a line.
    fn append(&self, name: Stream, line: &[u8]) {
        use std::io::Write;
        if self.is_full() {
            return;
        }
        let now = std::time::SystemTime::now();
        let record = logfile::encode(name, line, now);
        let n = record.len() as u64;
        if self.len.fetch_add(n, Ordering::Relaxed).saturating_add(n) > self.limit {
            if !self.full.swap(true, Ordering::Relaxed) {
                let note = b"[husk: log limit reached; later output is not kept]\n";
                let _ = (&self.file).write_all(&logfile::encode(Stream::Stderr, note, now));
            }
        } else if (&self.file).write_all(&record).is_err() {
            self.full.store(true, Ordering::Relaxed);
        }
    }
}

/// Output to the log file (and to `own`, when given), the log bounded
/// ([`LOG_LIMIT`]) while `own` still gets everything. The log gets a record
/// a line ([`logfile`]), so the two streams can be told apart when read back.
async fn relay_logged(
    mut stream: UnixStream,
    mut own: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    log: Arc<LogFile>,
    name: Stream,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 32 << 10];
    let mut lines = logfile::Lines::default();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(w) = own.as_mut() {
            // Flushed at once: a prompt without a newline must show
            // (tokio's stdout writes from a blocking thread, on flush).
            if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
                own = None;
            }
        }
        if !log.is_full() {
            lines.push(&buf[..n], |line| log.append(name, line));
        }
    }
    lines.finish(|line| log.append(name, line));
    if let Some(w) = own.as_mut() {
        let _ = w.flush().await;
    }
    tracing::debug!(stream = %name, "logged output relay done");
}

async fn relay_in(mut from: impl AsyncRead + Unpin, mut stream: UnixStream) {
    let r = tokio::io::copy(&mut from, &mut stream).await;
    tracing::debug!(?r, "stdin relay done");
    // Closing our end closes the process's stdin.
    let _ = stream.shutdown().await;
}

async fn relay_fifo_in(path: PathBuf, stream: UnixStream) {
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
    match pipe::Receiver::from_file(file) {
        Ok(rx) => relay_in(rx, stream).await,
        Err(e) => tracing::warn!(fifo = %path.display(), error = %e, "stdin is not a FIFO"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use logfile::Line;

    #[tokio::test]
    async fn the_log_stops_at_its_limit_with_a_note_and_the_terminal_gets_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut guest, host) = UnixStream::pair().unwrap();
        let (own_w, mut own_r) = tokio::io::duplex(1 << 20);
        let relay = tokio::spawn(relay_logged(
            host,
            Some(Box::new(own_w)),
            LogFile::open(&path, 1000).unwrap(),
            Stream::Stdout,
        ));
        let mut line = [b'x'; 100];
        line[99] = b'\n';
        for _ in 0..50 {
            guest.write_all(&line).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(guest);
        relay.await.unwrap();
        let mut seen = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut own_r, &mut seen)
            .await
            .unwrap();
        assert_eq!(seen.len(), 5000, "the terminal gets everything");
        let log = std::fs::read(&path).unwrap();
        assert!(log.len() < 1200, "the log is bounded: {}", log.len());
        let lines: Vec<_> = log
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let last = lines.last().unwrap();
        let Line::Record(note) = logfile::parse(last) else {
            panic!("not a record: {last:?}")
        };
        assert!(note.is_stderr() && note.log.contains("log limit reached"));
        // Every kept record is the container's stdout, whole.
        let kept: String = lines[..lines.len() - 1]
            .iter()
            .map(|l| match logfile::parse(l) {
                Line::Record(r) if !r.is_stderr() => r.log,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert!(kept.bytes().all(|b| b == b'x' || b == b'\n') && kept.ends_with('\n'));
    }
}
