//! The guest agent at the seam: the calls the sandbox and container logic
//! make, as a trait, so that logic is tested with a fake agent. The real
//! one is `husk_agent_client::Client` (ttrpc over vsock).

use async_trait::async_trait;
use husk_agent_client::agent::{
    CreateContainerRequest, CreateSandboxRequest, StatsContainerResponse,
};
use husk_agent_client::{Client, ClientError};
use tokio::net::UnixStream;

pub use husk_agent_api::stdio::Stream;

type R<T> = Result<T, ClientError>;

/// What the host asks of a guest agent. `exec_id` [`INIT`] is a
/// container's own process.
#[async_trait]
pub trait Agent: Send + Sync {
    async fn create_sandbox(&self, req: CreateSandboxRequest) -> R<()>;
    async fn shutdown(&self, grace: std::time::Duration) -> R<()>;
    async fn create_container(&self, req: CreateContainerRequest) -> R<()>;
    async fn start_container(&self, id: &str) -> R<()>;
    async fn remove_container(&self, id: &str) -> R<()>;
    async fn exec_process(&self, id: &str, exec_id: &str, process: Vec<u8>, stdin: bool) -> R<()>;
    /// Waits, without a deadline, for a process to end and its output to
    /// have left the guest; its exit status (128 + signal when killed).
    async fn wait_process(&self, id: &str, exec_id: &str) -> R<i32>;
    async fn signal_process(&self, id: &str, exec_id: &str, signal: i32) -> R<()>;
    /// Every process of the container, orphans included.
    async fn signal_all(&self, id: &str, signal: i32) -> R<()>;
    async fn remove_process(&self, id: &str, exec_id: &str) -> R<()>;
    async fn close_stdin(&self, id: &str, exec_id: &str) -> R<()>;
    async fn tty_resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> R<()>;
    async fn list_processes(&self, id: &str) -> R<Vec<u32>>;
    async fn stats(&self, id: &str) -> R<StatsContainerResponse>;
    async fn update(&self, id: &str, resources: Vec<u8>) -> R<()>;
    async fn pause(&self, id: &str) -> R<()>;
    async fn resume(&self, id: &str) -> R<()>;
    /// Waits for the next OOM kill in the guest; the container's id.
    async fn oom_event(&self) -> R<String>;
    /// The host end of one stdio stream of a process. Attach before the
    /// process starts to miss nothing.
    async fn attach(&self, id: &str, exec_id: &str, stream: Stream) -> R<UnixStream>;
}

/// The init process's exec id (the agent API's one constant).
pub const INIT: &str = husk_agent_api::INIT_PROCESS;

#[async_trait]
impl Agent for Client {
    async fn create_sandbox(&self, req: CreateSandboxRequest) -> R<()> {
        Client::create_sandbox(self, req).await
    }
    async fn shutdown(&self, grace: std::time::Duration) -> R<()> {
        Client::shutdown(self, grace).await
    }
    async fn create_container(&self, req: CreateContainerRequest) -> R<()> {
        Client::create_container_with(self, req).await
    }
    async fn start_container(&self, id: &str) -> R<()> {
        Client::start_container(self, id).await
    }
    async fn remove_container(&self, id: &str) -> R<()> {
        Client::remove_container(self, id).await
    }
    async fn exec_process(&self, id: &str, exec_id: &str, process: Vec<u8>, stdin: bool) -> R<()> {
        Client::exec_process(self, id, exec_id, process, stdin).await
    }
    async fn wait_process(&self, id: &str, exec_id: &str) -> R<i32> {
        Client::wait_process(self, id, exec_id).await
    }
    async fn signal_process(&self, id: &str, exec_id: &str, signal: i32) -> R<()> {
        Client::signal_process(self, id, exec_id, signal).await
    }
    async fn signal_all(&self, id: &str, signal: i32) -> R<()> {
        Client::signal_all(self, id, signal).await
    }
    async fn remove_process(&self, id: &str, exec_id: &str) -> R<()> {
        Client::remove_process(self, id, exec_id).await
    }
    async fn close_stdin(&self, id: &str, exec_id: &str) -> R<()> {
        Client::close_stdin(self, id, exec_id).await
    }
    async fn tty_resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> R<()> {
        Client::tty_resize(self, id, exec_id, rows, columns).await
    }
    async fn list_processes(&self, id: &str) -> R<Vec<u32>> {
        Client::list_processes(self, id).await
    }
    async fn stats(&self, id: &str) -> R<StatsContainerResponse> {
        Client::stats(self, id).await
    }
    async fn update(&self, id: &str, resources: Vec<u8>) -> R<()> {
        Client::update(self, id, resources).await
    }
    async fn pause(&self, id: &str) -> R<()> {
        Client::pause(self, id).await
    }
    async fn resume(&self, id: &str) -> R<()> {
        Client::resume(self, id).await
    }
    async fn oom_event(&self) -> R<String> {
        Client::oom_event(self).await
    }
    async fn attach(&self, id: &str, exec_id: &str, stream: Stream) -> R<UnixStream> {
        Client::attach(self, id, exec_id, stream).await
    }
}
