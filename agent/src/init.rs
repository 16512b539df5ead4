//! What PID 1 sets up before anything else: the kernel filesystems, the
//! cgroup2 hierarchy, and the hostname.
//!
//! Every path is taken relative to a root so that tests can run the same
//! steps on the host inside a private mount namespace.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mounting {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("creating {path}: {source}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting the hostname to {name:?}: {source}")]
    Hostname {
        name: String,
        #[source]
        source: nix::Error,
    },
}

/// One mount of the init table.
struct KernelMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// The mounts every Linux userspace expects, in order (parents first).
fn table() -> Vec<KernelMount> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let noexec = nosuid_nodev | MsFlags::MS_NOEXEC;
    vec![
        KernelMount {
            source: "proc",
            target: "proc",
            fstype: "proc",
            flags: noexec,
            data: None,
        },
        KernelMount {
            source: "sysfs",
            target: "sys",
            fstype: "sysfs",
            flags: noexec,
            data: None,
        },
        KernelMount {
            source: "devtmpfs",
            target: "dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("mode=0755"),
        },
        KernelMount {
            source: "devpts",
            target: "dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        },
        KernelMount {
            source: "shm",
            target: "dev/shm",
            fstype: "tmpfs",
            flags: noexec,
            data: Some("mode=1777"),
        },
        KernelMount {
            source: "tmpfs",
            target: "run",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: Some("mode=0755"),
        },
        KernelMount {
            source: "cgroup2",
            target: "sys/fs/cgroup",
            fstype: "cgroup2",
            flags: noexec,
            data: None,
        },
    ]
}

/// Mounts the kernel filesystems under `root` (`/` in the guest).
/// A mount point that already holds the same filesystem (devtmpfs mounted by
/// the kernel, a second call) is left as it is.
pub fn mount_kernel_filesystems(root: &Path) -> Result<(), InitError> {
    for m in table() {
        let target = root.join(m.target);
        std::fs::create_dir_all(&target).map_err(|source| InitError::Mkdir {
            path: target.clone(),
            source,
        })?;
        if is_mounted_as(&target, m.fstype) {
            continue;
        }
        mount(Some(m.source), &target, Some(m.fstype), m.flags, m.data).map_err(|source| {
            InitError::Mount {
                fstype: m.fstype,
                target: target.clone(),
                source,
            }
        })?;
    }
    // /dev/ptmx stays devtmpfs's device node: since Linux 4.7 it opens the
    // devpts instance mounted at the `pts` beside it, so no symlink is needed.
    for (link, target) in [
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ] {
        let p = root.join(link);
        if p.symlink_metadata().is_err() {
            let _ = std::os::unix::fs::symlink(target, &p);
        }
    }
    Ok(())
}

/// Set in the environment of the agent once it runs from its own root.
pub const SWITCHED_ENV: &str = "HUSK_AGENT_ROOT";

/// Moves PID 1 off the initramfs: the kernel's initial root (rootfs) is the
/// one mount `pivot_root` refuses, and every container's root needs
/// pivot_root. Copies `/init` (this binary) onto a fresh tmpfs, moves that
/// tmpfs over `/`, chroots into it and re-executes, like `switch_root`.
/// The initramfs's copy of the binary is deleted first so that its memory is
/// freed. Returns only on failure; the caller goes on from the initramfs.
pub fn switch_root_to_tmpfs() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let step = |what: &str, r: nix::Result<()>| {
        r.map_err(|e| std::io::Error::other(format!("{what}: {e}")))
    };
    let run = || -> std::io::Result<std::convert::Infallible> {
        let new = Path::new("/newroot");
        std::fs::create_dir_all(new)?;
        step(
            "mounting the new root",
            mount(
                Some("rootfs"),
                new,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0755"),
            ),
        )?;
        for d in ["dev", "proc", "sys", "run", "tmp"] {
            std::fs::create_dir_all(new.join(d))?;
        }
        std::fs::copy("/init", new.join("init"))?;
        // devtmpfs comes later; the kernel opened our console on the old /dev.
        let _ = std::fs::remove_file("/init");
        nix::unistd::chdir(new).map_err(std::io::Error::from)?;
        step(
            "moving the new root over /",
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
        )?;
        step("chroot", nix::unistd::chroot("."))?;
        nix::unistd::chdir("/").map_err(std::io::Error::from)?;
        Err(std::process::Command::new("/init")
            .args(std::env::args_os().skip(1))
            .env(SWITCHED_ENV, "tmpfs")
            .exec())
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Whether `target` is a mount point of `fstype`, per /proc/self/mountinfo.
fn is_mounted_as(target: &Path, fstype: &str) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = target.to_string_lossy();
    info.lines().any(|l| {
        let mut f = l.split(' ');
        let mount_point = f.nth(4);
        let fs = l.split(" - ").nth(1).and_then(|r| r.split(' ').next());
        mount_point == Some(&*target) && fs == Some(fstype)
    })
}

pub fn set_hostname(name: &str) -> Result<(), InitError> {
    nix::unistd::sethostname(name).map_err(|source| InitError::Hostname {
        name: name.to_string(),
        source,
    })
}

/// The value of `key=` on a kernel command line.
pub fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|p| p.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sched::{unshare, CloneFlags};
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};

    #[test]
    fn cmdline_values_are_found_by_whole_key() {
        let c = "console=ttyS0 husk.exit=reboot husk.exitx=no quiet";
        assert_eq!(cmdline_value(c, "husk.exit").as_deref(), Some("reboot"));
        assert_eq!(cmdline_value(c, "husk.exi"), None);
        assert_eq!(cmdline_value(c, "quiet"), None);
    }

    /// Runs `f` in a forked child inside fresh mount and UTS namespaces, so
    /// that the host is untouched; the child's exit code is `f`'s verdict.
    fn in_namespaces(f: impl FnOnce() -> Result<(), String>) {
        // SAFETY: the child only makes syscalls and leaves with _exit; it
        // never returns into the test harness or touches its locks.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = match unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)
                    .map_err(|e| format!("unshare: {e}"))
                    .and_then(|_| {
                        mount(
                            None::<&str>,
                            "/",
                            None::<&str>,
                            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                            None::<&str>,
                        )
                        .map_err(|e| format!("private /: {e}"))
                    })
                    .and_then(|_| f())
                {
                    Ok(()) => 0,
                    Err(e) => {
                        // Straight to fd 2: the harness's capture of
                        // eprintln! stays in this forked copy.
                        use std::io::Write;
                        let _ = writeln!(std::io::stderr(), "in namespace: {e}");
                        1
                    }
                };
                // SAFETY: leave the forked child without running atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
            }
        }
    }

    #[test]
    fn mounts_the_kernel_filesystems_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().to_path_buf();
        in_namespaces(move || {
            mount(
                Some("tmpfs"),
                &root,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| format!("tmpfs on {}: {e}", root.display()))?;
            mount_kernel_filesystems(&root).map_err(|e| e.to_string())?;
            mount_kernel_filesystems(&root).map_err(|e| format!("second call: {e}"))?;
            for (p, what) in [
                ("proc/self/status", "procfs"),
                ("sys/kernel", "sysfs"),
                ("dev/null", "devtmpfs"),
                ("dev/pts/ptmx", "devpts"),
                ("sys/fs/cgroup/cgroup.controllers", "cgroup2"),
            ] {
                if !root.join(p).exists() {
                    return Err(format!("{what}: {p} is missing"));
                }
            }
            for fs in ["proc", "sysfs", "devtmpfs", "devpts", "cgroup2"] {
                let n = std::fs::read_to_string("/proc/self/mountinfo")
                    .unwrap()
                    .lines()
                    .filter(|l| {
                        l.contains(&*root.to_string_lossy())
                            && l.split(" - ")
                                .nth(1)
                                .is_some_and(|r| r.starts_with(&format!("{fs} ")))
                    })
                    .count();
                if n != 1 {
                    return Err(format!("{fs} mounted {n} times"));
                }
            }
            if std::fs::read_link(root.join("dev/fd")).map_err(|e| format!("dev/fd: {e}"))?
                != Path::new("/proc/self/fd")
            {
                return Err("dev/fd does not point at /proc/self/fd".into());
            }
            Ok(())
        });
    }

    #[test]
    fn sets_the_hostname() {
        in_namespaces(|| {
            set_hostname("husk-test-guest").map_err(|e| e.to_string())?;
            let got = nix::unistd::gethostname().map_err(|e| e.to_string())?;
            (got == "husk-test-guest")
                .then_some(())
                .ok_or(format!("hostname is {got:?}"))
        });
    }
}
