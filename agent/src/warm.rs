//! Work done once at start, ahead of any request. The host snapshots a
//! VM template once the agent answers, so whatever is done here every
//! clone of it has done already: each item below was measured as part of a
//! pod's first CreateSandbox or CreateContainer in a clone (2026-12-07,
//! nested test host: ~60-110 ms for `lo` over netlink, ~40-110 ms for the
//! vsock guard's compile, ~20-55 ms for the cgroup controllers, and the
//! device program's verification).

use crate::container::{cgroup, devices, seccomp};

/// Best effort: whatever fails here is done (and reported) again by the
/// request that needs it.
pub async fn warm_up() {
    if let Err(e) = seccomp::vsock_guard() {
        tracing::warn!("compiling the vsock guard: {e}");
    }
    if let Err(e) = cgroup::prepare() {
        tracing::debug!("preparing the containers' cgroup parent: {e}");
    }
    if let Err(e) = devices::preload() {
        tracing::debug!("loading the usual device programs: {e}");
    }
    if let Err(e) = crate::network::loopback_up().await {
        tracing::warn!("bringing lo up: {e}");
    }
}
