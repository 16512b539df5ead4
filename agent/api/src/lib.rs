//! The husk-agent API, generated from `proto/agent.proto`.
//!
//! `agent` holds the messages, `agent_ttrpc` the async service trait
//! (`Agent`), its server binding (`create_agent`) and the client
//! (`AgentClient`). Beside them, the contracts the agent and the host
//! share: the ports, [`INIT_PROCESS`], the stdio handshake ([`stdio`]) and
//! OCI mount options ([`mount`]).

/// The vsock port the agent serves on (architecture convention).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The host port the agent's log stream connects to (guest-initiated; with
/// husk-vmm it arrives at `<vsock socket>_1025` on the host).
pub const LOG_PORT: u32 = 1025;

/// The vsock port for process stdio streams (see [`stdio`]).
pub const STDIO_PORT: u32 = 1026;

/// The exec id of a container's own (init) process, on every RPC and on
/// the host. (On the stdio handshake line it travels as "-": see
/// [`stdio::Handshake`].)
pub const INIT_PROCESS: &str = "";

pub mod mount;
pub mod stdio;

#[allow(clippy::all, missing_docs, unused, unknown_lints, dead_code, non_camel_case_types, non_snake_case, non_upper_case_globals, trivial_casts, unused_results, unused_mut)]
#[rustfmt::skip]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(clippy::all, missing_docs, unused, unknown_lints, dead_code, non_camel_case_types, non_snake_case, non_upper_case_globals, trivial_casts, unused_results, unused_mut)]
#[rustfmt::skip]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use protobuf;
pub use ttrpc;
