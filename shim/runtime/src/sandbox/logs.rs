//! The guest's log and husk-vmm's, on the host.
//!
//! The agent connects to host port 1025 and writes lines; they go to
//! `guest.log` in the sandbox directory and to our tracing log (target
//! `guest`, shown by the CLI only with `--debug`). Everything here is
//! guest-driven, so it is bounded: a few connections, lines cut at
//! [`MAX_LINE`], the file capped at [`MAX_FILE`], control characters
//! escaped so a guest cannot forge or colour host log lines.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// The longest line kept; the rest of a longer one is dropped.
pub const MAX_LINE: usize = 8 * 1024;
/// guest.log stops growing here (the tracing log still gets lines).
pub const MAX_FILE: u64 = 16 << 20;
/// The agent needs one connection; a few allow for a restart.
pub const MAX_CONNECTIONS: usize = 4;

/// Listens at `<vsock>_1025` until dropped (the socket file goes then).
pub struct GuestLog {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl GuestLog {
    pub fn start(vsock_socket: &Path, file: &Path, vm: &str) -> std::io::Result<Self> {
        let path = husk_agent_client::vsock::listener_path(vsock_socket, husk_agent_api::LOG_PORT);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let out = Arc::new(tokio::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .map(tokio::fs::File::from_std)?,
        ));
        let written = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let vm = vm.to_string();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    tracing::warn!(vm = %vm, "guest log: too many connections; refused one");
                    continue;
                }
                open.fetch_add(1, Ordering::SeqCst);
                let (vm, out, written, open) =
                    (vm.clone(), out.clone(), written.clone(), open.clone());
                tokio::spawn(async move {
                    forward(s, &vm, &out, &written).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self { path, task })
    }
}

impl Drop for GuestLog {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Forwards one connection's lines.
async fn forward(
    s: tokio::net::UnixStream,
    vm: &str,
    out: &tokio::sync::Mutex<tokio::fs::File>,
    written: &AtomicU64,
) {
    let mut r = tokio::io::BufReader::new(s);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // At most MAX_LINE bytes are buffered, newline or not.
        let n = match (&mut r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if n == MAX_LINE && buf.last() != Some(&b'\n') && skip_line(&mut r).await.is_err() {
            return;
        }
        let line = sanitize(&buf);
        tracing::info!(target: "guest", vm = %vm, "{line}");
        let bytes = line.len() as u64 + 1;
        if written.fetch_add(bytes, Ordering::SeqCst) + bytes <= MAX_FILE {
            let mut f = out.lock().await;
            let _ = f.write_all(format!("{line}\n").as_bytes()).await;
        }
    }
}

/// Reads and drops the rest of an over-long line.
async fn skip_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<()> {
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(());
        }
        if let Some(i) = chunk.iter().position(|&b| b == b'\n') {
            r.consume(i + 1);
            return Ok(());
        }
        let n = chunk.len();
        r.consume(n);
    }
}

/// One line as text with its newline gone and every control character
/// (ANSI escapes, carriage returns) shown escaped.
pub fn sanitize(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out = String::with_capacity(text.len());
    for c in text.trim_end_matches(['\n', '\r']).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Forwards husk-vmm's stderr (its log file) into ours, tagged `vmm`,
/// until aborted.
pub async fn forward_vmm_log(path: PathBuf, vm: String) {
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return;
    };
    let mut lines = tokio::io::BufReader::new(file);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut lines)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) => tokio::time::sleep(Duration::from_millis(500)).await,
            Ok(_) => tracing::info!(target: "vmm", vm = %vm, "{}", sanitize(&buf)),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(sanitize(b"plain\n"), "plain");
        assert_eq!(sanitize(b"\x1b[31mred\r\n"), "\\u{1b}[31mred");
        assert_eq!(sanitize(b"a\rb"), "a\\rb");
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let file = dir.path().join("guest.log");
        let log = GuestLog::start(&sock, &file, "vm").unwrap();
        let mut s = tokio::net::UnixStream::connect(format!("{}_1025", sock.display()))
            .await
            .unwrap();
        let mut long = vec![b'x'; 3 * MAX_LINE];
        long.push(b'\n');
        s.write_all(&long).await.unwrap();
        s.write_all(b"after\n").await.unwrap();
        drop(s);
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&file).unwrap();
            if text.contains("after") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{}", text.len());
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1], "after");
        drop(log);
        assert!(!Path::new(&format!("{}_1025", sock.display())).exists());
    }
}
