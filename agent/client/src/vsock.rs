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
    #[error(
        "vsock handshake for port {port}: the VMM closed the stream {tries} times in {waited:?} \
         (the guest refused it or did not answer in time)"
    )]
    Closed {
        port: u32,
        tries: u32,
        waited: Duration,
    },
}

impl HandshakeError {
    /// The VMM ended the stream before answering: the guest sent a reset (no
    /// listener yet, a stale connection in the guest after a restore) or did
    /// not answer within the VMM's own deadline. Trying again is safe:
    /// nothing reached the guest's side of the stream.
    fn closed_before_answer(&self) -> bool {
        matches!(self, HandshakeError::Io { source, .. } if matches!(
            source.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ))
    }
}

/// The longest answer we accept: "OK " plus a u32 and a newline, with room.
const MAX_ANSWER: usize = 32;

/// The first pause between tries of [`connect_patiently`] (and of the
/// client's wait for a booting agent); it doubles up to [`MAX_BACKOFF`].
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_millis(10);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// [`connect`], tried again while the VMM closes the stream before its
/// answer, until `timeout` has passed in all. The VMM gives a guest a few
/// seconds to answer a connection; a guest that is only slow (a loaded host,
/// a just-restored VM faulting its memory in) gets the caller's whole
/// deadline instead. A VMM that is gone (its socket refuses) fails at once.
pub async fn connect_patiently(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    let started = tokio::time::Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut tries = 0u32;
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        tries += 1;
        match connect(uds, port, left).await {
            Err(e) if e.closed_before_answer() => {
                let waited = started.elapsed();
                if waited + backoff >= timeout {
                    return Err(HandshakeError::Closed {
                        port,
                        tries,
                        waited,
                    });
                }
                tracing::debug!(
                    port,
                    tries,
                    "vsock: the VMM closed a stream before answering; again"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            other => return other,
        }
    }
}

/// Opens a stream to guest `port` through the VM's vsock socket `uds`, in
/// one try.
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

    /// A VMM that closes the first `closes` streams before answering, then
    /// answers OK.
    async fn flaky_vmm(listener: UnixListener, closes: usize) {
        for _ in 0..closes {
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        }
        fake_vmm(listener, "OK 1073741824\n").await;
    }

    #[tokio::test]
    async fn streams_closed_before_the_answer_are_tried_again_until_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        tokio::spawn(flaky_vmm(l, 3));
        // One try sees the close...
        let e = connect(&uds, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.closed_before_answer(), "{e}");
        // ...a patient connect gets through the other two.
        let mut s = connect_patiently(&uds, 1024, Duration::from_secs(5))
            .await
            .unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        // A VMM that always closes: an error naming it, within the deadline.
        let uds2 = dir.path().join("v2.sock");
        let l = UnixListener::bind(&uds2).unwrap();
        tokio::spawn(flaky_vmm(l, usize::MAX));
        let t = std::time::Instant::now();
        let e = connect_patiently(&uds2, 1026, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(
            matches!(e, HandshakeError::Closed { port: 1026, tries, .. } if tries > 1),
            "{e}"
        );
        // A refusal and a missing socket are not tried again.
        let e = connect_patiently(&dir.path().join("absent"), 1024, Duration::from_secs(5))
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
