//! The pod's host cgroup: where the shim and husk-vmm run, so that the
//! kubelet sees (and limits) what a pod really costs the host, guest memory
//! included. Kata places its VMM the same way.
//!
//! The path is the sandbox spec's `linux.cgroupsPath` as CRI's cgroupfs
//! driver writes it (`/kubepods/.../pod<uid>/<id>`, or `/k8s.io/<id>`
//! without a parent). The shim joins it before the VM starts, so husk-vmm
//! is born in it and every page of guest memory is charged there from the
//! first touch. Both cgroup v2 and v1 hosts (this project's machines are
//! v1): on v1 every mounted hierarchy gets the same path. Leaving moves the
//! shim back to the root and removes the directories (empty by then: the
//! VM has ended).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const ROOT: &str = "/sys/fs/cgroup";

/// The pod's cgroup on every hierarchy this host mounts.
#[derive(Debug)]
pub struct HostCgroup {
    /// (hierarchy root, the pod's directory in it, whether we made it).
    dirs: Vec<(PathBuf, PathBuf, bool)>,
}

/// A cgroupfs path from a spec: absolute, plain components only. A
/// systemd-driver path (`slice:prefix:name`) is not one: `None`.
pub fn cgroupfs_path(p: &str) -> Option<PathBuf> {
    let rest = p.strip_prefix('/')?;
    let ok = !p.contains(':')
        && rest
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
    ok.then(|| PathBuf::from(p))
}

/// The hierarchies to place a process in: the unified one on a v2 host;
/// on v1 each mounted controller directory once (`cpu` and `cpuacct` are
/// links to `cpu,cpuacct`).
fn hierarchies(root: &Path) -> Vec<PathBuf> {
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let mut out: Vec<PathBuf> = Vec::new();
    if let Ok(rd) = fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() && p.join("cgroup.procs").exists() && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

impl HostCgroup {
    /// Moves this process into `path` (made where missing) on every
    /// hierarchy; what it started after this is born there.
    pub fn join(path: &Path) -> Result<HostCgroup> {
        Self::join_under(Path::new(ROOT), path)
    }

    fn join_under(root: &Path, path: &Path) -> Result<HostCgroup> {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let mut cg = HostCgroup { dirs: Vec::new() };
        for h in hierarchies(root) {
            let dir = h.join(rel);
            let made = !dir.exists();
            if let Err(e) = fs::create_dir_all(&dir) {
                cg.leave();
                return Err(Error::io("creating the pod's cgroup", dir)(e));
            }
            cg.dirs.push((h.clone(), dir.clone(), made));
            if let Err(e) = fs::write(dir.join("cgroup.procs"), std::process::id().to_string()) {
                cg.leave();
                return Err(Error::io("joining the pod's cgroup", dir)(e));
            }
        }
        Ok(cg)
    }

    /// Moves this process back to each hierarchy's root and removes the
    /// directories it made (a directory someone else made, or one still
    /// holding a process, stays).
    pub fn leave(&mut self) {
        for (h, dir, made) in self.dirs.drain(..).rev() {
            let _ = fs::write(h.join("cgroup.procs"), std::process::id().to_string());
            if made {
                if let Err(e) = fs::remove_dir(&dir) {
                    tracing::debug!(dir = %dir.display(), error = %e, "pod cgroup kept");
                }
            }
        }
    }

    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d, _)| d.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_cgroupfs_paths_are_taken() {
        assert_eq!(
            cgroupfs_path("/k8s.io/abc"),
            Some(PathBuf::from("/k8s.io/abc"))
        );
        assert!(cgroupfs_path("/kubepods/besteffort/pod1/abc").is_some());
        for bad in [
            "k8s.io/abc",
            "/",
            "/a/../b",
            "kubepods.slice:cri-containerd:abc",
            "/a/./b",
        ] {
            assert!(cgroupfs_path(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn v1_hierarchies_are_each_mounted_directory_once() {
        let t = tempfile::tempdir().unwrap();
        for d in ["memory", "cpu,cpuacct", "pids"] {
            fs::create_dir(t.path().join(d)).unwrap();
            fs::write(t.path().join(d).join("cgroup.procs"), "").unwrap();
        }
        std::os::unix::fs::symlink("cpu,cpuacct", t.path().join("cpu")).unwrap();
        fs::create_dir(t.path().join("not-a-hierarchy")).unwrap();
        let h = hierarchies(t.path());
        assert_eq!(h.len(), 3, "{h:?}");
        let v2 = tempfile::tempdir().unwrap();
        fs::write(v2.path().join("cgroup.controllers"), "cpu memory").unwrap();
        assert_eq!(hierarchies(v2.path()), vec![v2.path().to_path_buf()]);
    }
}
