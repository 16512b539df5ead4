//! The device nodes `linux.devices` asks for.
//!
//! A container's `/dev` is a `nodev` tmpfs, so that a node the container
//! makes itself (with CAP_MKNOD) cannot be opened whatever the device
//! cgroup says. The spec's nodes are therefore made by the agent, before
//! the clone, in a staging directory on the guest's devtmpfs (which allows
//! devices and which no container sees), with the spec's mode and owner,
//! and the child binds each one into its `/dev` as it binds the default
//! devices: a bind keeps the source mount's permission to open a node. The
//! staging directory goes once the child has made its binds (or failed).
//! The device cgroup still decides what may be opened.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::process::ContainerError;
use super::spec::{DeviceNode, NodeKind};

/// Where the nodes are staged: on devtmpfs, root-only.
const STAGING: &str = "/dev/.husk-nodes";

/// Staged nodes; the directory is removed on drop.
#[derive(Debug)]
pub struct Staged {
    dir: PathBuf,
    /// The node for each entry of the spec's list, in its order.
    pub nodes: Vec<PathBuf>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing staged device nodes {}: {e}", self.dir.display());
        }
    }
}

fn prepare_err(what: &str, path: &Path, e: impl std::fmt::Display) -> ContainerError {
    ContainerError::Prepare(format!("{what} {}: {e}", path.display()))
}

/// Makes `nodes` in a fresh staging directory.
pub fn stage(nodes: &[DeviceNode]) -> Result<Staged, ContainerError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = Path::new(STAGING);
    if let Err(e) = std::fs::create_dir(base) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(prepare_err("making", base, e));
        }
    }
    std::fs::set_permissions(base, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| prepare_err("chmod", base, e))?;
    let dir = base.join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
    // Left over by an agent that died mid-create: start clean.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| prepare_err("making", &dir, e))?;
    let mut staged = Staged {
        dir,
        nodes: Vec::with_capacity(nodes.len()),
    };
    for (i, n) in nodes.iter().enumerate() {
        let path = staged.dir.join(i.to_string());
        make(&path, n)
            .map_err(|e| prepare_err(&format!("making /dev/{} as", n.path.display()), &path, e))?;
        staged.nodes.push(path);
    }
    Ok(staged)
}

fn make(path: &Path, n: &DeviceNode) -> nix::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let kind = match n.kind {
        NodeKind::Char => SFlag::S_IFCHR,
        NodeKind::Block => SFlag::S_IFBLK,
        NodeKind::Fifo => SFlag::S_IFIFO,
    };
    let dev = makedev(u64::from(n.major), u64::from(n.minor));
    mknod(path, kind, Mode::empty(), dev)?;
    // The owner first: chown clears the mode's set-id bits (none here, but
    // the order is the safe one).
    std::os::unix::fs::lchown(path, Some(n.uid), Some(n.gid))
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    nix::sys::stat::fchmodat(
        None,
        path,
        Mode::from_bits_truncate(n.mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
}

/// The directories below `/dev` the nodes need (`net` for `net/tun`),
/// parents first, each once.
pub fn parent_dirs(nodes: &[DeviceNode]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for n in nodes {
        let mut p = PathBuf::new();
        let parts: Vec<_> = n.path.components().collect();
        for c in &parts[..parts.len().saturating_sub(1)] {
            p.push(c);
            if !dirs.contains(&p) {
                dirs.push(p.clone());
            }
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str) -> DeviceNode {
        DeviceNode {
            path: path.into(),
            kind: NodeKind::Char,
            major: 10,
            minor: 200,
            mode: 0o666,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn parents_come_first_and_once() {
        let dirs = parent_dirs(&[
            node("net/tun"),
            node("fuse"),
            node("dri/by-path/x"),
            node("net/y"),
        ]);
        assert_eq!(
            dirs,
            [PathBuf::from("net"), "dri".into(), "dri/by-path".into()]
        );
    }
}
