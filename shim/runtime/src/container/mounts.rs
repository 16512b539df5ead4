//! Host mounts into the sandbox share: a container's rootfs (the mounts
//! containerd passes in Create, overlay or bind) and its volumes (binds).
//! They are made in the host's mount namespace, where husk-vmm's virtio-fs
//! server sees them, and found again by path in /proc/self/mountinfo so that
//! a crashed shim's leftovers can be unmounted by the next `delete`.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

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

    /// Makes the mount at `share/<target>`.
    pub fn make(&self, share: &Path) -> Result<(), MountError> {
        let target = share.join(self.target());
        match self {
            ShareMount::Host { mount, .. } => mount_one(mount, &target),
            ShareMount::Bind {
                source, readonly, ..
            } => bind(source, &target, *readonly),
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

/// Mounts one containerd mount at `target` (a directory made here).
pub fn mount_one(m: &HostMount, target: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(|source| MountError::Io {
        path: target.into(),
        source,
    })?;
    // One parser for mount options, shared with the agent.
    let opts = husk_agent_api::mount::parse_options(&m.options);
    if opts.is_bind() {
        bind(Path::new(&m.source), target, opts.is_readonly())
    } else {
        let data = opts.data.join(",");
        mount(
            Some(m.source.as_str()),
            target,
            Some(m.kind.as_str()),
            opts.flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| mount_err(&m.kind, &m.source, target, e))
    }
}

/// Binds `source` (file or directory) at `target`, creating the target.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MountError::Io { path, source }
    };
    let meta = std::fs::metadata(source).map_err(io(source))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(target).map_err(io(target))?;
    } else if !target.exists() {
        std::fs::File::create(target).map_err(io(target))?;
    }
    let src = source.display().to_string();
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| mount_err("bind", &src, target, e))?;
    if readonly {
        // A bind ignores MS_RDONLY on creation; it takes a remount.
        if let Err(e) = mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(mount_err("bind (read-only)", &src, target, e));
        }
    }
    Ok(())
}

/// Decodes the octal escapes mountinfo uses for spaces and the like.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

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
