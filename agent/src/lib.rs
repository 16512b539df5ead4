//! husk-agent: PID 1 of the Husk guest. It mounts what an init mounts, reaps
//! every process, and serves the agent API (`agent/api`) over ttrpc on vsock
//! port 1024 until the host asks it to shut down.

pub mod container;
pub mod init;
pub mod logging;
pub mod network;
pub mod reaper;
pub mod restored;
pub mod service;
pub mod shutdown;
pub mod warm;

/// The line boot tests and benchmarks wait for on the serial console.
pub const READY_MARKER: &str = "husk-agent: init reached";
