//! containerd-shim-husk-v2: the task service arrives with the shim issue.
//! Until then the binary exists so that the workspace layout is final and
//! containerd gets a clear answer instead of "not found".

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "containerd-shim-husk-v2 {} has no task service yet; use `husk` for now",
        env!("CARGO_PKG_VERSION")
    )
}
