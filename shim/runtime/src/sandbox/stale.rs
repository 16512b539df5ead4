//! What a killed owner left behind: sandbox directories whose VMM is gone,
//! and VMMs whose owner died without detaching them. Signals go through a
//! pidfd opened on an identity the pid file recorded (pid and start time),
//! never to a bare pid read from a file.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::container::mounts;
use crate::hypervisor::PidFd;
use crate::layout::{PidFile, SandboxLayout};

/// A directory without a pid file younger than this is a VM being set up.
const SETUP_GRACE: Duration = Duration::from_secs(120);

/// What [`reap`] found in one directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its VMM runs and is owned (or detached): leave it.
    Live,
    /// Being set up (no pid file yet, and young): leave it.
    Young,
    /// Its VMM is gone, or was killed now: remove the directory.
    Stale,
}

/// Decides about one sandbox directory; kills an orphaned VMM.
pub fn judge(layout: &SandboxLayout) -> Verdict {
    let Some(pids) = PidFile::read(&layout.pid_file()) else {
        let young = std::fs::metadata(layout.dir())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|age| age < SETUP_GRACE);
        return if young {
            Verdict::Young
        } else {
            Verdict::Stale
        };
    };
    let Some(vmm) = PidFd::open_verified(pids.vmm) else {
        return Verdict::Stale;
    };
    if layout.detached_marker().exists() || pids.owner.is_alive() {
        return Verdict::Live;
    }
    tracing::info!(dir = %layout.dir().display(), pid = pids.vmm.pid, "killing a VM whose owner died");
    let _ = vmm.signal(libc::SIGKILL);
    Verdict::Stale
}

/// Removes a sandbox directory: mounts first (removing must never walk
/// into a container's rootfs), then the tree. False when mounts remain.
pub fn remove(layout: &SandboxLayout) -> bool {
    if let Err(e) = mounts::unmount_below(layout.dir()) {
        tracing::warn!(dir = %layout.dir().display(), error = %e, "unmounting");
    }
    if !mounts::remaining_below(layout.dir()).is_empty() {
        tracing::warn!(dir = %layout.dir().display(), "mounts below it remain; left in place");
        return false;
    }
    match std::fs::remove_dir_all(layout.dir()) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(dir = %layout.dir().display(), error = %e, "removing");
            false
        }
    }
}

/// Cleans every stale sandbox under `root`; how many were removed.
pub fn reap(root: &Path) -> usize {
    let Ok(dir) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut n = 0;
    for e in dir.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(layout) = name
            .to_str()
            .and_then(|id| SandboxLayout::under(root, id).ok())
        else {
            continue;
        };
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if judge(&layout) == Verdict::Stale {
            tracing::info!(dir = %layout.dir().display(), "removing a VM left behind");
            if remove(&layout) {
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ProcessId;

    fn mk(root: &Path, id: &str, pids: Option<PidFile>) -> SandboxLayout {
        let l = SandboxLayout::under(root, id).unwrap();
        std::fs::create_dir_all(l.dir()).unwrap();
        if let Some(p) = pids {
            p.write(&l.pid_file()).unwrap();
        }
        l
    }

    #[test]
    fn stale_directories_are_removed_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let me = ProcessId::current().unwrap();
        let dead = ProcessId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        let live = mk(root.path(), "live", Some(PidFile { vmm: me, owner: me }));
        let gone = mk(
            root.path(),
            "gone",
            Some(PidFile {
                vmm: dead,
                owner: me,
            }),
        );
        let young = mk(root.path(), "young", None);
        let mut orphan = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let orphan_id = ProcessId::of(orphan.id() as i32).unwrap();
        let orphaned = mk(
            root.path(),
            "orphaned",
            Some(PidFile {
                vmm: orphan_id,
                owner: dead,
            }),
        );
        // A pid file naming a process whose pid was reused: the start time
        // differs, so it is not signalled (this test process is not killed).
        let reused = mk(
            root.path(),
            "reused",
            Some(PidFile {
                vmm: dead,
                owner: dead,
            }),
        );
        assert_eq!(reap(root.path()), 3);
        assert!(live.dir().exists());
        assert!(young.dir().exists(), "a VM being set up is left alone");
        assert!(!gone.dir().exists());
        assert!(!orphaned.dir().exists());
        assert!(!reused.dir().exists());
        // The VMM whose owner died was killed.
        assert!(orphan.wait().unwrap().code().is_none());
    }
}
