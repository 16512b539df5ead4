//! How much disk a tree takes (`husk system df`), walked on file
//! descriptors: a container's writable layer is written by its guest, which
//! can turn any directory into a symlink while we walk, so every step is an
//! `openat` with `O_NOFOLLOW` beneath the directory already open, never a
//! path resolved again from the top.

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{openat, statat, AtFlags, Dir, FileType, Mode, OFlags, CWD};

/// How deep the walk goes: each level holds one descriptor, and a guest
/// can nest directories without end.
const MAX_DEPTH: usize = 128;

/// Bytes of disk (allocated blocks) under `root`, on `root`'s own file
/// system (mount points below are not entered); hard links count once.
/// A tree deeper than [`MAX_DEPTH`] is counted to that depth. A missing
/// `root` takes nothing.
pub fn disk_usage(root: &Path) -> std::io::Result<u64> {
    let fd = match openat(
        CWD,
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) if e == rustix::io::Errno::NOENT => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let st = rustix::fs::fstat(&fd)?;
    let mut walk = Walk {
        dev: st.st_dev,
        seen: HashSet::new(),
        total: st.st_blocks as u64 * 512,
    };
    walk.dir(fd, 0)?;
    Ok(walk.total)
}

struct Walk {
    dev: u64,
    seen: HashSet<(u64, u64)>,
    total: u64,
}

impl Walk {
    fn dir(&mut self, fd: OwnedFd, depth: usize) -> std::io::Result<()> {
        let mut subdirs = Vec::new();
        {
            let mut entries = Dir::read_from(&fd)?;
            while let Some(entry) = entries.read() {
                let entry = entry?;
                let name = entry.file_name();
                if name == c"." || name == c".." {
                    continue;
                }
                // Gone since it was listed: the guest may be deleting.
                let Ok(st) = statat(fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) else {
                    continue;
                };
                if st.st_dev != self.dev {
                    continue;
                }
                if st.st_nlink > 1 && !self.seen.insert((st.st_dev, st.st_ino)) {
                    continue;
                }
                self.total += st.st_blocks as u64 * 512;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory
                    && depth + 1 < MAX_DEPTH
                {
                    subdirs.push(name.to_owned());
                }
            }
        }
        for name in subdirs {
            // Swapped for a symlink or a file since: skipped, never followed.
            if let Ok(sub) = openat(
                fd.as_fd(),
                name.as_c_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                self.dir(sub, depth + 1)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_once_and_never_follows_links() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("big"), vec![1u8; 1 << 20]).unwrap();
        let empty = disk_usage(d.path()).unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), vec![1u8; 256 << 10]).unwrap();
        std::fs::hard_link(d.path().join("a/b/f"), d.path().join("a/f2")).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("a/link")).unwrap();
        let used = disk_usage(d.path()).unwrap() - empty;
        assert!(
            (256 << 10..(256 << 10) + (64 << 10)).contains(&used),
            "one 256 KiB file, its hard link once, no 1 MiB through the link: {used}"
        );
        assert_eq!(disk_usage(&d.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn a_root_that_is_a_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("l")).unwrap();
        assert!(disk_usage(&d.path().join("l")).is_err());
    }
}
