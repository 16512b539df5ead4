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

/// A file under `root` with no symlink on the way; `None` otherwise.
fn read_in_root(root: &Path, rel: &str) -> Option<String> {
    let mut p = root.to_path_buf();
    for c in rel.split('/') {
        p.push(c);
        if std::fs::symlink_metadata(&p).ok()?.file_type().is_symlink() {
            return None;
        }
    }
    // Small files only: an image is not a place for a 1 GB /etc/group.
    let meta = std::fs::metadata(&p).ok()?;
    if meta.len() > 4 << 20 {
        return None;
    }
    std::fs::read_to_string(&p).ok()
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
    }
}
