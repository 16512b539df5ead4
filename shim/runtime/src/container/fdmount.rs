//! Mounts made on file descriptors, never on paths walked twice.
//!
//! Every target is opened beneath a root directory with openat2
//! (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS), its
//! missing directories created one component at a time on the fd of the
//! one before, so a symlink anywhere on the way is refused rather than
//! followed. Binds are cloned with open_tree, get their attributes
//! (read-only, nosuid, nodev) on the whole detached tree with
//! mount_setattr(AT_RECURSIVE) before anything can see them, and are
//! attached with move_mount onto the target's fd; a mount that propagates
//! from there (the share is a slave of the host-only tree) carries those
//! attributes, because they were set before it was attached.
//!
//! rustix covers openat2, open_tree and move_mount; mount_setattr it does
//! not, so that one is a raw syscall here.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path};

use rustix::fs::{openat2, FileType, Mode, OFlags, ResolveFlags, CWD};
use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};

/// Nothing on the way out of the root, through a symlink, or through a
/// /proc magic link.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// What a mount point must be: a bind of a file needs a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Mount attributes (`MOUNT_ATTR_*`), set on a whole tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub readonly: bool,
}

impl Attrs {
    /// nosuid and nodev always: the host only serves these trees to the
    /// guest through virtio-fs, and a device node or setuid file the guest
    /// made in one must never act on the host.
    fn bits(self) -> u64 {
        let mut b = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
        if self.readonly {
            b |= libc::MOUNT_ATTR_RDONLY;
        }
        b
    }
}

fn invalid(rel: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: not a plain relative path", rel.display()),
    )
}

/// Opens `root/rel` as an O_PATH fd, creating what is missing (directories
/// on the way, the last component as `kind`), without ever leaving `root`
/// or following a symlink. `root` itself is the caller's, trusted.
pub fn ensure_beneath(root: &Path, rel: &Path, kind: Kind) -> io::Result<OwnedFd> {
    let names: Vec<&OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(invalid(rel)),
        })
        .collect::<io::Result<_>>()?;
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let mut cur = openat2(CWD, root, dir_flags, Mode::empty(), ResolveFlags::empty())?;
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        if last && kind == Kind::File {
            match rustix::fs::mknodat(
                &cur,
                *name,
                FileType::RegularFile,
                Mode::from_raw_mode(0o644),
                0,
            ) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let f = openat2(
                &cur,
                *name,
                OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
                BENEATH,
            )?;
            if FileType::from_raw_mode(rustix::fs::fstat(&f)?.st_mode) != FileType::RegularFile {
                return Err(io::Error::other(format!(
                    "{}: exists and is not a regular file",
                    rel.display()
                )));
            }
            return Ok(f);
        }
        match rustix::fs::mkdirat(&cur, *name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        cur = openat2(&cur, *name, dir_flags, Mode::empty(), BENEATH)?;
    }
    Ok(cur)
}

/// Sets `attrs` on every mount of the (detached or attached) tree at `fd`.
fn set_attrs(fd: &impl AsFd, attrs: Attrs) -> io::Result<()> {
    set_attrs_raw(
        fd.as_fd().as_raw_fd(),
        c"",
        libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
        attrs,
    )
}

/// mount_setattr(2) with `attrs` at `dirfd`/`path`: the one place the raw
/// syscall is made. It allocates nothing and touches only its own stack, so
/// a `pre_exec` closure (between fork and exec) may call it too.
pub fn set_attrs_raw(
    dirfd: std::os::fd::RawFd,
    path: &std::ffi::CStr,
    flags: libc::c_int,
    attrs: Attrs,
) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: attrs.bits(),
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads `size` bytes from `attr`, a live struct of
    // exactly that size, and the NUL-terminated `path`; `dirfd` is the
    // caller's (AT_FDCWD or an fd it holds). It changes only mount flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Binds `source` (with everything mounted below it) onto the O_PATH
/// `target`, with `attrs` on every mount of the copy.
pub fn bind(source: &Path, target: &OwnedFd, attrs: Attrs) -> io::Result<()> {
    let tree = open_tree(
        CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )?;
    set_attrs(&tree, attrs)?;
    move_mount(
        &tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?;
    Ok(())
}

/// Sets `attrs` on the mount at `path` and everything below it (the path
/// is the caller's own, not in a guest-writable tree).
pub fn set_attrs_at(path: &Path, attrs: Attrs) -> io::Result<()> {
    let fd = openat2(
        CWD,
        path,
        OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::empty(),
    )?;
    set_attrs(&fd, attrs)
}

/// Sets `attrs` on the mount rooted at `root/rel` and everything below it.
/// `rel` is resolved beneath `root` without following a symlink, and must
/// name a mount's root: `root` may be a tree the guest sees, and the call
/// must never reach the mount `root` itself is on, or leave it.
pub fn set_attrs_beneath(root: &Path, rel: &Path, attrs: Attrs) -> io::Result<()> {
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(invalid(rel));
    }
    let dir = openat2(
        CWD,
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::empty(),
    )?;
    let fd = openat2(
        &dir,
        rel,
        OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        BENEATH,
    )?;
    let st = rustix::fs::statx(
        &fd,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::empty(),
    )?;
    let root = rustix::fs::StatxAttributes::MOUNT_ROOT;
    if !st.stx_attributes_mask.contains(root) || !st.stx_attributes.contains(root) {
        return Err(io::Error::other(format!(
            "{}: not a mount point",
            rel.display()
        )));
    }
    set_attrs(&fd, attrs)
}

/// The path the kernel resolves back to `fd` itself, for the mount(2)
/// calls that take no fd (a new overlay).
pub fn proc_path(fd: &OwnedFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_directories_and_a_file_beneath_the_root() {
        let t = tempfile::tempdir().unwrap();
        ensure_beneath(t.path(), Path::new("c1/volumes/0"), Kind::Dir).unwrap();
        assert!(t.path().join("c1/volumes/0").is_dir());
        ensure_beneath(t.path(), Path::new("c1/volumes/1"), Kind::File).unwrap();
        assert!(t.path().join("c1/volumes/1").is_file());
        // Again: what exists is fine.
        ensure_beneath(t.path(), Path::new("c1/volumes/1"), Kind::File).unwrap();
    }

    #[test]
    fn a_symlink_on_the_way_or_at_the_end_is_refused_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("c1")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("c1/volumes")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("x"), t.path().join("c1/dangling")).unwrap();
        std::os::unix::fs::symlink("/proc/self/cwd", t.path().join("c1/proc")).unwrap();
        for (rel, kind) in [
            ("c1/volumes/0", Kind::Dir),
            ("c1/volumes", Kind::Dir),
            ("c1/dangling", Kind::File),
            ("c1/dangling", Kind::Dir),
            ("c1/proc/y", Kind::Dir),
        ] {
            assert!(
                ensure_beneath(t.path(), Path::new(rel), kind).is_err(),
                "{rel} {kind:?}"
            );
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn dot_dot_and_absolute_paths_are_refused() {
        let t = tempfile::tempdir().unwrap();
        for rel in ["../x", "/etc", "a/../../x"] {
            assert!(
                ensure_beneath(t.path(), Path::new(rel), Kind::Dir).is_err(),
                "{rel}"
            );
        }
    }

    #[test]
    fn an_existing_directory_is_not_a_file_target() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        assert!(ensure_beneath(t.path(), Path::new("a/b"), Kind::File).is_err());
    }

    /// Making a rootfs read-only must land on its mount and nowhere else:
    /// a plain directory (the share's own mount would take the flags), a
    /// symlink (the guest's), or a path that climbs out are refused.
    #[test]
    fn attrs_beneath_only_reach_a_mount_root_beneath() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("c1/rootfs")).unwrap();
        std::os::unix::fs::symlink("/proc", t.path().join("c1/link")).unwrap();
        let ro = Attrs { readonly: true };
        let e = set_attrs_beneath(t.path(), Path::new("c1/rootfs"), ro).unwrap_err();
        assert!(e.to_string().contains("not a mount point"), "{e}");
        for rel in ["c1/link", "../x", "/proc", "c1/../../x"] {
            assert!(
                set_attrs_beneath(t.path(), Path::new(rel), ro).is_err(),
                "{rel}"
            );
        }
    }
}
