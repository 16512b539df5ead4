//! The host side of the husk-agent API, for the shim and the CLI.

pub mod client;
pub mod logs;
pub mod vsock;

pub use client::{Client, ClientError, ConnectOptions};
pub use husk_agent_api::stdio::Stream;
pub use husk_agent_api::{agent, AGENT_VSOCK_PORT, INIT_PROCESS, LOG_PORT, STDIO_PORT};

/// The status codes of refused calls ([`ClientError::Rpc`]'s `code`).
pub use husk_agent_api::ttrpc::Code as agent_api_code;
