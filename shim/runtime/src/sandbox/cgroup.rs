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

/// What the runtime limits in a cgroup of its own making: the CLI's VMs,
/// which have no kubelet to size their cgroup (a pod's cgroup is the
/// kubelet's to limit, and husk only joins it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory of every process in it (husk-vmm with guest RAM, the CLI or
    /// monitor that runs it), page cache included; the kernel reclaims the
    /// cache before it kills.
    pub memory_bytes: u64,
}

/// Host memory a CLI VM's cgroup allows beyond its guest RAM: husk-vmm
/// itself (a few MiB), the CLI or monitor that runs it, and the page cache
/// they keep (reclaimed first).
pub const VM_OVERHEAD_MIB: u64 = 256;

impl Limits {
    /// The limits of a VM of `memory_mib` guest RAM.
    pub fn for_vm(memory_mib: u32) -> Limits {
        Limits {
            memory_bytes: (u64::from(memory_mib) + VM_OVERHEAD_MIB) << 20,
        }
    }
}

/// The cgroup (cgroupfs path) of the CLI's VM `id`, on every hierarchy:
/// `/husk/<id>`, as docker's are `/docker/<id>`.
pub fn cli_vm_path(id: &str) -> PathBuf {
    Path::new("/husk").join(id)
}

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
    pub fn join(path: &Path, limits: Option<Limits>) -> Result<HostCgroup> {
        Self::join_under(Path::new(ROOT), path, limits)
    }

    fn join_under(root: &Path, path: &Path, limits: Option<Limits>) -> Result<HostCgroup> {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let mut cg = HostCgroup { dirs: Vec::new() };
        let mut limited = false;
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
            if let Some(l) = limits {
                match set_limits(&h, rel, l) {
                    Ok(set) => limited |= set,
                    Err(e) => {
                        cg.leave();
                        return Err(Error::io("limiting the VM's cgroup", dir)(e));
                    }
                }
            }
        }
        // Before any process is in it: a limit that could not be set is an
        // error, never a VM run without it.
        if limits.is_some() && !limited {
            cg.leave();
            return Err(Error::io("limiting the VM's cgroup", root.join(rel))(
                std::io::Error::other("this host mounts no cgroup memory controller"),
            ));
        }
        for (_, dir, _) in cg.dirs.clone() {
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

/// Sets `l` on `h/rel`. On v2 the memory controller is first enabled for
/// the children of every level above it, from the hierarchy's root down
/// (the levels below the root are the runtime's own, holding no process,
/// as v2 requires of a level that hands controllers down).
/// Whether this hierarchy holds the limit (v1's others have no memory).
fn set_limits(h: &Path, rel: &Path, l: Limits) -> std::io::Result<bool> {
    let dir = h.join(rel);
    if h.join("cgroup.controllers").exists() {
        let mut level = h.to_path_buf();
        for c in rel.components() {
            let have = fs::read_to_string(level.join("cgroup.subtree_control")).unwrap_or_default();
            if !have.split_whitespace().any(|c| c == "memory") {
                fs::write(level.join("cgroup.subtree_control"), "+memory")?;
            }
            level.push(c);
        }
        fs::write(dir.join("memory.max"), l.memory_bytes.to_string())?;
        return Ok(true);
    }
    // v1: only the memory hierarchy has the file.
    let v1 = dir.join("memory.limit_in_bytes");
    if !v1.exists() {
        return Ok(false);
    }
    fs::write(v1, l.memory_bytes.to_string())?;
    Ok(true)
}

/// How long [`remove_stale`] waits for a dying VM to leave its cgroup.
const STALE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes what a VM's cgroup left at `path` on every hierarchy (the CLI's
/// `rm`, or its next command, after the process that ran the VM was
/// killed): only empty directories go. The VM got SIGKILL with its parent
/// (the death signal) but may still be tearing its guest memory down, which
/// keeps the cgroup busy for a moment: a busy one is retried for up to
/// `STALE_GRACE`, then left to the next command.
pub fn remove_stale(path: &Path) {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let deadline = std::time::Instant::now() + STALE_GRACE;
    for h in hierarchies(Path::new(ROOT)) {
        let dir = h.join(rel);
        loop {
            match fs::remove_dir(&dir) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::debug!(dir = %dir.display(), error = %e, "stale cgroup kept");
                    break;
                }
                _ => break,
            }
        }
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
        let mut cg = HostCgroup::join_under(t.path(), Path::new("/k8s.io/pod1"), None).unwrap();
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

    /// A v2 host: the memory controller is handed down to the VM's cgroup
    /// level by level, then its limit set, before this process joins.
    #[test]
    fn a_v2_limit_enables_memory_down_the_path_and_is_set() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::write(r.join("cgroup.controllers"), "cpu memory pids").unwrap();
        fs::write(r.join("cgroup.procs"), "").unwrap();
        fs::write(r.join("cgroup.subtree_control"), "cpu").unwrap();
        // What the kernel makes on mkdir.
        for d in ["husk", "husk/c1"] {
            fs::create_dir(r.join(d)).unwrap();
            fs::write(r.join(d).join("cgroup.subtree_control"), "").unwrap();
        }
        let l = Limits {
            memory_bytes: 300 << 20,
        };
        let mut cg = HostCgroup::join_under(r, Path::new("/husk/c1"), Some(l)).unwrap();
        assert_eq!(
            fs::read_to_string(r.join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        assert_eq!(
            fs::read_to_string(r.join("husk/cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        assert_eq!(
            fs::read_to_string(r.join("husk/c1/memory.max")).unwrap(),
            (300u64 << 20).to_string()
        );
        assert_eq!(
            fs::read_to_string(r.join("husk/c1/cgroup.procs")).unwrap(),
            std::process::id().to_string()
        );
        cg.leave();
    }

    /// A v1 host sets the limit in its memory hierarchy; a host without a
    /// memory controller refuses to run the VM unlimited.
    #[test]
    fn a_v1_limit_is_set_in_the_memory_hierarchy_or_refused_without_one() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for h in ["memory", "pids"] {
            fs::create_dir_all(r.join(h).join("husk/c1")).unwrap();
            fs::write(r.join(h).join("cgroup.procs"), "").unwrap();
        }
        fs::write(r.join("memory/husk/c1/memory.limit_in_bytes"), "").unwrap();
        let l = Limits {
            memory_bytes: 64 << 20,
        };
        let mut cg = HostCgroup::join_under(r, Path::new("/husk/c1"), Some(l)).unwrap();
        assert_eq!(
            fs::read_to_string(r.join("memory/husk/c1/memory.limit_in_bytes")).unwrap(),
            (64u64 << 20).to_string()
        );
        assert!(!r.join("pids/husk/c1/memory.limit_in_bytes").exists());
        cg.leave();

        let none = tempfile::tempdir().unwrap();
        fs::create_dir_all(none.path().join("pids")).unwrap();
        fs::write(none.path().join("pids/cgroup.procs"), "").unwrap();
        let e = HostCgroup::join_under(none.path(), Path::new("/husk/c2"), Some(l)).unwrap_err();
        assert!(e.to_string().contains("no cgroup memory controller"), "{e}");
        assert!(
            !none.path().join("pids/husk/c2").exists(),
            "made, then removed"
        );
    }
}
