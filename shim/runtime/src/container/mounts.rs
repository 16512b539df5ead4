//! Host mounts into the sandbox share: a container's rootfs (the mounts
//! containerd passes in Create, overlay or bind) and its volumes (binds).
//! They are made in the host's mount namespace, in the host-only tree
//! `mounts/` that the share is a read-only slave of (the guest writes
//! through virtio-fs into the share, never into `mounts/`), on file
//! descriptors ([`fdmount`]); husk-vmm's virtio-fs server sees them by
//! propagation. They are found again by path in /proc/self/mountinfo so
//! that a crashed shim's leftovers can be unmounted by the next `delete`.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::fdmount::{self, Attrs, Kind};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {kind} {what} on {target}: {errno}")]
    Mount {
        kind: String,
        what: String,
        target: PathBuf,
        errno: nix::Error,
    },
    #[error("unmounting {target}: {errno}")]
    Unmount { target: PathBuf, errno: nix::Error },
    #[error("preparing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One mount as containerd describes it (types.Mount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// A mount to make in the sandbox share before a container is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareMount {
    /// One of containerd's rootfs mounts (overlay, or a bind).
    Host { mount: HostMount, target: PathBuf },
    /// A host file or directory (a volume, or `ctr run --rootfs DIR`).
    Bind {
        source: PathBuf,
        target: PathBuf,
        readonly: bool,
    },
}

impl ShareMount {
    /// Where in the share it goes (relative).
    pub fn target(&self) -> &Path {
        match self {
            ShareMount::Host { target, .. } | ShareMount::Bind { target, .. } => target,
        }
    }

    /// Makes the mount at `mounts/<target>`, in the host-only tree the share
    /// is a read-only slave of (see [`setup_share`]): the mount appears in
    /// the share by propagation, with the attributes it was made with.
    pub fn make(&self, mounts: &Path) -> Result<(), MountError> {
        match self {
            ShareMount::Host { mount, target } => mount_one(mount, mounts, target),
            ShareMount::Bind {
                source,
                target,
                readonly,
            } => bind(source, mounts, target, *readonly),
        }
    }
}

fn mount_err(kind: &str, source: &str, target: &Path, errno: nix::Error) -> MountError {
    MountError::Mount {
        kind: kind.into(),
        what: source.into(),
        target: target.into(),
        errno,
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let path = path.to_path_buf();
    move |source| MountError::Io { path, source }
}

fn errno_of(e: &std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Makes a container's rootfs, as the guest sees it in `share`, read-only
/// on the host (the spec's `root.readonly`), all the way down. Called once
/// the container's init has started: its agent first makes the mount points
/// the spec needs in the rootfs, as runc does before its own read-only
/// remount, and that remount guards the rootfs until then. From here on it
/// is no longer the only thing between a guest and the rootfs: the host
/// refuses the write too.
pub fn make_rootfs_readonly(share: &Path, id: &str) -> Result<(), MountError> {
    let target = crate::layout::in_share::rootfs(id);
    fdmount::set_attrs_beneath(share, &target, Attrs { readonly: true })
        .map_err(|e| mount_err("read-only", "rootfs", &share.join(&target), errno_of(&e)))
}

/// Mounts one containerd mount at `root/target` (a directory made here,
/// beneath `root` without following symlinks), nosuid and nodev.
pub fn mount_one(m: &HostMount, root: &Path, target: &Path) -> Result<(), MountError> {
    let full = root.join(target);
    // One parser for mount options, shared with the agent.
    let opts = husk_agent_api::mount::parse_options(&m.options);
    if opts.is_bind() {
        return bind(Path::new(&m.source), root, target, opts.is_readonly());
    }
    let fd = fdmount::ensure_beneath(root, target, Kind::Dir).map_err(io_err(&full))?;
    let data = opts.data.join(",");
    mount(
        Some(m.source.as_str()),
        &fdmount::proc_path(&fd),
        Some(m.kind.as_str()),
        opts.flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| mount_err(&m.kind, &m.source, &full, e))
}

/// Binds `source` (file or directory, with its submounts) at `root/target`,
/// creating the target beneath `root` without following symlinks; nosuid,
/// nodev, and read-only all the way down when `readonly`.
pub fn bind(source: &Path, root: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
    let full = root.join(target);
    let meta = std::fs::metadata(source).map_err(io_err(source))?;
    let kind = if meta.is_dir() { Kind::Dir } else { Kind::File };
    let fd = fdmount::ensure_beneath(root, target, kind).map_err(io_err(&full))?;
    let src = source.display().to_string();
    fdmount::bind(source, &fd, Attrs { readonly }).map_err(|e| {
        mount_err(
            if readonly { "bind (read-only)" } else { "bind" },
            &src,
            &full,
            errno_of(&e),
        )
    })
}

/// Makes `mounts` (host-only: the guest never sees it) a mount of its own
/// that propagates, and `share` (what virtio-fs serves) a read-only,
/// nosuid, nodev slave bind of it. The guest then cannot create, rename or
/// replace anything on the way to a mount point (the share's own
/// directories are read-only to it), the host makes every mount in a tree
/// the guest cannot write, and each mount reaches the share by propagation.
/// Both directories are made here; nothing is mounted yet below them.
pub fn setup_share(mounts: &Path, share: &Path) -> Result<(), MountError> {
    for d in [mounts, share] {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let none = None::<&str>;
    let step = |what: &str, src: Option<&Path>, target: &Path, flags: MsFlags| {
        mount(src, target, none, flags, none).map_err(|e| {
            mount_err(
                what,
                &src.map(|p| p.display().to_string()).unwrap_or_default(),
                target,
                e,
            )
        })
    };
    step("bind", Some(mounts), mounts, MsFlags::MS_BIND)?;
    // Its own peer group, not the one /run may be in.
    step("make-private", None, mounts, MsFlags::MS_PRIVATE)?;
    step("make-shared", None, mounts, MsFlags::MS_SHARED)?;
    step("bind", Some(mounts), share, MsFlags::MS_BIND)?;
    step("make-slave", None, share, MsFlags::MS_SLAVE)?;
    fdmount::set_attrs_at(share, Attrs { readonly: true }).map_err(|e| {
        mount_err(
            "read-only",
            &share.display().to_string(),
            share,
            errno_of(&e),
        )
    })
}

// Decodes the octal escapes mountinfo uses for spaces and the like (one
// decoder for the runtime and husk-vmm's mount jail).
use husk_vmm::confine::unescape_mount_path as unescape;

/// Mount points at or below `prefix`, deepest first, from mountinfo text.
pub fn mounts_below(mountinfo: &str, prefix: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|f| PathBuf::from(unescape(f)))
        .filter(|p| p.starts_with(prefix))
        .collect();
    // Children before parents; a path mounted twice appears twice.
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Mount points still at or below `prefix` in this mount namespace.
pub fn remaining_below(prefix: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| mounts_below(&info, prefix))
        .unwrap_or_default()
}

/// Unmounts everything at or below `prefix`. Busy mounts (husk-vmm's
/// virtio-fs may still hold files open) are detached lazily: they vanish
/// from the namespace now and are freed when the last file closes.
pub fn unmount_below(prefix: &Path) -> Result<usize, MountError> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| MountError::Io {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    let mut n = 0;
    for target in mounts_below(&info, prefix) {
        match umount2(&target, MntFlags::empty()) {
            Ok(()) => n += 1,
            Err(nix::Error::EBUSY) => {
                umount2(&target, MntFlags::MNT_DETACH).map_err(|errno| MountError::Unmount {
                    target: target.clone(),
                    errno,
                })?;
                n += 1;
            }
            // Gone already (a parent's unmount took it along).
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(errno) => return Err(MountError::Unmount { target, errno }),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 0:21 / / rw,relatime - ext4 /dev/vda1 rw
40 22 0:33 / /run/husk/p1/shared/c1/rootfs rw - overlay overlay rw,lowerdir=/a
41 40 0:34 / /run/husk/p1/shared/c1/rootfs/proc rw - proc proc rw
42 22 0:35 / /run/husk/p1/shared/c1/volumes/0 rw - ext4 /dev/vda1 rw
43 22 0:36 / /run/husk/p10/shared/x rw - ext4 /dev/vda1 rw
44 22 0:37 / /run/husk/p1/shared/my\\040dir rw - ext4 /dev/vda1 rw
";

    #[test]
    fn finds_mounts_below_a_prefix_deepest_first() {
        let m = mounts_below(INFO, Path::new("/run/husk/p1"));
        assert_eq!(m.len(), 4);
        assert_eq!(m[0], PathBuf::from("/run/husk/p1/shared/c1/rootfs/proc"));
        assert!(m.contains(&PathBuf::from("/run/husk/p1/shared/my dir")));
        assert!(!m.iter().any(|p| p.starts_with("/run/husk/p10")));
    }

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(unescape("end\\"), "end\\");
    }
}
