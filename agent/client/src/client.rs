//! The typed agent client: connects through hybrid vsock, waits for the
//! agent to come up (bounded by the boot timeout), puts a deadline on every
//! call, and reconnects on the next call after the connection dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_agent_api::agent::{
    CheckRequest, ContainerRequest, CreateContainerRequest, CreateSandboxRequest,
    DestroySandboxRequest, ExecProcessRequest, GuestDetailsRequest, GuestDetailsResponse,
    OomEventRequest, ProcessRequest, RestoredRequest, ShutdownRequest, SignalProcessRequest,
    StatsContainerResponse, TtyWinResizeRequest, UpdateContainerRequest,
};
use husk_agent_api::agent_ttrpc::AgentClient as RawClient;
use husk_agent_api::stdio::{self, Stream};
use husk_agent_api::ttrpc::{self, asynchronous::transport::Socket, context};
use husk_agent_api::AGENT_VSOCK_PORT;
use tokio::sync::Mutex;

use crate::vsock::{self, HandshakeError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the agent did not answer within the boot timeout ({waited:?}); last error: {last}{}", console_section(.console_tail))]
    BootTimeout {
        waited: Duration,
        last: String,
        console_tail: String,
    },
    #[error("{call}: no answer within {timeout:?}")]
    CallTimeout {
        call: &'static str,
        timeout: Duration,
    },
    #[error("{call}: the connection to the agent failed ({source}); the next call reconnects")]
    Transport {
        call: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    #[error("{call}: the agent refused: {code:?}: {message}")]
    Rpc {
        call: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Stdio(#[from] husk_agent_api::stdio::HandshakeError),
}

fn console_section(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n--- guest console (last lines) ---\n{tail}")
    }
}

/// How to reach the agent and how long to wait.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The VM's vsock Unix socket.
    pub vsock_socket: PathBuf,
    /// Until the first answer after boot.
    pub boot_timeout: Duration,
    /// For each call once connected.
    pub call_timeout: Duration,
    /// The guest console log, quoted in a boot-timeout error.
    pub console_log: Option<PathBuf>,
}

impl ConnectOptions {
    pub fn new(vsock_socket: impl Into<PathBuf>) -> Self {
        Self {
            vsock_socket: vsock_socket.into(),
            boot_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(10),
            console_log: None,
        }
    }
}

/// How much of a file's end [`file_tail`] reads: a console the guest filled
/// must not cost the host its size in memory.
const TAIL_BYTES: u64 = 16 * 1024;
/// How long one line of [`file_tail`] may be.
const TAIL_LINE_CHARS: usize = 300;

/// The last `n` lines of a file (from its last 16 KiB), or nothing. The text
/// may be the guest's (its console): control characters other than tab come
/// back as `?`, so an error message cannot drive the reader's terminal, and
/// each line is cut at 300 characters.
pub fn file_tail(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(TAIL_BYTES);
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.take(TAIL_BYTES).read_to_end(&mut bytes);
        }
        if start > 0 {
            // The first line is likely cut; drop it.
            let nl = bytes.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
            bytes.drain(..nl);
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            l.chars()
                .take(TAIL_LINE_CHARS)
                .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
                .collect()
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A client of one VM's agent. Clones share the connection.
#[derive(Clone)]
pub struct Client {
    opts: ConnectOptions,
    conn: Arc<Mutex<Option<RawClient>>>,
}

impl Client {
    /// Connects, retrying with backoff until the agent answers a Check or
    /// the boot timeout passes.
    pub async fn connect(opts: ConnectOptions) -> Result<Self, ClientError> {
        let client = Self::lazy(opts);
        let started = Instant::now();
        let mut backoff = vsock::FIRST_BACKOFF;
        loop {
            // Each attempt is bounded by what is left of the boot timeout: a
            // handshake the guest never answers must not outlast it.
            let left = client.opts.boot_timeout.saturating_sub(started.elapsed());
            let last = match tokio::time::timeout(left, client.try_check()).await {
                Ok(Ok(())) => return Ok(client),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer before the boot timeout".to_string(),
            };
            let waited = started.elapsed();
            if waited >= client.opts.boot_timeout {
                return Err(ClientError::BootTimeout {
                    waited,
                    last,
                    console_tail: client
                        .opts
                        .console_log
                        .as_deref()
                        .map(|p| file_tail(p, 20))
                        .unwrap_or_default(),
                });
            }
            tracing::trace!(%last, ?backoff, "agent not up yet");
            tokio::time::sleep(backoff.min(client.opts.boot_timeout - waited)).await;
            backoff = (backoff * 2).min(vsock::MAX_BACKOFF);
        }
    }

    /// A client that connects on its first call, without waiting for boot.
    pub fn lazy(opts: ConnectOptions) -> Self {
        Self {
            opts,
            conn: Arc::new(Mutex::new(None)),
        }
    }

    async fn try_check(&self) -> Result<(), ClientError> {
        // While booting, a single attempt gets only a short leash.
        let resp = self
            .call("Check", Duration::from_secs(2), |c, ctx| async move {
                c.check(ctx, &CheckRequest::default()).await
            })
            .await?;
        if resp.serving {
            Ok(())
        } else {
            Err(ClientError::Rpc {
                call: "Check",
                code: ttrpc::Code::UNAVAILABLE,
                message: "the agent is not serving yet".into(),
            })
        }
    }

    async fn raw(&self) -> Result<RawClient, ClientError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        let stream = vsock::connect_patiently(
            &self.opts.vsock_socket,
            AGENT_VSOCK_PORT,
            self.opts.call_timeout,
        )
        .await?;
        let c = RawClient::new(ttrpc::r#async::Client::new(Socket::new(stream)));
        *conn = Some(c.clone());
        Ok(c)
    }

    /// One call with a deadline. A transport failure drops the connection so
    /// that the next call makes a new one.
    async fn call<T, F, Fut>(
        &self,
        name: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, ClientError>
    where
        F: FnOnce(RawClient, context::Context) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        let c = self.raw().await?;
        let ctx = context::with_timeout(timeout.as_nanos() as i64);
        let result = match tokio::time::timeout(timeout, f(c, ctx)).await {
            Err(_) => Err(ClientError::CallTimeout {
                call: name,
                timeout,
            }),
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(ttrpc::Error::RpcStatus(s))) => Err(ClientError::Rpc {
                call: name,
                code: s.code(),
                message: s.message().to_string(),
            }),
            // Socket errors, closed connections, undecodable answers alike.
            Ok(Err(e)) => Err(ClientError::Transport {
                call: name,
                source: e,
            }),
        };
        // Whatever went wrong, do not trust this connection again.
        if !matches!(result, Err(ClientError::Rpc { .. })) {
            *self.conn.lock().await = None;
        }
        result
    }

    pub async fn check(&self) -> Result<bool, ClientError> {
        let t = self.opts.call_timeout;
        let r = self
            .call("Check", t, |c, ctx| async move {
                c.check(ctx, &CheckRequest::default()).await
            })
            .await?;
        Ok(r.serving)
    }

    pub async fn guest_details(&self) -> Result<GuestDetailsResponse, ClientError> {
        let t = self.opts.call_timeout;
        self.call("GetGuestDetails", t, |c, ctx| async move {
            c.get_guest_details(ctx, &GuestDetailsRequest::default())
                .await
        })
        .await
    }

    /// Tells a guest restored from a snapshot the time and gives it fresh
    /// entropy (see the agent's `restored` module).
    pub async fn restored(&self, realtime_ns: u64, entropy: Vec<u8>) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = RestoredRequest {
            realtime_ns,
            entropy,
            ..Default::default()
        };
        self.call("Restored", t, |c, ctx| async move {
            c.restored(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        self.call("CreateSandbox", t, |c, ctx| async move {
            c.create_sandbox(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn destroy_sandbox(&self, sandbox_id: &str) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = DestroySandboxRequest {
            sandbox_id: sandbox_id.to_string(),
            ..Default::default()
        };
        self.call("DestroySandbox", t, |c, ctx| async move {
            c.destroy_sandbox(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Asks the agent to stop everything and power off. The VMM exits after.
    /// Stops every guest process (SIGTERM, `grace`, SIGKILL) and syncs; the
    /// answer comes when that is done, and the guest then powers off.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), ClientError> {
        // The agent answers after the grace and its SIGKILL round.
        let t = self.opts.call_timeout + grace + Duration::from_secs(2);
        let req = ShutdownRequest {
            grace_seconds: grace.as_secs() as u32,
            ..Default::default()
        };
        self.call("Shutdown", t, |c, ctx| async move {
            c.shutdown(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Creates a container from an OCI spec (JSON); see `agent.proto`.
    /// `stdin`: the host will attach a stdin stream.
    pub async fn create_container(
        &self,
        id: &str,
        oci_spec: Vec<u8>,
        stdin: bool,
    ) -> Result<(), ClientError> {
        self.create_container_with(CreateContainerRequest {
            container_id: id.to_string(),
            oci_spec,
            stdin,
            ..Default::default()
        })
        .await
    }

    /// CreateContainer with every field of the request (e.g. rootfs_overlay).
    pub async fn create_container_with(
        &self,
        req: CreateContainerRequest,
    ) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        self.call("CreateContainer", t, |c, ctx| async move {
            c.create_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = container_req(id);
        self.call("StartContainer", t, |c, ctx| async move {
            c.start_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Starts another process in a running container. `process` is an OCI
    /// `process` object (JSON); attach its streams before calling.
    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdin: bool,
    ) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            process,
            stdin,
            ..Default::default()
        };
        self.call("ExecProcess", t, |c, ctx| async move {
            c.exec_process(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Waits, without a deadline, for a process (exec_id "" is the
    /// container's own) to end and its output to arrive; returns its exit
    /// status (128 + signal if killed).
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<i32, ClientError> {
        let req = process_req(id, exec_id);
        // A day: the process decides how long this takes.
        let t = Duration::from_secs(86_400);
        self.call("WaitProcess", t, |c, ctx| async move {
            c.wait_process(ctx, &req).await
        })
        .await
        .map(|r| r.status)
    }

    pub async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
    ) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = SignalProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal: signal as u32,
            ..Default::default()
        };
        self.call("SignalProcess", t, |c, ctx| async move {
            c.signal_process(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Signals every process of the container (containerd's Kill all=true).
    pub async fn signal_all(&self, id: &str, signal: i32) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = SignalProcessRequest {
            container_id: id.to_string(),
            signal: signal as u32,
            all: true,
            ..Default::default()
        };
        self.call("SignalProcess", t, |c, ctx| async move {
            c.signal_process(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Forgets an exec'd process that has ended, freeing its id.
    pub async fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = process_req(id, exec_id);
        self.call("RemoveProcess", t, |c, ctx| async move {
            c.remove_process(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = process_req(id, exec_id);
        self.call("CloseStdin", t, |c, ctx| async move {
            c.close_stdin(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn tty_resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = TtyWinResizeRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            rows,
            columns,
            ..Default::default()
        };
        self.call("TtyWinResize", t, |c, ctx| async move {
            c.tty_win_resize(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// The container's pids, as the guest numbers them.
    pub async fn list_processes(&self, id: &str) -> Result<Vec<u32>, ClientError> {
        let t = self.opts.call_timeout;
        let req = container_req(id);
        self.call("ListProcesses", t, |c, ctx| async move {
            c.list_processes(ctx, &req).await
        })
        .await
        .map(|r| r.pids)
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse, ClientError> {
        let t = self.opts.call_timeout;
        let req = container_req(id);
        self.call("StatsContainer", t, |c, ctx| async move {
            c.stats_container(ctx, &req).await
        })
        .await
    }

    /// New cgroup limits: an OCI `linux.resources` object (JSON).
    pub async fn update(&self, id: &str, resources: Vec<u8>) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = UpdateContainerRequest {
            container_id: id.to_string(),
            resources,
            ..Default::default()
        };
        self.call("UpdateContainer", t, |c, ctx| async move {
            c.update_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn pause(&self, id: &str) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = container_req(id);
        self.call("PauseContainer", t, |c, ctx| async move {
            c.pause_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn resume(&self, id: &str) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = container_req(id);
        self.call("ResumeContainer", t, |c, ctx| async move {
            c.resume_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Waits, without a deadline, for the next OOM kill in any container of
    /// the sandbox and names the container.
    pub async fn oom_event(&self) -> Result<String, ClientError> {
        let t = Duration::from_secs(86_400);
        let req = OomEventRequest::default();
        self.call("GetOomEvent", t, |c, ctx| async move {
            c.get_oom_event(ctx, &req).await
        })
        .await
        .map(|r| r.container_id)
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), ClientError> {
        let t = self.opts.call_timeout;
        let req = container_req(id);
        self.call("RemoveContainer", t, |c, ctx| async move {
            c.remove_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Opens the host end of one stdio stream of a process (exec_id
    /// [`INIT_PROCESS`](husk_agent_api::INIT_PROCESS) ("") is the container's own). Attach before
    /// StartContainer / ExecProcess to miss nothing.
    pub async fn attach(
        &self,
        id: &str,
        exec_id: &str,
        stream: Stream,
    ) -> Result<tokio::net::UnixStream, ClientError> {
        use tokio::io::AsyncWriteExt;
        // Checked before connecting: an id the line cannot carry fails here.
        let line = stdio::Handshake::new(id, exec_id, stream).to_line()?;
        let mut s = vsock::connect_patiently(
            &self.opts.vsock_socket,
            husk_agent_api::STDIO_PORT,
            self.opts.call_timeout,
        )
        .await?;
        s.write_all(line.as_bytes()).await.map_err(|source| {
            ClientError::Handshake(HandshakeError::Io {
                port: husk_agent_api::STDIO_PORT,
                source,
            })
        })?;
        Ok(s)
    }
}

fn container_req(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.to_string(),
        ..Default::default()
    }
}

fn process_req(id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_tail_is_bounded_and_defanged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut text = "x".repeat(100_000);
        text.push('\n');
        text.push_str("boot\n\x1b]0;owned\x07 title\n");
        text.push_str(&"y".repeat(1000));
        std::fs::write(&p, text).unwrap();
        let tail = file_tail(&p, 2);
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "?]0;owned? title");
        assert_eq!(lines[1].len(), TAIL_LINE_CHARS);
        assert_eq!(file_tail(&p, 10).lines().count(), 3);
        assert_eq!(file_tail(&dir.path().join("absent"), 5), "");
    }
}
