//! The user's entry in the container's own /etc/passwd and /etc/group: its
//! supplementary groups and its home, as runc and Docker give them. A spec
//! names the uid and gid as numbers; the groups a user belongs to in the
//! image come on top of `additionalGids`, and `HOME` is set when the spec's
//! environment lacks it.
//!
//! The files are read from the rootfs by the agent, so a path through a
//! symlink is not followed (the image could point it anywhere in the
//! guest); such an image gets no lookup, as if the files were missing.

use std::path::Path;

/// What the image says about a uid.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageUser {
    pub home: Option<String>,
    pub groups: Vec<u32>,
}

/// The most of either file read: an image is not a place for a 1 GB
/// /etc/group.
const MAX_FILE: u64 = 4 << 20;

/// A regular file under `root` reached with no symlink on the way; `None`
/// otherwise. Resolved on descriptors (openat2 in `root`, no symlinks), as
/// the image could swap a path under a walk by names; opened `O_PATH`
/// first, so that nothing but a regular file is ever opened for reading
/// (a FIFO there would hang the start, a device node act), then reopened
/// through `/proc/self/fd`, which names the same inode.
fn read_in_root(root: &Path, rel: &str) -> Option<String> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = std::fs::File::open(root).ok()?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = openat2(dir.as_raw_fd(), rel, how).ok()?;
    // SAFETY: openat2 just returned this descriptor; nothing else owns it.
    let path_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let proc_path = format!("/proc/self/fd/{}", path_fd.as_raw_fd());
    let meta = std::fs::metadata(&proc_path).ok()?;
    if !meta.file_type().is_file() || meta.len() > MAX_FILE {
        return None;
    }
    let file = std::fs::File::open(&proc_path).ok()?;
    let mut text = String::new();
    file.take(MAX_FILE).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Looks `uid` up in `root`'s /etc/passwd and /etc/group.
pub fn lookup(root: &Path, uid: u32, gid: u32) -> ImageUser {
    let passwd = read_in_root(root, "etc/passwd").unwrap_or_default();
    let entry = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse() == Ok(uid)).then(|| (f[0].to_string(), f[5].to_string()))
    });
    let Some((name, home)) = entry else {
        return ImageUser::default();
    };
    let group = read_in_root(root, "etc/group").unwrap_or_default();
    let mut groups: Vec<u32> = group
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || !f[3].split(',').any(|m| m == name) {
                return None;
            }
            f[2].parse::<u32>().ok()
        })
        .filter(|g| *g != gid)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    ImageUser {
        home: (!home.is_empty()).then_some(home),
        groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_home_come_from_the_image() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("etc/group"),
            "root:x:0:\nwheel:x:10:root,app\naudio:x:29:app\napp:x:1000:app\nbad\n",
        )
        .unwrap();
        let u = lookup(root.path(), 1000, 1000);
        assert_eq!(u.groups, [10, 29]);
        assert_eq!(u.home.as_deref(), Some("/home/app"));
        assert_eq!(lookup(root.path(), 0, 0).groups, [10]);
        assert_eq!(lookup(root.path(), 4242, 4242), ImageUser::default());
    }

    #[test]
    fn symlinked_files_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), "x:x:0:0::/secret:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc/passwd")).unwrap();
        assert_eq!(lookup(root.path(), 0, 0), ImageUser::default());
        // Nor a symlinked directory on the way.
        let real = tempfile::tempdir().unwrap();
        std::fs::write(real.path().join("passwd"), "x:x:0:0::/secret:/bin/sh\n").unwrap();
        let root2 = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(real.path(), root2.path().join("etc")).unwrap();
        assert_eq!(lookup(root2.path(), 0, 0), ImageUser::default());
    }

    #[test]
    fn a_fifo_or_a_directory_in_place_of_the_file_is_no_user_and_no_hang() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // Opened for reading, a FIFO with no writer would block forever.
        nix::unistd::mkfifo(
            &root.path().join("etc/passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert_eq!(lookup(root.path(), 0, 0), ImageUser::default());
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        std::fs::create_dir(root.path().join("etc/passwd")).unwrap();
        assert_eq!(lookup(root.path(), 0, 0), ImageUser::default());
    }

    #[test]
    fn files_are_read_up_to_their_bound() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let mut big = "root:x:0:0:root:/root:/bin/sh\n".to_string();
        big.push_str(&"#".repeat(MAX_FILE as usize));
        std::fs::write(root.path().join("etc/passwd"), big).unwrap();
        assert_eq!(lookup(root.path(), 0, 0), ImageUser::default());
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(lookup(root.path(), 0, 0).home.as_deref(), Some("/root"));
    }
}
