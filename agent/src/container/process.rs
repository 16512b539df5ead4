//! Starting a container's process: new namespaces, the rootfs as `/`
//! (pivot_root), the spec's mounts, a minimal `/dev`, the user and groups,
//! then exec.
//!
//! The agent is multi-threaded, so the cloned child may only make raw
//! syscalls until it execs: everything it needs (C strings, argv, envp, the
//! exec candidates along PATH) is prepared before `clone`, and the child
//! reports a failure as (stage, errno) on a close-on-exec pipe. An empty
//! pipe at EOF means exec succeeded.
//!
//! Not yet here (the rest of the containers issue): user namespaces, joining
//! the sandbox's namespaces, cgroups, capabilities, seccomp, rlimits,
//! masked and read-only paths, terminals.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::unistd::Pid;
use oci_spec::runtime::LinuxNamespaceType;

use super::spec::{Mount, ValidSpec};

/// Where a container start failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    Private = 1,
    BindRoot,
    Mount,
    Dev,
    PivotRoot,
    ReadonlyRoot,
    Hostname,
    Stdio,
    Groups,
    Gid,
    Uid,
    Cwd,
    Exec,
}

impl Stage {
    fn from_u32(v: u32) -> Option<Self> {
        use Stage::*;
        [
            Private,
            BindRoot,
            Mount,
            Dev,
            PivotRoot,
            ReadonlyRoot,
            Hostname,
            Stdio,
            Groups,
            Gid,
            Uid,
            Cwd,
            Exec,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("preparing the container: {0}")]
    Prepare(String),
    #[error("starting the container failed at {stage:?}{}: {errno}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Start {
        stage: Stage,
        errno: nix::Error,
        detail: Option<String>,
    },
    #[error("clone: {0}")]
    Clone(nix::Error),
}

/// The container's stdio, as fds the child takes over.
pub struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

fn cstr(b: &[u8]) -> Result<CString, ContainerError> {
    CString::new(b).map_err(|_| {
        ContainerError::Prepare(format!(
            "{:?} contains a NUL byte",
            String::from_utf8_lossy(b)
        ))
    })
}

fn cpath(p: &Path) -> Result<CString, ContainerError> {
    cstr(p.as_os_str().as_bytes())
}

/// `root` + `dest`, creating missing directories (or a file, for a bind of a
/// file), refusing any existing component that is a symlink: following one
/// could leave the rootfs.
fn mount_point(root: &Path, dest: &Path, file: bool) -> Result<PathBuf, ContainerError> {
    let mut p = root.to_path_buf();
    let comps: Vec<_> = dest
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    for (i, c) in comps.iter().enumerate() {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ContainerError::Prepare(format!(
                    "mount destination {}: {} is a symlink",
                    dest.display(),
                    p.display()
                )))
            }
            Ok(_) => {}
            Err(_) if file && i == comps.len() - 1 => {
                std::fs::File::create(&p)
                    .map_err(|e| ContainerError::Prepare(format!("{}: {e}", p.display())))?;
            }
            Err(_) => {
                std::fs::create_dir(&p)
                    .map_err(|e| ContainerError::Prepare(format!("{}: {e}", p.display())))?;
            }
        }
    }
    Ok(p)
}

/// Mount flags and the data string from OCI mount options.
pub fn parse_options(options: &[String]) -> (MsFlags, Vec<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "suid" => flags &= !MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "dev" => flags &= !MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data)
}

struct PreparedMount {
    source: CString,
    target: CString,
    fstype: CString,
    flags: libc::c_ulong,
    data: Option<CString>,
    /// A read-only bind needs a second, remounting call.
    remount_ro: bool,
}

fn prepare_mount(root: &Path, share: &Path, m: &Mount) -> Result<PreparedMount, ContainerError> {
    let (mut flags, data) = parse_options(&m.options);
    let bind = m.kind == "bind";
    let source = if bind {
        // Bind sources live in the sandbox share, like the rootfs.
        let src = m.source.clone().unwrap_or_default();
        let rel = src.strip_prefix("/").unwrap_or(&src);
        share.join(rel)
    } else {
        m.source.clone().unwrap_or_else(|| PathBuf::from(&m.kind))
    };
    if bind {
        flags |= MsFlags::MS_BIND;
    }
    let is_file = bind && source.is_file();
    let target = mount_point(root, &m.destination, is_file)?;
    let remount_ro = bind && flags.contains(MsFlags::MS_RDONLY);
    Ok(PreparedMount {
        source: cpath(&source)?,
        target: cpath(&target)?,
        fstype: cstr(if bind { b"none" } else { m.kind.as_bytes() })?,
        flags: (if bind {
            flags - MsFlags::MS_RDONLY
        } else {
            flags
        })
        .bits(),
        data: if data.is_empty() {
            None
        } else {
            Some(cstr(data.join(",").as_bytes())?)
        },
        remount_ro,
    })
}

/// Device nodes every container gets (OCI runtime spec, "Default Devices").
const DEVICES: &[(&str, u32, u32, u32)] = &[
    ("null", 0o666, 1, 3),
    ("zero", 0o666, 1, 5),
    ("full", 0o666, 1, 7),
    ("random", 0o666, 1, 8),
    ("urandom", 0o666, 1, 9),
    ("tty", 0o666, 5, 0),
];

/// Everything the child needs, prepared before `clone`.
struct Plan {
    root: CString,
    dev: CString,
    devices: Vec<(CString, libc::mode_t, libc::dev_t)>,
    dev_pts: CString,
    dev_shm: CString,
    ptmx: CString,
    ptmx_target: CString,
    mounts: Vec<PreparedMount>,
    readonly: bool,
    hostname: Option<CString>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    cwd: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    exec_candidates: Vec<CString>,
    stdio: [RawFd; 3],
    err_w: RawFd,
}

fn exec_candidates(spec: &ValidSpec) -> Result<Vec<CString>, ContainerError> {
    let prog = &spec.args[0];
    if prog.contains('/') {
        return Ok(vec![cstr(prog.as_bytes())?]);
    }
    let path = spec
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| cstr(format!("{d}/{prog}").as_bytes()))
        .collect()
}

/// Clone flags for the spec's namespaces; a mount namespace always (pivot_root needs one).
fn clone_flags(spec: &ValidSpec) -> Result<CloneFlags, ContainerError> {
    let mut f = CloneFlags::CLONE_NEWNS;
    for ns in &spec.namespaces {
        f |= match ns {
            LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
            LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
            LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
            LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
            LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
            other => {
                return Err(ContainerError::Prepare(format!(
                    "{other:?} namespaces are not supported yet"
                )))
            }
        };
    }
    Ok(f)
}

/// Starts the container's process. `share` is the sandbox's shared
/// directory in the guest; the rootfs and bind sources are relative to it.
/// Returns the pid (in the agent's namespace) once `exec` has succeeded.
pub fn start(spec: &ValidSpec, share: &Path, stdio: Stdio) -> Result<Pid, ContainerError> {
    let root = share.join(&spec.root);
    if !root.is_dir() {
        return Err(ContainerError::Prepare(format!(
            "rootfs {} is not a directory",
            root.display()
        )));
    }
    let flags = clone_flags(spec)?;
    let mounts = spec
        .mounts
        .iter()
        .map(|m| prepare_mount(&root, share, m))
        .collect::<Result<Vec<_>, _>>()?;
    let dev = mount_point(&root, Path::new("/dev"), false)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Prepare(format!("pipe: {e}")))?;
    let plan = Plan {
        root: cpath(&root)?,
        devices: DEVICES
            .iter()
            .map(|(n, mode, maj, min)| {
                Ok((
                    cpath(&dev.join(n))?,
                    libc::S_IFCHR | *mode,
                    libc::makedev(*maj, *min),
                ))
            })
            .collect::<Result<_, ContainerError>>()?,
        dev_pts: cpath(&dev.join("pts"))?,
        dev_shm: cpath(&dev.join("shm"))?,
        ptmx: cpath(&dev.join("ptmx"))?,
        ptmx_target: cstr(b"pts/ptmx")?,
        dev: cpath(&dev)?,
        mounts,
        readonly: spec.root_readonly,
        hostname: spec
            .hostname
            .as_ref()
            .map(|h| cstr(h.as_bytes()))
            .transpose()?,
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.additional_gids.clone(),
        cwd: cpath(&spec.cwd)?,
        argv: spec
            .args
            .iter()
            .map(|a| cstr(a.as_bytes()))
            .collect::<Result<_, _>>()?,
        envp: spec
            .env
            .iter()
            .map(|e| cstr(e.as_bytes()))
            .collect::<Result<_, _>>()?,
        exec_candidates: exec_candidates(spec)?,
        stdio: [
            stdio.stdin.as_raw_fd(),
            stdio.stdout.as_raw_fd(),
            stdio.stderr.as_raw_fd(),
        ],
        err_w: err_w.as_raw_fd(),
    };
    let argv: Vec<*const libc::c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = plan
        .envp
        .iter()
        .map(|e| e.as_ptr())
        .chain([std::ptr::null()])
        .collect();

    let mut stack = vec![0u8; 256 * 1024];
    let child = Box::new(|| -> isize { child_main(&plan, &argv, &envp) });
    // SAFETY: the child runs `child_main`, which makes only raw syscalls on
    // data prepared above (no allocation, no locks) and ends in exec or
    // _exit; the stack is ours and large enough for that.
    let pid = unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(ContainerError::Clone)?;
    drop(err_w);
    drop(stdio);
    let mut buf = [0u8; 8];
    let mut got = 0;
    let mut err_r = std::fs::File::from(err_r);
    while got < buf.len() {
        match std::io::Read::read(&mut err_r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    // The child failed before exec; collect it.
    let _ = nix::sys::wait::waitpid(pid, None);
    let stage = Stage::from_u32(u32::from_le_bytes(buf[..4].try_into().unwrap_or_default()))
        .unwrap_or(Stage::Exec);
    let errno = nix::Error::from_raw(i32::from_le_bytes(buf[4..8].try_into().unwrap_or_default()));
    let detail = (stage == Stage::Exec).then(|| format!("{:?}", spec.args[0]));
    Err(ContainerError::Start {
        stage,
        errno,
        detail,
    })
}

/// Reports `stage` and the current errno on the pipe and leaves.
fn fail(plan: &Plan, stage: Stage) -> isize {
    let errno = nix::errno::Errno::last_raw();
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&(stage as u32).to_le_bytes());
    msg[4..].copy_from_slice(&errno.to_le_bytes());
    // SAFETY: write(2) and _exit(2) on our own fd and buffer.
    unsafe {
        libc::write(plan.err_w, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The cloned child. Raw syscalls only (see the module doc).
fn child_main(plan: &Plan, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> isize {
    // SAFETY (whole function): every pointer passed is a valid NUL-terminated
    // C string or a null-terminated array of them, owned by `plan`, `argv`
    // and `envp`, which outlive this call (the parent waits on the pipe).
    unsafe {
        let null = std::ptr::null::<libc::c_char>();
        // Nothing we mount may propagate back to the agent's namespace.
        if libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return fail(plan, Stage::Private);
        }
        // pivot_root needs the new root to be a mount point.
        if libc::mount(
            plan.root.as_ptr(),
            plan.root.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return fail(plan, Stage::BindRoot);
        }
        // A fresh /dev: tmpfs, the default devices, devpts, shm.
        if libc::mount(
            c"tmpfs".as_ptr(),
            plan.dev.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_STRICTATIME,
            c"mode=755,size=65536k".as_ptr().cast(),
        ) != 0
        {
            return fail(plan, Stage::Dev);
        }
        for (path, mode, dev) in &plan.devices {
            if libc::mknod(path.as_ptr(), *mode, *dev) != 0 {
                return fail(plan, Stage::Dev);
            }
            libc::chmod(path.as_ptr(), *mode & 0o777);
        }
        libc::mkdir(plan.dev_pts.as_ptr(), 0o755);
        libc::mkdir(plan.dev_shm.as_ptr(), 0o1777);
        if libc::mount(
            c"devpts".as_ptr(),
            plan.dev_pts.as_ptr(),
            c"devpts".as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            c"newinstance,ptmxmode=0666,mode=0620".as_ptr().cast(),
        ) != 0
        {
            return fail(plan, Stage::Dev);
        }
        libc::symlink(plan.ptmx_target.as_ptr(), plan.ptmx.as_ptr());
        if libc::mount(
            c"shm".as_ptr(),
            plan.dev_shm.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=1777,size=65536k".as_ptr().cast(),
        ) != 0
        {
            return fail(plan, Stage::Dev);
        }
        for m in &plan.mounts {
            let data = m
                .data
                .as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast());
            if libc::mount(
                m.source.as_ptr(),
                m.target.as_ptr(),
                m.fstype.as_ptr(),
                m.flags,
                data,
            ) != 0
            {
                return fail(plan, Stage::Mount);
            }
            if m.remount_ro
                && libc::mount(
                    null,
                    m.target.as_ptr(),
                    null,
                    m.flags | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ) != 0
            {
                return fail(plan, Stage::Mount);
            }
        }
        // pivot_root(".", "."): the old root ends up stacked on the new one
        // and is detached at once; no directory in the rootfs is needed.
        if libc::chdir(plan.root.as_ptr()) != 0 {
            return fail(plan, Stage::PivotRoot);
        }
        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0 {
            if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
                return fail(plan, Stage::PivotRoot);
            }
        } else if nix::errno::Errno::last_raw() == libc::EINVAL {
            // The agent's own root is still the initramfs (rootfs), which
            // pivot_root refuses: its switch to a tmpfs at boot failed. Move
            // the container's root over "/" in this mount namespace and
            // chroot into it (runc's --no-pivot); weaker, since a process
            // that keeps CAP_SYS_CHROOT could climb back to the initramfs.
            if libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                null,
                libc::MS_MOVE,
                std::ptr::null(),
            ) != 0
                || libc::chroot(c".".as_ptr()) != 0
            {
                return fail(plan, Stage::PivotRoot);
            }
        } else {
            return fail(plan, Stage::PivotRoot);
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return fail(plan, Stage::PivotRoot);
        }
        if plan.readonly
            && libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                std::ptr::null(),
            ) != 0
        {
            return fail(plan, Stage::ReadonlyRoot);
        }
        if let Some(h) = &plan.hostname {
            if libc::sethostname(h.as_ptr(), h.as_bytes().len()) != 0 {
                return fail(plan, Stage::Hostname);
            }
        }
        for (i, fd) in plan.stdio.iter().enumerate() {
            if libc::dup2(*fd, i as RawFd) < 0 {
                return fail(plan, Stage::Stdio);
            }
        }
        if libc::setgroups(plan.groups.len(), plan.groups.as_ptr()) != 0 {
            return fail(plan, Stage::Groups);
        }
        if libc::setresgid(plan.gid, plan.gid, plan.gid) != 0 {
            return fail(plan, Stage::Gid);
        }
        if libc::setresuid(plan.uid, plan.uid, plan.uid) != 0 {
            return fail(plan, Stage::Uid);
        }
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            return fail(plan, Stage::Cwd);
        }
        let mut errno = libc::ENOENT;
        for c in &plan.exec_candidates {
            libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr());
            // Keep the most telling error: EACCES beats ENOENT along PATH.
            let e = nix::errno::Errno::last_raw();
            if e != libc::ENOENT {
                errno = e;
            }
        }
        nix::errno::Errno::set_raw(errno);
        fail(plan, Stage::Exec)
    }
}

/// An fd pair for tests and callers that want a pipe as stdio.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe().map_err(std::io::Error::from)
}

/// `/dev/null` opened for reading, for a process without stdin.
pub fn null_stdin() -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_flags_and_data() {
        let (f, d) = parse_options(&[
            "ro".into(),
            "nosuid".into(),
            "rbind".into(),
            "mode=755".into(),
            "size=1m".into(),
        ]);
        assert!(f.contains(
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_BIND | MsFlags::MS_REC
        ));
        assert_eq!(d, ["mode=755", "size=1m"]);
        let (f, _) = parse_options(&["ro".into(), "rw".into()]);
        assert!(!f.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn mount_points_never_follow_symlinks() {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", root.path().join("evil")).unwrap();
        let e = mount_point(root.path(), Path::new("/evil/x"), false).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        let p = mount_point(root.path(), Path::new("/a/b/c"), false).unwrap();
        assert!(p.is_dir());
        let f = mount_point(root.path(), Path::new("/a/file"), true).unwrap();
        assert!(f.is_file());
    }
}
