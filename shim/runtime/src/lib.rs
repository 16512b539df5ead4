//! husk-runtime: the host side of Husk, one library under two thin front
//! ends (the containerd shim and the `husk` CLI).
//!
//! | module | concern |
//! | --- | --- |
//! | [`layout`] | `/run/husk/<sandbox>/`: every path, the share on both sides, the pid file |
//! | [`config`] | `/etc/husk/config.toml` |
//! | [`hypervisor`] | the husk-vmm process: `VmConfig`, ready fd, pidfd, control socket ([`hypervisor::Hypervisor`] at the seam) |
//! | [`agent`] | the guest agent's calls ([`agent::Agent`] at the seam) |
//! | [`sandbox`] | one VM per pod: boot, agent, guest log, OOM watch, teardown, stale cleanup |
//! | [`container`] | a container and its processes: state machine, share mounts, the guest spec, stdio relays |
//! | [`network`] | a pod's CNI network carried into the VM: taps, tc redirects, what the agent configures |
//! | [`image`] | the CLI's images: content store, layer unpacking, names, pulls |
//! | [`error`] | errors, and the one place each gets its ttrpc code |
//!
//! Locks: every lock here is a std mutex around a state enum or a map,
//! taken for an assignment or a lookup and never held across an await
//! (a VM boot, an agent call, blocking I/O).

pub mod agent;
pub mod config;
pub mod container;
pub mod error;
pub mod hypervisor;
pub mod image;
pub mod layout;
pub mod logging;
pub mod network;
pub mod sandbox;
pub mod template;

#[cfg(test)]
mod fake;

pub use agent::{Agent, INIT};
pub use container::{Container, ContainerConfig, Events, Exit, NoEvents, State, StdioConfig};
pub use error::{Error, Result};
pub use hypervisor::{HuskVmm, Hypervisor, VmSpec};
pub use sandbox::{Sandbox, SandboxSpec};
