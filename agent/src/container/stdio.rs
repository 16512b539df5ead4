//! Process stdio over vsock: the host connects to [`STDIO_PORT`] and names
//! the pipe it wants in one line, a [`Handshake`] (its encoding and limits
//! live in husk-agent-api). The hub hands the stream to whoever waits for
//! that name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use husk_agent_api::stdio::{Handshake, MAX_HANDSHAKE};
use husk_agent_api::STDIO_PORT;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

/// One stream of one process.
pub type Key = Handshake;

const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Streams waited for, and streams that arrived before anyone waited.
#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    waiting: HashMap<Key, oneshot::Sender<VsockStream>>,
    arrived: HashMap<Key, VsockStream>,
}

impl Hub {
    /// A receiver that gets the stream for `key` when the host attaches it.
    pub fn expect(&self, key: Key) -> oneshot::Receiver<VsockStream> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match st.arrived.remove(&key) {
            Some(s) => {
                let _ = tx.send(s);
            }
            None => {
                st.waiting.insert(key, tx);
            }
        }
        rx
    }

    /// Drops everything about a container (its streams close).
    pub fn forget(&self, container_id: &str) {
        let mut st = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        st.waiting.retain(|k, _| k.container_id != container_id);
        st.arrived.retain(|k, _| k.container_id != container_id);
    }

    /// Forgets the streams of one process of a container.
    pub fn forget_process(&self, container_id: &str, exec_id: &str) {
        let mut st = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let other = |k: &Key| k.container_id != container_id || k.exec_id != exec_id;
        st.waiting.retain(|k, _| other(k));
        st.arrived.retain(|k, _| other(k));
    }

    fn deliver(&self, key: Key, s: VsockStream) {
        let mut st = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match st.waiting.remove(&key) {
            Some(tx) => {
                if let Err(s) = tx.send(s) {
                    st.arrived.insert(key, s);
                }
            }
            None => {
                st.arrived.insert(key, s);
            }
        }
    }

    /// Accepts stdio streams forever.
    pub async fn serve(self) -> std::io::Result<()> {
        let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, STDIO_PORT))?;
        loop {
            let (s, _) = listener.accept().await?;
            let hub = self.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HEADER_TIMEOUT, read_header(s)).await {
                    Ok(Ok((key, s))) => hub.deliver(key, s),
                    Ok(Err(e)) => tracing::warn!("stdio stream refused: {e}"),
                    Err(_) => tracing::warn!("stdio stream sent no header in {HEADER_TIMEOUT:?}"),
                }
            });
        }
    }
}

async fn read_header(mut s: VsockStream) -> Result<(Key, VsockStream), String> {
    // Byte by byte: what follows the newline is the stream's.
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await.map_err(|e| e.to_string())?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_HANDSHAKE {
            return Err("stdio handshake too long".into());
        }
    }
    let line = String::from_utf8(line).map_err(|_| "stdio handshake is not UTF-8".to_string())?;
    let key = Handshake::parse(&line).map_err(|e| e.to_string())?;
    Ok((key, s))
}
