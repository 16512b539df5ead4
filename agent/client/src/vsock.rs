//! Hybrid vsock, the host side: husk-vmm's vsock device is a Unix socket on
//! the host. A host-initiated stream to guest port P is made by connecting
//! to that socket and writing `CONNECT P\n`; the VMM answers `OK <hostport>\n`
//! once the guest accepted, and the socket then carries the stream. A guest
//! connection to host port P arrives at `<socket>_P`, where the host listens.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connecting to the VM's vsock socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock handshake for port {port}: {source}")]
    Io {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock handshake for port {port}: the VMM answered {answer:?}, not OK")]
    Refused { port: u32, answer: String },
    #[error("vsock handshake for port {port}: no answer within {0:?}", .timeout)]
    Timeout { port: u32, timeout: Duration },
}

/// The longest answer we accept: "OK " plus a u32 and a newline, with room.
const MAX_ANSWER: usize = 32;

/// Opens a stream to guest `port` through the VM's vsock socket `uds`.
pub async fn connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|source| HandshakeError::Connect {
            path: uds.to_path_buf(),
            source,
        })?;
    let io = |source| HandshakeError::Io { port, source };
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io)?;
    // Byte by byte: whatever follows the newline belongs to the stream.
    let answer = tokio::time::timeout(timeout, async {
        let mut line = Vec::with_capacity(MAX_ANSWER);
        loop {
            let b = s.read_u8().await?;
            if b == b'\n' {
                return Ok(line);
            }
            line.push(b);
            if line.len() > MAX_ANSWER {
                return Ok(line);
            }
        }
    })
    .await
    .map_err(|_| HandshakeError::Timeout { port, timeout })?
    .map_err(io)?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    match answer.strip_prefix("OK ").map(|p| p.trim().parse::<u32>()) {
        Some(Ok(_)) => Ok(s),
        _ => Err(HandshakeError::Refused { port, answer }),
    }
}

/// Where guest connections to host port `port` arrive.
pub fn listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A stand-in for the VMM's side of the handshake.
    async fn fake_vmm(listener: UnixListener, reply: &'static str) {
        let (s, _) = listener.accept().await.unwrap();
        let mut r = tokio::io::BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "CONNECT 1024\n");
        let mut s = r.into_inner();
        s.write_all(reply.as_bytes()).await.unwrap();
        // Echo what follows, so the test can see the stream is intact.
        let mut buf = [0u8; 5];
        if s.read_exact(&mut buf).await.is_ok() {
            s.write_all(&buf).await.unwrap();
        }
    }

    #[tokio::test]
    async fn handshake_then_stream() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        let vmm = tokio::spawn(fake_vmm(l, "OK 1073741824\n"));
        let mut s = connect(&uds, 1024, Duration::from_secs(5)).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        vmm.await.unwrap();
    }

    #[tokio::test]
    async fn refusals_and_garbage_are_errors() {
        for reply in ["NO\n", "OK\n", "OK x\n", "OKAY 5\n"] {
            let dir = tempfile::tempdir().unwrap();
            let uds = dir.path().join("v.sock");
            let l = UnixListener::bind(&uds).unwrap();
            tokio::spawn(fake_vmm(l, reply));
            let e = connect(&uds, 1024, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(
                matches!(e, HandshakeError::Refused { .. }),
                "{reply:?}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn endless_answers_and_silence_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(&[b'x'; 4096]).await;
            let (_s2, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let e = connect(&uds, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(e, HandshakeError::Refused { ref answer, .. } if answer.len() <= MAX_ANSWER + 1),
            "{e}"
        );
        let e = connect(&uds, 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, HandshakeError::Timeout { .. }), "{e}");
        let e = connect(&dir.path().join("absent"), 1024, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, HandshakeError::Connect { .. }), "{e}");
    }

    #[test]
    fn listener_paths() {
        assert_eq!(
            listener_path(Path::new("/run/husk/x/vsock.sock"), 1025),
            Path::new("/run/husk/x/vsock.sock_1025")
        );
    }
}
