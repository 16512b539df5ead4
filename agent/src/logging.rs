//! The agent's log: every line goes to the serial console, and, once the
//! host listens, over a guest-initiated vsock stream to port `LOG_PORT` on
//! the host (CID 2), which the host side forwards into its own log.
//!
//! Logging never blocks the agent: lines for vsock pass through a bounded
//! queue to a writer thread and are dropped (and counted) when it is full.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

use husk_agent_api::LOG_PORT;

const HOST_CID: u32 = 2;
const QUEUE_LINES: usize = 4096;

static QUEUE: OnceLock<SyncSender<Vec<u8>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// A tracing writer for one event: console now, vsock queue on drop.
pub struct Tee {
    buf: Vec<u8>,
}

impl Write for Tee {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let _ = std::io::stderr().write_all(&self.buf);
        if let Some(q) = QUEUE.get() {
            match q.try_send(std::mem::take(&mut self.buf)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
pub struct TeeMaker;

impl<'a> MakeWriter<'a> for TeeMaker {
    type Writer = Tee;
    fn make_writer(&'a self) -> Tee {
        Tee {
            buf: Vec::with_capacity(256),
        }
    }
}

/// Installs the subscriber; `RUST_LOG` style filter from `husk.log=` or info.
pub fn init(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(TeeMaker)
        .with_ansi(false)
        .without_time() // the host stamps lines when it receives them
        .try_init();
}

/// Starts forwarding to the host over vsock. Lines logged before the host
/// listens wait in the queue (up to its bound).
pub fn start_vsock_forwarding() {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    if QUEUE.set(tx).is_ok() {
        std::thread::Builder::new()
            .name("log-vsock".into())
            .spawn(move || forward(rx))
            .ok();
    }
}

fn forward(rx: Receiver<Vec<u8>>) {
    let addr = vsock::VsockAddr::new(HOST_CID, LOG_PORT);
    let mut pending: Option<Vec<u8>> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut stream = match vsock::VsockStream::connect(&addr) {
            Ok(s) => {
                backoff = Duration::from_millis(50);
                s
            }
            Err(_) => {
                // The host may not listen (yet, or at all): try again, slowly.
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                stream,
                "husk-agent: {dropped} log lines dropped while the host was not reading"
            );
        }
        loop {
            let line = match pending.take() {
                Some(l) => l,
                None => match rx.recv() {
                    Ok(l) => l,
                    Err(_) => return,
                },
            };
            if stream.write_all(&line).is_err() {
                pending = Some(line);
                break;
            }
        }
    }
}
