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

use std::os::fd::{AsRawFd, FromRawFd};
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

/// What became of the mount jail ([`enter_mount_jail`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountJail {
    /// The root is a read-only tmpfs holding only the kept directories.
    Entered,
    /// This kernel lets no unprivileged user namespace be made (the user
    /// was changed all the same).
    Unavailable,
    /// The namespace was made but the new root could not be (a security
    /// module that denies mounts in user namespaces, say): the user was
    /// changed and every capability dropped, the host's root stays.
    Failed(String),
}

/// Puts this process in a root of its own and makes it `user`, in the
/// order Firecracker's jailer uses: a new user and mount namespace, the
/// user's uid and gid as the namespace's root, a fresh root file system (a
/// small read-only tmpfs) in which each of `keep` is bound at its own path
/// (so configured paths keep working) and nothing else exists, then every
/// capability dropped, the bounding set included. From the host the
/// process is `user` (its uid and gid are mapped to the namespace's 0), and
/// its `/proc/PID/root` shows the kept directories alone.
///
/// Must run single-threaded (a user namespace requires it) and before the
/// Landlock jail (a Landlock domain forbids mount changes), in a process
/// allowed to become `user` (root, or CAP_SETUID and CAP_SETGID). The
/// namespace is made as `user`, as any unprivileged process could make it,
/// so no host capability is needed or used inside it; `user` must be able
/// to reach each kept directory (search on its parents). Best effort past the user change, like Landlock: where
/// unprivileged user namespaces are off, or mounts in them are denied, it
/// says so ([`MountJail`]) and the process is `user` all the same; an error
/// means it may not be.
pub fn enter_mount_jail(user: crate::config::User, keep: &[PathBuf]) -> std::io::Result<MountJail> {
    use std::io::{Error, Write};

    let mut keep: Vec<&PathBuf> = keep.iter().filter(|p| p.is_absolute()).collect();
    keep.sort();
    keep.dedup();
    // A user namespace needs a single-threaded caller; say so rather than
    // take the kernel's EINVAL for "no user namespaces". A thread just
    // joined (the loader's, the seccomp compiler's) leaves the thread group
    // a moment after its join returns (the join wakes at its exit's tid
    // clear, before it is reaped), so give the count a second to settle.
    for _ in 0..200 {
        if thread_count().is_none_or(|n| n <= 1) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if let Some(n) = thread_count().filter(|&n| n > 1) {
        return Err(Error::other(format!(
            "{n} threads: a user namespace needs a single-threaded process"
        )));
    }
    // First `user` in the host's namespace, as an unprivileged process
    // making its own namespace would be: the kernel then lets it map just
    // itself (its uid and gid) to the namespace's root. Dumpable again for
    // the moment, so that its own /proc files (the maps) are its own.
    set_ids(user)?;
    // SAFETY: prctl and unshare take integers only.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
            return Err(Error::last_os_error());
        }
        if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) != 0 {
            let e = Error::last_os_error();
            if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
                return Err(Error::last_os_error());
            }
            return match e.raw_os_error() {
                // User namespaces off (sysctl, a limit of 0, a seccomp
                // policy, a kernel without them): `user` all the same.
                Some(libc::EPERM | libc::ENOSPC | libc::EINVAL | libc::ENOSYS) => {
                    Ok(MountJail::Unavailable)
                }
                _ => Err(Error::new(e.kind(), format!("unshare: {e}"))),
            };
        }
    }
    let built = (|| {
        for (file, line) in [
            ("/proc/self/setgroups", "deny".to_string()),
            ("/proc/self/uid_map", format!("0 {} 1\n", user.uid)),
            ("/proc/self/gid_map", format!("0 {} 1\n", user.gid)),
        ] {
            std::fs::OpenOptions::new()
                .write(true)
                .open(file)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .map_err(|e| Error::new(e.kind(), format!("writing {file}: {e}")))?;
        }
        pivot_into(&keep)
    })();
    // Whatever came of the root: no capability stays, not even the
    // namespace's.
    drop_all_capabilities()?;
    // SAFETY: prctl takes integers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(Error::last_os_error());
    }
    Ok(match built {
        Ok(()) => MountJail::Entered,
        Err(e) => MountJail::Failed(e.to_string()),
    })
}

/// Builds the new root and pivots into it (in a mount namespace of this
/// process's own). The tmpfs is made over `/proc`, which nothing uses once
/// set up, so a failure half-way leaves every path the VMM still uses as
/// it was.
fn pivot_into(dirs: &[&PathBuf]) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::io::Error;
    use std::os::unix::ffi::OsStrExt;

    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::other(format!("{} holds a NUL byte", p.display())))
    };
    let check = |rc: libc::c_long, what: &str| -> std::io::Result<()> {
        if rc < 0 {
            let e = Error::last_os_error();
            return Err(Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    };
    // Every directory to make in the new root, parents first, relative.
    let mut mkdirs: Vec<CString> = Vec::new();
    let mut targets: Vec<CString> = Vec::new();
    let mut sources: Vec<CString> = Vec::new();
    for p in dirs {
        sources.push(c(p)?);
        let mut at = PathBuf::new();
        for part in p.components().skip(1) {
            at.push(part);
            let d = c(&at)?;
            if !mkdirs.contains(&d) {
                mkdirs.push(d);
            }
        }
        targets.push(c(&at)?);
    }
    // The mounts beneath a kept directory (the sandbox's share, say) come
    // along with it: a mount namespace owned by a user namespace may only
    // copy a tree whole (its submounts are locked to it). Each is covered
    // in the new root by an empty read-only tmpfs instead, so none of it
    // is reachable; the outermost ones suffice.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount_path(m)))
        .collect();
    let mut covers: Vec<&PathBuf> = points
        .iter()
        .filter(|m| dirs.iter().any(|d| m.starts_with(d) && m != d))
        .collect();
    covers.sort();
    covers.dedup();
    let outermost: Vec<CString> = covers
        .iter()
        .filter(|m| !covers.iter().any(|o| o != *m && m.starts_with(o)))
        .map(|m| c(m.strip_prefix("/").unwrap_or(m)))
        .collect::<std::io::Result<_>>()?;
    let (dot, root, base) = (c".", c"/", c"/proc");
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: raw syscalls on NUL-terminated strings and fds owned here;
    // each result is checked. The mounts happen in the namespace made by
    // the caller, which only this process uses.
    unsafe {
        check(
            libc::mount(
                null,
                root.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) as libc::c_long,
            "making mounts private",
        )?;
        // Detached copies of the kept directories (with their submounts,
        // covered below), looked up as `user` in this namespace (a
        // descriptor opened in the host's would name a mount of another
        // namespace, which open_tree refuses): their parents must be
        // searchable to it.
        let mut trees = Vec::new();
        for src in &sources {
            let tree = libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                src.as_ptr(),
                libc::OPEN_TREE_CLONE
                    | libc::O_CLOEXEC as libc::c_uint
                    | libc::AT_RECURSIVE as libc::c_uint,
            );
            check(tree, "open_tree")?;
            trees.push(std::os::fd::OwnedFd::from_raw_fd(tree as i32));
        }
        check(
            libc::mount(
                c"tmpfs".as_ptr(),
                base.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=16k,nr_inodes=64,mode=0755".as_ptr().cast(),
            ) as libc::c_long,
            "mounting the new root",
        )?;
        check(libc::chdir(base.as_ptr()) as libc::c_long, "chdir")?;
        for d in &mkdirs {
            if libc::mkdir(d.as_ptr(), 0o755) != 0
                && Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                check(-1, "mkdir in the new root")?;
            }
        }
        for (tree, target) in trees.iter().zip(&targets) {
            check(
                libc::syscall(
                    libc::SYS_move_mount,
                    tree.as_raw_fd(),
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    target.as_ptr(),
                    libc::MOVE_MOUNT_F_EMPTY_PATH,
                ),
                "move_mount",
            )?;
        }
        for cover in &outermost {
            check(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    cover.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"size=4k,nr_inodes=1,mode=0".as_ptr().cast(),
                ) as libc::c_long,
                "covering a mount beneath a kept directory",
            )?;
        }
        // The old root stacked under the new one, then detached.
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()),
            "pivot_root",
        )?;
        check(
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH) as libc::c_long,
            "detaching the old root",
        )?;
        check(libc::chdir(root.as_ptr()) as libc::c_long, "chdir /")?;
        check(
            libc::mount(
                null,
                root.as_ptr(),
                null,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ) as libc::c_long,
            "making the new root read-only",
        )?;
    }
    Ok(())
}

/// A path field as `/proc/self/mountinfo` writes it, decoded: space, tab,
/// newline and backslash come as three-digit octal escapes (an escape out
/// of a byte's range stays as written). Shared with the runtime's mount
/// code.
pub fn unescape_mount_path(field: &str) -> String {
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

/// Empties the bounding, inheritable, permitted and effective sets (the
/// namespace's root would otherwise keep every capability in it).
fn drop_all_capabilities() -> std::io::Result<()> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two Data words.
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: prctl takes integers (EINVAL past the last capability is
    // ignored); capset reads the header and two data words we own.
    unsafe {
        for cap in 0..=last {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        // No root-is-privileged rule either, locked.
        libc::prctl(
            libc::PR_SET_SECUREBITS,
            (libc::SECBIT_NOROOT | libc::SECBIT_NOROOT_LOCKED) as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Descriptors husk-vmm may hold once set up: vsock's 256 guest and 256
/// host streams and their pending connects, the control socket's clients,
/// KVM, eventfds, taps, the console and log files, with room to spare.
pub const VMM_NOFILE: u64 = 4096;

/// Caps what this process can still make of the host's resources: files
/// no larger than `fsize` bytes (a write past it fails with `EFBIG`;
/// `SIGXFSZ` is ignored so it does not end the VM) and at most
/// [`VMM_NOFILE`] descriptors (the hard limit too, so it cannot be raised
/// back). Call after everything that must exceed them was done, and after
/// any child that must not inherit them (the file-system process) started.
pub fn limit_resources(fsize: u64) -> std::io::Result<()> {
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own; signal
    // sets a disposition (SIG_IGN), no handler; results checked.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = nofile.rlim_max.min(VMM_NOFILE);
        let caps = [(libc::RLIMIT_NOFILE, n), (libc::RLIMIT_FSIZE, fsize)];
        for (resource, value) in caps {
            let rl = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
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
    set_ids(user)?;
    // SAFETY: prctl takes integers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// No supplementary groups, then gid and uid (real, effective, saved)
/// `user`'s, checked after.
fn set_ids(user: crate::config::User) -> std::io::Result<()> {
    let gid = user.gid as libc::gid_t;
    let uid = user.uid as libc::uid_t;
    // SAFETY: setgroups with a count of 0 reads no memory; setresgid and
    // setresuid take plain integers; each result is checked.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
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

    /// The mount jail changes the whole process for good, and a user
    /// namespace needs a single thread: it is entered in a forked child of
    /// this test (one thread; glibc's malloc is fork-safe), which reports
    /// what it could still reach through a pipe.
    #[test]
    fn the_mount_jail_leaves_only_the_kept_directories_and_no_privilege() {
        use std::io::Read;
        use std::os::fd::OwnedFd;
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root (it writes another uid's map)"
        );
        let kept = tempfile::tempdir().unwrap();
        std::fs::write(kept.path().join("sock"), "x").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host's").unwrap();
        let (keep, secret) = (kept.path().to_owned(), outside.path().join("secret"));
        let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only runs the jail and its checks, writes to
        // the pipe and _exits; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let report = in_the_mount_jail(&keep, &secret);
            // SAFETY: writes our buffer to the pipe's write end, then ends
            // the child without running the harness's exit handlers.
            unsafe {
                libc::write(w.as_raw_fd(), report.as_ptr().cast(), report.len());
                libc::_exit(0);
            }
        }
        drop(w);
        let mut text = String::new();
        std::fs::File::from(r).read_to_string(&mut text).unwrap();
        let mut status = 0;
        // SAFETY: waits for the child we forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{text}"
        );
        for want in [
            "jail=Ok(Entered)",
            "kept=x",
            // The mount beneath it is covered (by an empty tmpfs of mode
            // 0: uncovered, its file would read "ok").
            "sub=PermissionDenied",
            "outside=NotFound",
            "etc=NotFound",
            "write-root=ReadOnlyFilesystem",
            "write-kept=PermissionDenied",
            "caps=0/0",
            "uid=0",
        ] {
            assert!(text.contains(want), "missing {want} in:\n{text}");
        }
    }

    fn in_the_mount_jail(keep: &Path, secret: &Path) -> String {
        // A mount beneath the kept directory, made in a namespace of this
        // child's own (the host's stays as it was), as the share is beneath
        // the sandbox directory.
        let sub = keep.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let csub = std::ffi::CString::new(sub.to_str().unwrap()).unwrap();
        // SAFETY: unshare takes flags; mount reads NUL-terminated strings.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0);
            assert_eq!(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null()
                ),
                0
            );
            assert_eq!(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    csub.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null()
                ),
                0
            );
        }
        std::fs::write(sub.join("shared-file"), "guest's").unwrap();
        let user = crate::config::User {
            uid: 0x4000_1234,
            gid: 0x4000_1234,
        };
        let jail = enter_mount_jail(user, &[keep.to_owned()]);
        let kind = |r: std::io::Result<()>| match r {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{:?}", e.kind()),
        };
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        let header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [0u32; 6];
        // SAFETY: capget writes two data words (six u32s) we own.
        unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
        format!(
            "sub={}\njail={jail:?}\nkept={}\noutside={}\netc={}\nwrite-root={}\nwrite-kept={}\ncaps={}/{}\nuid={}\n",
            kind(std::fs::read(sub.join("shared-file")).map(drop)),
            std::fs::read_to_string(keep.join("sock")).unwrap_or_default(),
            kind(std::fs::read(secret).map(drop)),
            kind(std::fs::read("/etc/hostname").map(drop)),
            kind(std::fs::write("/planted", "x")),
            kind(std::fs::write(keep.join("new"), "x")),
            data[0] | data[3],
            data[1] | data[4],
            // SAFETY: getuid has no preconditions.
            unsafe { libc::getuid() },
        )
    }
}
