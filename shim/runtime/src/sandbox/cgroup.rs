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
    /// (where this process was, the pod's directory, whether we made it).
    dirs: Vec<(PathBuf, PathBuf, bool)>,
}

/// Where this process is in hierarchy `h` (a directory under `root`), from
/// `/proc/self/cgroup`: `0::/path` on v2, `N:controllers:/path` on v1 (the
/// mount's directory is named for its controllers). The root when unknown.
fn current_in(root: &Path, h: &Path, proc_cgroup: &str) -> PathBuf {
    let name = h
        .strip_prefix(root)
        .ok()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let found = proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = if name.is_empty() {
            ctrls.is_empty()
        } else {
            let mut a: Vec<&str> = ctrls.split(',').collect();
            let mut b: Vec<&str> = name.split(',').collect();
            a.sort_unstable();
            b.sort_unstable();
            a == b
        };
        hit.then(|| path.trim_start_matches('/').to_string())
    });
    match found {
        Some(p) if !p.split('/').any(|c| c == "..") => h.join(p),
        _ => h.to_path_buf(),
    }
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
/// links to `cpu,cpuacct`), not systemd's own named hierarchy nor the
/// hybrid layout's `unified` (both are the service manager's, as runc
/// leaves them).
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
            let name = e.file_name();
            if meta.is_dir()
                && name != "systemd"
                && name != "unified"
                && p.join("cgroup.procs").exists()
                && !out.contains(&p)
            {
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
        let proc_cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        for h in hierarchies(root) {
            let was = current_in(root, &h, &proc_cgroup);
            let dir = h.join(rel);
            let made = !dir.exists();
            if let Err(e) = fs::create_dir_all(&dir) {
                cg.leave();
                return Err(Error::io("creating the pod's cgroup", dir)(e));
            }
            cg.dirs.push((was, dir.clone(), made));
            // A v1 cpuset child starts with no CPUs and no memory nodes and
            // takes no process until given them: its parent's, level by level.
            for level in rel
                .ancestors()
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .skip(1)
            {
                let (d, parent) = (h.join(level), h.join(level).parent().map(Path::to_path_buf));
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let empty = fs::read_to_string(d.join(f)).is_ok_and(|v| v.trim().is_empty());
                    if let (true, Some(parent)) = (empty, &parent) {
                        if let Ok(v) = fs::read_to_string(parent.join(f)) {
                            let _ = fs::write(d.join(f), v.trim());
                        }
                    }
                }
            }
            if let Err(e) = fs::write(dir.join("cgroup.procs"), std::process::id().to_string()) {
                cg.leave();
                return Err(Error::io("joining the pod's cgroup", dir)(e));
            }
        }
        Ok(cg)
    }

    /// Moves this process back where it was and removes the directories
    /// it made (a directory someone else made, or one still holding a
    /// process, stays).
    pub fn leave(&mut self) {
        for (was, dir, made) in self.dirs.drain(..).rev() {
            let _ = fs::write(was.join("cgroup.procs"), std::process::id().to_string());
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
    fn a_process_goes_back_where_it_was() {
        let root = Path::new("/sys/fs/cgroup");
        let v1 = "4:memory:/process_api/a3\n2:cpu,cpuacct:/\n1:name=systemd:/x\n0::/";
        assert_eq!(
            current_in(root, &root.join("memory"), v1),
            root.join("memory/process_api/a3")
        );
        assert_eq!(
            current_in(root, &root.join("cpuacct,cpu"), v1),
            root.join("cpuacct,cpu")
        );
        let v2 = "0::/system.slice/containerd.service\n";
        assert_eq!(
            current_in(root, root, v2),
            root.join("system.slice/containerd.service")
        );
        assert_eq!(current_in(root, root, "0::/../x"), root.to_path_buf());
    }

    #[test]
    fn a_v1_cpuset_child_gets_its_parents_cpus_and_nodes() {
        let t = tempfile::tempdir().unwrap();
        let h = t.path().join("cpuset");
        fs::create_dir(&h).unwrap();
        for (f, v) in [
            ("cgroup.procs", ""),
            ("cpuset.cpus", "0-1\n"),
            ("cpuset.mems", "0\n"),
        ] {
            fs::write(h.join(f), v).unwrap();
        }
        // What the kernel does on mkdir there: empty cpuset files.
        for d in ["k8s.io", "k8s.io/pod1"] {
            fs::create_dir(h.join(d)).unwrap();
            fs::write(h.join(d).join("cpuset.cpus"), "").unwrap();
            fs::write(h.join(d).join("cpuset.mems"), "").unwrap();
        }
        let mut cg = HostCgroup::join_under(t.path(), Path::new("/k8s.io/pod1")).unwrap();
        assert_eq!(
            fs::read_to_string(h.join("k8s.io/pod1/cpuset.cpus")).unwrap(),
            "0-1"
        );
        assert_eq!(
            fs::read_to_string(h.join("k8s.io/cpuset.mems")).unwrap(),
            "0"
        );
        assert_eq!(
            fs::read_to_string(h.join("k8s.io/pod1/cgroup.procs")).unwrap(),
            std::process::id().to_string()
        );
        cg.leave();
    }

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
        std::fs::create_dir(t.path().join("systemd")).unwrap();
        fs::write(t.path().join("systemd").join("cgroup.procs"), "").unwrap();
        assert_eq!(
            hierarchies(t.path()).len(),
            3,
            "systemd's own hierarchy is not ours"
        );
        let v2 = tempfile::tempdir().unwrap();
        fs::write(v2.path().join("cgroup.controllers"), "cpu memory").unwrap();
        assert_eq!(hierarchies(v2.path()), vec![v2.path().to_path_buf()]);
    }
}
