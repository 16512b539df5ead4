//! The file-system and IPC jail husk-vmm puts itself in once set up, through
//! Landlock: whatever a bug in device emulation lets a guest run inside
//! husk-vmm then reaches only the share it serves.
//!
//! Before the jail, husk-vmm opens everything it will use (`/dev/kvm`, the
//! kernel and initramfs, the console file, the sockets, the taps, the share's
//! root fd). After it, on the thread that set up the VM and every thread it
//! starts later (a Landlock domain is inherited, never left):
//! - files beneath each virtio-fs share: every access (the guest's own tree);
//! - the directories holding husk-vmm's sockets: removing a file only (it
//!   unlinks its sockets when it stops);
//! - anywhere else: no open, create, remove, rename, link or truncate, for
//!   reading or writing, whatever husk-vmm's uid and capabilities;
//! - TCP: no bind and no connect (husk-vmm speaks only over Unix sockets,
//!   inherited taps and KVM); Landlock ABI 4 and later;
//! - no signal to a process outside the jail, no connect to an abstract Unix
//!   socket outside it (containerd's shims listen on some); ABI 6 and later.
//!
//! Paths beneath the share stay beneath it through bind mounts and overlays
//! (Landlock walks the mount tree up), so a container's rootfs and volumes,
//! bound into the share in husk-vmm's own mount namespace, are covered by the
//! share's rule and nothing else is. Connecting to a path-named Unix socket
//! (`<vsock socket>_PORT`) is not a file-system access Landlock handles, so
//! guest-initiated vsock streams still reach their host listeners.
//!
//! Best effort: on a kernel without Landlock, or with an older ABI, what the
//! kernel has is enforced and the rest is reported ([`Confined`]); a kernel
//! without it at all leaves husk-vmm with its seccomp filters, mount
//! namespace and capability bound only. The rule set targets ABI 6 (Linux
//! 6.12); newer rights are never asked for untested.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// The newest Landlock ABI this jail is written and tested for.
const TARGET_ABI: ABI = ABI::V6;

/// What stays reachable in the jail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Jail {
    /// Trees the guest owns (virtio-fs shares): every file-system access.
    pub shares: Vec<PathBuf>,
    /// Directories whose files husk-vmm may unlink (its sockets' parents).
    pub removable_in: Vec<PathBuf>,
    /// Where husk-vmm writes a snapshot (`--snapshot-to`): files made,
    /// written, truncated and renamed there.
    pub snapshot_dir: Option<PathBuf>,
}

/// How much of the jail the running kernel enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confined {
    /// Everything asked for.
    Fully,
    /// An older Landlock: the file-system part at least (what is missing
    /// depends on the ABI: TCP from 4, truncate from 3, scopes from 6).
    Partly,
    /// No Landlock in this kernel (not built, or not enabled at boot).
    Not,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("opening {} for the Landlock jail: {source}", path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("building the Landlock rule set: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

impl Jail {
    /// Confines the calling thread and every thread it starts from now on.
    /// Call it once, with no other thread alive that should be confined.
    pub fn enter(&self) -> Result<Confined, ConfineError> {
        let fs_all = AccessFs::from_all(TARGET_ABI);
        let mut ruleset = Ruleset::default()
            .handle_access(fs_all)?
            .handle_access(AccessNet::from_all(TARGET_ABI))?
            .scope(Scope::from_all(TARGET_ABI))?
            .create()?;
        let snapshot_access = AccessFs::MakeReg
            | AccessFs::WriteFile
            | AccessFs::ReadFile
            | AccessFs::RemoveFile
            | AccessFs::Truncate;
        let snapshot_dir: Vec<PathBuf> = self.snapshot_dir.iter().cloned().collect();
        for (dirs, access) in [
            (&self.shares, fs_all),
            (&self.removable_in, AccessFs::RemoveFile.into()),
            (&snapshot_dir, snapshot_access),
        ] {
            for dir in dirs {
                let fd = open(dir)?;
                ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
            }
        }
        let status: RestrictionStatus = ruleset.restrict_self()?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Confined::Fully,
            RulesetStatus::PartiallyEnforced => Confined::Partly,
            RulesetStatus::NotEnforced => Confined::Not,
        })
    }
}

fn open(path: &Path) -> Result<PathFd, ConfineError> {
    PathFd::new(path).map_err(|source| ConfineError::Path {
        path: path.to_owned(),
        source,
    })
}

/// Makes the whole process `user` for good: no supplementary groups, real,
/// effective and saved gid and uid all changed, so no capability is left
/// (without `SECBIT_KEEP_CAPS` the kernel clears the permitted and
/// effective sets when the last uid 0 goes) and it is not dumpable (no
/// ptrace, its `/proc` files root's). glibc's wrappers change every
/// thread's credentials; call it with no thread started that should keep
/// others. Checked after: a uid that did not change is an error, never a
/// VMM that believes it is confined.
pub fn become_user(user: crate::config::User) -> std::io::Result<()> {
    let gid = user.gid as libc::gid_t;
    let uid = user.uid as libc::uid_t;
    // SAFETY: setgroups with a count of 0 reads no memory; setresgid,
    // setresuid and prctl take plain integers; each result is checked.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: getresuid writes three uids into memory we own.
    let (mut r, mut e, mut s) = (0, 0, 0);
    if unsafe { libc::getresuid(&mut r, &mut e, &mut s) } != 0 || [r, e, s] != [uid; 3] {
        return Err(std::io::Error::other(format!(
            "still uid {r}/{e}/{s} after becoming {uid}"
        )));
    }
    Ok(())
}

/// The running kernel's Landlock ABI version; 0 when it has no Landlock.
pub fn kernel_abi() -> i64 {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the
    // VERSION flag only returns the ABI number; it reads and writes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    v.max(0)
}

/// What [`crate::api::VmInfo::jail`] says of a VM whose configuration asks
/// for the jail (`wanted`) or not.
pub fn describe(wanted: bool) -> String {
    match (wanted, kernel_abi()) {
        (false, _) => "off".into(),
        (true, 0) => "unsupported".into(),
        (true, n) => format!("landlock-abi-{n}"),
    }
}

/// The number of threads in this process (from `/proc/self/task`), so that
/// the caller can say so when one would escape the jail; `None` when it
/// cannot be read.
pub fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task")
        .ok()
        .map(|d| d.filter_map(Result::ok).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    /// Landlock confines one thread (and its children): the test runs in a
    /// thread of its own, so the rest of the test binary stays free.
    #[test]
    fn only_the_share_is_reachable_and_sockets_can_be_removed() {
        let abi = kernel_abi();
        let share = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(share.path().join("in.txt"), "guest's").unwrap();
        std::fs::write(outside.path().join("secret"), "host's").unwrap();
        std::fs::write(run.path().join("api.sock"), "").unwrap();
        std::fs::write(run.path().join("vmm.log"), "").unwrap();
        let jail = Jail {
            shares: vec![share.path().to_owned()],
            removable_in: vec![run.path().to_owned()],
            snapshot_dir: None,
        };
        let (s, r, o) = (
            share.path().to_owned(),
            run.path().to_owned(),
            outside.path().to_owned(),
        );
        std::thread::spawn(move || {
            let confined = jail.enter().unwrap();
            if abi < 1 {
                assert_eq!(confined, Confined::Not);
                return;
            }
            if abi >= 6 {
                assert_eq!(confined, Confined::Fully);
            }
            let denied = |r: std::io::Result<()>, what: &str| {
                let e = r.expect_err(what);
                assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}: {e}");
            };
            // The share: read, write, create, rename, remove, mkdir.
            assert_eq!(
                std::fs::read_to_string(s.join("in.txt")).unwrap(),
                "guest's"
            );
            std::fs::write(s.join("new.txt"), "x").unwrap();
            std::fs::rename(s.join("new.txt"), s.join("moved.txt")).unwrap();
            std::fs::create_dir(s.join("d")).unwrap();
            std::fs::remove_file(s.join("moved.txt")).unwrap();
            // Outside: nothing, root or not.
            denied(
                std::fs::read(o.join("secret")).map(|_| ()),
                "reading outside",
            );
            denied(std::fs::write(o.join("planted"), "x"), "creating outside");
            denied(std::fs::read("/etc/hostname").map(|_| ()), "reading /etc");
            denied(std::fs::read_dir("/").map(|_| ()), "listing /");
            denied(
                std::fs::rename(s.join("in.txt"), o.join("in.txt")),
                "moving out of the share",
            );
            // The socket directory: unlink only.
            std::fs::remove_file(r.join("api.sock")).unwrap();
            denied(
                std::fs::write(r.join("new"), "x"),
                "creating beside the sockets",
            );
            denied(
                std::fs::read(r.join("vmm.log")).map(|_| ()),
                "reading beside the sockets",
            );
            if abi >= 4 {
                // No TCP at all.
                let l = std::net::TcpListener::bind("127.0.0.1:0");
                denied(l.map(|_| ()), "binding TCP");
            }
        })
        .join()
        .unwrap();
        // This thread was never confined.
        std::fs::write(outside.path().join("after"), "x").unwrap();
    }

    #[test]
    fn a_missing_share_is_an_error_before_anything_is_confined() {
        let jail = Jail {
            shares: vec!["/nonexistent/husk-share".into()],
            removable_in: vec![],
            snapshot_dir: None,
        };
        std::thread::spawn(move || {
            let e = jail.enter().unwrap_err();
            assert!(e.to_string().contains("/nonexistent/husk-share"), "{e}");
            // Still free.
            std::fs::read_dir("/").unwrap();
        })
        .join()
        .unwrap();
    }
}
