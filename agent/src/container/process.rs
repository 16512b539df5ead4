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
//! A container's own process is made in two steps, as runc's create and
//! start: [`prepare`] clones it and lets it do all its set-up (namespaces,
//! cgroup, rootfs, mounts, stdio or its terminal), after which it says so on
//! the pipe and waits ([`Held`]); [`Held::release`] lets it go on to its
//! user, capabilities, seccomp and exec. The agent prepares at
//! CreateContainer, so the set-up runs while the host gets to StartContainer.
//!
//! An exec'd process takes the same path minus the rootfs: it joins the
//! container's namespaces (setns on fds opened before clone; the pid
//! namespace through the cloning thread, see [`exec`]) and cgroup.
//!
//! The network and IPC namespaces are the sandbox's: a container never gets
//! new ones, whatever its spec lists, because in Husk the VM is the pod and
//! its containers share both (what the pause container's namespaces do for
//! runc). A user namespace, when the spec asks for one, is made by the
//! clone and mapped by the parent before the child goes on; seccomp filters
//! are compiled at CreateContainer (`seccomp.rs`) and loaded by the child
//! (see docs/agent.md).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use husk_agent_api::mount::{parse_options, MountOptions};
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::unistd::Pid;
use oci_spec::runtime::LinuxNamespaceType;

use super::spec::{Mount, ValidProcess, ValidSpec};

/// Declares the stages once: the enum, and the decoding of the number the
/// child writes on its error pipe (which must list the same variants).
macro_rules! stages {
    ($first:ident $(, $rest:ident)* $(,)?) => {
        /// Where a container start failed.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Stage {
            $first = 1,
            $($rest,)*
        }

        impl Stage {
            fn from_u32(v: u32) -> Option<Self> {
                [Stage::$first $(, Stage::$rest)*]
                    .into_iter()
                    .find(|s| *s as u32 == v)
            }
        }
    };
}

stages!(
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
    Cgroup,
    OomScoreAdj,
    Sysctl,
    JoinNamespace,
    MaskPaths,
    Terminal,
    Rlimits,
    Capabilities,
    NoNewPrivileges,
    Seccomp,
    Sync,
);

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
    /// For a terminal: the child's end of a socketpair. The child opens a
    /// pty in the container's own devpts (so `tty` and ttyname work there),
    /// takes the slave as stdio and controlling terminal, and sends the
    /// master back on it ([`receive_console`]); the three fds above are
    /// then unused.
    pub console: Option<OwnedFd>,
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

struct PreparedMount {
    source: CString,
    target: CString,
    fstype: CString,
    flags: libc::c_ulong,
    data: Option<CString>,
    /// A read-only bind needs a second, remounting call.
    remount_ro: bool,
    /// The child makes the mount point: it may lie in the fresh /dev.
    is_file: bool,
}

/// A user namespace that does not own the sandbox's network and IPC
/// namespaces may not mount sysfs, mqueue or cgroup: sysfs becomes a
/// read-only bind of the guest's (runc does the same), the others are left
/// out (logged).
fn prepare_mount(
    root: &Path,
    share: &Path,
    m: &Mount,
    userns: bool,
) -> Result<Option<PreparedMount>, ContainerError> {
    let mut m = m.clone();
    if userns {
        match m.kind.as_str() {
            "sysfs" => {
                m.kind = "bind".into();
                m.source = Some(PathBuf::from("/sys"));
                m.options.extend(["rbind".to_string(), "ro".to_string()]);
                return prepare_bind(root, Path::new("/sys"), &m).map(Some);
            }
            "mqueue" | "cgroup" | "cgroup2" => {
                tracing::warn!(
                    "{} on {}: not possible in a user namespace here; left out",
                    m.kind,
                    m.destination.display()
                );
                return Ok(None);
            }
            _ => {}
        }
    }
    if m.kind == "bind" {
        // Bind sources live in the sandbox share, like the rootfs.
        let src = m.source.clone().unwrap_or_default();
        let rel = src.strip_prefix("/").unwrap_or(&src);
        return prepare_bind(root, &share.join(rel), &m).map(Some);
    }
    prepare_other(root, &m).map(Some)
}

fn prepare_bind(root: &Path, source: &Path, m: &Mount) -> Result<PreparedMount, ContainerError> {
    prepare_one(root, source.to_path_buf(), m, true)
}

fn prepare_other(root: &Path, m: &Mount) -> Result<PreparedMount, ContainerError> {
    let source = m.source.clone().unwrap_or_else(|| PathBuf::from(&m.kind));
    prepare_one(root, source, m, false)
}

fn prepare_one(
    root: &Path,
    source: PathBuf,
    m: &Mount,
    bind: bool,
) -> Result<PreparedMount, ContainerError> {
    // Propagation options are not applied: the container's mount namespace
    // is private to it (made so before any mount), as before.
    let MountOptions {
        mut flags, data, ..
    } = parse_options(&m.options);
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
        is_file,
    })
}

/// Device nodes every container gets (OCI runtime spec, "Default Devices").
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// What a fresh container's child sets up before it becomes the process.
struct RootfsPlan {
    root: CString,
    dev: CString,
    /// (path in the new /dev, the guest's node bound over it): the default
    /// devices, then the spec's (staged, see nodes.rs).
    devices: Vec<(CString, CString)>,
    /// Directories the spec's nodes need in the new /dev, parents first.
    dev_dirs: Vec<CString>,
    dev_pts: CString,
    dev_shm: CString,
    ptmx: CString,
    ptmx_target: CString,
    mounts: Vec<PreparedMount>,
    readonly: bool,
    hostname: Option<CString>,
    sysctls: Vec<(CString, CString)>,
    /// (path, is a directory) to hide; paths to make read-only.
    masked: Vec<CString>,
    readonly_paths: Vec<CString>,
}

/// Everything the child needs, prepared before `clone`.
struct Plan {
    rootfs: Option<RootfsPlan>,
    /// Namespaces to join (exec): (fd, CLONE_NEW* type).
    join: Vec<(RawFd, libc::c_int)>,
    /// The container cgroup's `cgroup.procs`, or -1 (tests on a v1 host).
    cgroup_procs: RawFd,
    oom_score_adj: Option<CString>,
    terminal: bool,
    rlimits: Vec<(u32, libc::rlimit)>,
    caps: Option<super::spec::CapSets>,
    no_new_privileges: bool,
    /// BPF programs to install (the container's profile, see seccomp.rs).
    seccomp: Vec<super::seccomp::Program>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    cwd: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    exec_candidates: Vec<CString>,
    stdio: [RawFd; 3],
    /// The console socket's child end, or -1.
    console: RawFd,
    /// The child waits for one byte here before anything else: the parent
    /// first writes its id maps and oom_score_adj (see [`spawn`]).
    sync_r: RawFd,
    /// In a new user namespace: become its root (our host ids are not
    /// mapped there) before touching any filesystem.
    userns_root: bool,
    err_w: RawFd,
    /// Once set up, report [`HELD`] and wait for one byte here before going
    /// on to exec; -1: go straight on.
    hold_r: RawFd,
}

/// What a held child writes on its error pipe where a failure would go: no
/// stage has this code.
const HELD: [u8; 8] = [0xff; 8];

fn exec_candidates(spec: &ValidProcess) -> Result<Vec<CString>, ContainerError> {
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
            // The sandbox's (see the module doc).
            LinuxNamespaceType::Ipc | LinuxNamespaceType::Network => CloneFlags::empty(),
            LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
            // It owns the others made with it; the maps come from us.
            LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
            other => {
                return Err(ContainerError::Prepare(format!(
                    "{other:?} namespaces are not supported yet"
                )))
            }
        };
    }
    Ok(f)
}

/// The process half of a plan, from a checked `process` object and what the
/// image at `image_root` says about its user (groups, HOME; see user.rs).
fn process_plan(
    p: &ValidProcess,
    image_root: &Path,
    stdio: &Stdio,
    cgroup_procs: RawFd,
    err_w: RawFd,
) -> Result<Plan, ContainerError> {
    let image = super::user::lookup(image_root, p.uid, p.gid);
    let mut groups = p.additional_gids.clone();
    groups.extend(image.groups);
    groups.sort_unstable();
    groups.dedup();
    let mut env = p.env.clone();
    if let Some(home) = image.home {
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(format!("HOME={home}"));
        }
    }
    Ok(Plan {
        rootfs: None,
        join: Vec::new(),
        cgroup_procs,
        oom_score_adj: p
            .oom_score_adj
            .map(|v| cstr(v.to_string().as_bytes()))
            .transpose()?,
        terminal: p.terminal,
        rlimits: p
            .rlimits
            .iter()
            .map(|(r, soft, hard)| {
                (
                    *r,
                    libc::rlimit {
                        rlim_cur: *soft,
                        rlim_max: *hard,
                    },
                )
            })
            .collect(),
        caps: p.capabilities,
        no_new_privileges: p.no_new_privileges,
        seccomp: Vec::new(),
        uid: p.uid,
        gid: p.gid,
        groups,
        cwd: cpath(&p.cwd)?,
        argv: p
            .args
            .iter()
            .map(|a| cstr(a.as_bytes()))
            .collect::<Result<_, _>>()?,
        envp: env
            .iter()
            .map(|e| cstr(e.as_bytes()))
            .collect::<Result<_, _>>()?,
        exec_candidates: exec_candidates(p)?,
        stdio: [
            stdio.stdin.as_raw_fd(),
            stdio.stdout.as_raw_fd(),
            stdio.stderr.as_raw_fd(),
        ],
        console: stdio.console.as_ref().map_or(-1, |c| c.as_raw_fd()),
        sync_r: -1,
        userns_root: false,
        err_w,
        hold_r: -1,
    })
}

fn open_cgroup_procs(cgroup_procs: &Path) -> Result<OwnedFd, ContainerError> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(cgroup_procs)
        .map(OwnedFd::from)
        .map_err(|e| ContainerError::Prepare(format!("{}: {e}", cgroup_procs.display())))
}

/// A container's process that has done all its set-up and waits to be let
/// go to exec (what runc's create leaves for its start). Dropped unreleased,
/// it is killed.
#[derive(Debug)]
pub struct Held {
    pid: Pid,
    /// One byte here lets it go on.
    go: Option<OwnedFd>,
    /// EOF once it has exec'd; (stage, errno) when a step after the hold
    /// failed.
    err_r: Option<OwnedFd>,
    /// argv\[0\], for an exec failure's message.
    program: String,
}

impl Held {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Lets it go on to its user, capabilities, seccomp and exec; returns
    /// once it has exec'd, or where it failed (it has then exited).
    pub fn release(mut self) -> Result<Pid, ContainerError> {
        let t0 = std::time::Instant::now();
        let (Some(go), Some(err_r)) = (self.go.take(), self.err_r.take()) else {
            return Err(ContainerError::Prepare("released twice".into()));
        };
        nix::unistd::write(&go, &[1]).map_err(|e| ContainerError::Start {
            stage: Stage::Sync,
            errno: e,
            detail: Some("the held process is gone".into()),
        })?;
        drop(go);
        let (buf, got) = read_report(err_r);
        if got == 0 {
            tracing::debug!(pid = %self.pid, exec_us = t0.elapsed().as_micros() as u64, "held process released");
            return Ok(self.pid);
        }
        let program = &self.program;
        Err(failure(&buf, |stage, _| {
            (stage == Stage::Exec).then(|| format!("{program:?}"))
        }))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.go.is_some() {
            // Never released: it must not linger in the container's cgroup.
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Makes the container's process and lets it set itself up as far as its
/// exec, where it waits ([`Held`]). `root` is its rootfs in the guest (in
/// the share, or an overlay over it); `share` is the sandbox's shared
/// directory, which bind sources are relative to. The child moves itself
/// into the cgroup whose `cgroup.procs` is given before it does anything
/// else.
pub fn prepare(
    spec: &ValidSpec,
    root: &Path,
    share: &Path,
    stdio: Stdio,
    cgroup_procs: Option<&Path>,
    seccomp: &[super::seccomp::Program],
) -> Result<Held, ContainerError> {
    let root = root.to_path_buf();
    if !root.is_dir() {
        return Err(ContainerError::Prepare(format!(
            "rootfs {} is not a directory",
            root.display()
        )));
    }
    let t0 = std::time::Instant::now();
    let flags = clone_flags(spec)?;
    let userns = flags.contains(CloneFlags::CLONE_NEWUSER);
    let mounts: Vec<PreparedMount> = spec
        .mounts
        .iter()
        .map(|m| prepare_mount(&root, share, m, userns))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let mounts_ready = t0.elapsed();
    let dev = mount_point(&root, Path::new("/dev"), false)?;
    let cg = cgroup_procs.map(open_cgroup_procs).transpose()?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Prepare(format!("pipe: {e}")))?;
    let cg_fd = cg.as_ref().map_or(-1, |f| f.as_raw_fd());
    let before_user = t0.elapsed();
    let mut plan = process_plan(&spec.process, &root, &stdio, cg_fd, err_w.as_raw_fd())?;
    let user_ready = t0.elapsed();
    plan.seccomp = seccomp.to_vec();
    // Paths inside the container, used after pivot_root.
    let inside = |p: &Path| cpath(&Path::new("/").join(p));
    // Made before the clone and removed when this function returns: by
    // then the child has bound them (or failed).
    let staged = if spec.devices.is_empty() {
        None
    } else {
        Some(super::nodes::stage(&spec.devices)?)
    };
    let mut devices = DEVICES
        .iter()
        .map(|n| Ok((cpath(&dev.join(n))?, cpath(&Path::new("/dev").join(n))?)))
        .collect::<Result<Vec<_>, ContainerError>>()?;
    for (n, node) in spec
        .devices
        .iter()
        .zip(staged.iter().flat_map(|s| s.nodes.iter()))
    {
        devices.push((cpath(&dev.join(&n.path))?, cpath(node)?));
    }
    plan.rootfs = Some(RootfsPlan {
        root: cpath(&root)?,
        devices,
        dev_dirs: super::nodes::parent_dirs(&spec.devices)
            .iter()
            .map(|d| cpath(&dev.join(d)))
            .collect::<Result<_, _>>()?,
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
        sysctls: spec
            .sysctls
            .iter()
            .map(|(k, v)| {
                Ok((
                    cstr(format!("/proc/sys/{}", k.replace('.', "/")).as_bytes())?,
                    cstr(v.as_bytes())?,
                ))
            })
            .collect::<Result<_, ContainerError>>()?,
        masked: spec
            .masked_paths
            .iter()
            .map(|p| inside(p))
            .collect::<Result<_, _>>()?,
        readonly_paths: spec
            .readonly_paths
            .iter()
            .map(|p| inside(p))
            .collect::<Result<_, _>>()?,
    });
    let id_maps = flags.contains(CloneFlags::CLONE_NEWUSER).then(|| {
        let lines = |m: &[(u32, u32, u32)]| {
            m.iter()
                .map(|(c, h, n)| format!("{c} {h} {n}\n"))
                .collect::<String>()
        };
        (lines(&spec.uid_mappings), lines(&spec.gid_mappings))
    });
    plan.userns_root = id_maps.is_some();
    tracing::debug!(
        prepare_us = t0.elapsed().as_micros() as u64,
        mount_points_us = mounts_ready.as_micros() as u64,
        user_us = user_ready.saturating_sub(before_user).as_micros() as u64,
        mounts = plan.rootfs.as_ref().map_or(0, |r| r.mounts.len()),
        "process planned"
    );
    let held = spawn(&mut plan, flags, None, err_r, err_w, stdio, id_maps, true);
    drop((cg, staged));
    match held? {
        Spawned::Held(h) => Ok(h),
        Spawned::Execd(_) => Err(ContainerError::Prepare(
            "the process went past its hold".into(),
        )),
    }
}

/// Starts another process in the running container whose init is
/// `init_pid`: the same namespaces and cgroup.
pub fn exec(
    p: &ValidProcess,
    init_pid: Pid,
    stdio: Stdio,
    cgroup_procs: &Path,
    seccomp: &[super::seccomp::Program],
) -> Result<Pid, ContainerError> {
    let ns_file = |name: &str| -> Result<OwnedFd, ContainerError> {
        let path = format!("/proc/{init_pid}/ns/{name}");
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map(OwnedFd::from)
            .map_err(|e| {
                ContainerError::Prepare(format!("{path}: {e} (has the container exited?)"))
            })
    };
    let pid_ns = ns_file("pid")?;
    // The mount namespace last: after it, /proc is the container's.
    let mut joined = Vec::new();
    // A user namespace first, when the container has its own: the others
    // belong to it.
    let same = |a: &str, b: &str| {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.ino() == y.ino() && x.dev() == y.dev(),
            _ => true,
        }
    };
    let own_userns = !same("/proc/self/ns/user", &format!("/proc/{init_pid}/ns/user"));
    if own_userns {
        joined.push((ns_file("user")?, libc::CLONE_NEWUSER));
    }
    for (name, kind) in [
        ("uts", libc::CLONE_NEWUTS),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        joined.push((ns_file(name)?, kind));
    }
    let cg = open_cgroup_procs(cgroup_procs)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Prepare(format!("pipe: {e}")))?;
    // The container's own root, through procfs.
    let image_root = PathBuf::from(format!("/proc/{init_pid}/root"));
    let mut plan = process_plan(p, &image_root, &stdio, cg.as_raw_fd(), err_w.as_raw_fd())?;
    plan.seccomp = seccomp.to_vec();
    plan.join = joined.iter().map(|(fd, k)| (fd.as_raw_fd(), *k)).collect();
    plan.userns_root = own_userns;
    let spawned = spawn(
        &mut plan,
        CloneFlags::empty(),
        Some(pid_ns),
        err_r,
        err_w,
        stdio,
        None,
        false,
    )?;
    drop(joined);
    drop(cg);
    match spawned {
        Spawned::Execd(pid) => Ok(pid),
        Spawned::Held(_) => Err(ContainerError::Prepare("an exec was held".into())),
    }
}

/// What [`spawn`] left running.
enum Spawned {
    Execd(Pid),
    Held(Held),
}

/// Reads the child's report from its error pipe: (bytes, how many); none at
/// EOF means it exec'd.
fn read_report(err_r: OwnedFd) -> ([u8; 8], usize) {
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
    (buf, got)
}

/// The error a child reported as (stage and item, errno); `detail` names
/// the item.
fn failure(buf: &[u8; 8], detail: impl Fn(Stage, usize) -> Option<String>) -> ContainerError {
    let code = u32::from_le_bytes(buf[..4].try_into().unwrap_or_default());
    let (stage, item) = (
        Stage::from_u32(code & 0xff).unwrap_or(Stage::Exec),
        (code >> 8) as usize,
    );
    let errno = nix::Error::from_raw(i32::from_le_bytes(buf[4..8].try_into().unwrap_or_default()));
    ContainerError::Start {
        stage,
        errno,
        detail: detail(stage, item),
    }
}

/// Clones the child that carries out `plan` and waits until it has exec'd
/// (or, with `hold`, set itself up and stopped before its exec; or reports
/// where it failed). With `pid_ns`, the clone happens on a
/// thread of its own that first joins that pid namespace: setns(CLONE_NEWPID)
/// changes only the calling thread's children, and a throwaway thread keeps
/// the agent's worker threads out of the container's namespace.
#[allow(clippy::too_many_arguments)]
fn spawn(
    plan: &mut Plan,
    flags: CloneFlags,
    pid_ns: Option<OwnedFd>,
    err_r: OwnedFd,
    err_w: OwnedFd,
    stdio: Stdio,
    id_maps: Option<(String, String)>,
    hold: bool,
) -> Result<Spawned, ContainerError> {
    let (sync_r, sync_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Prepare(format!("pipe: {e}")))?;
    plan.sync_r = sync_r.as_raw_fd();
    let (hold_r, go) = if hold {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ContainerError::Prepare(format!("pipe: {e}")))?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    plan.hold_r = hold_r.as_ref().map_or(-1, |r| r.as_raw_fd());
    let plan = &*plan;
    let do_clone = || -> Result<Pid, ContainerError> {
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
        let child = Box::new(|| -> isize { child_main(plan, &argv, &envp) });
        // SAFETY: the child runs `child_main`, which makes only raw syscalls
        // on data prepared above (no allocation, no locks) and ends in exec
        // or _exit; the stack is ours and large enough for that.
        unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
            .map_err(ContainerError::Clone)
    };
    let t0 = std::time::Instant::now();
    let pid = match pid_ns {
        None => do_clone()?,
        Some(ns) => std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWPID).map_err(|e| {
                    ContainerError::Start {
                        stage: Stage::JoinNamespace,
                        errno: e,
                        detail: Some("pid".into()),
                    }
                })?;
                do_clone()
            })
            .join()
            .unwrap_or_else(|_| Err(ContainerError::Prepare("the clone thread panicked".into())))
        })?,
    };
    let cloned = t0.elapsed();
    drop((sync_r, hold_r));
    if let Err(e) = release(pid, plan, id_maps, sync_w) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        return Err(e);
    }
    let released = t0.elapsed();
    drop(err_w);
    drop(stdio);
    // The child keeps a copy of the error pipe's read end until it execs
    // (or closes it before its hold): reading it is what we wait on.
    let report = err_r
        .try_clone()
        .map_err(|e| ContainerError::Prepare(format!("dup: {e}")))?;
    let (buf, got) = read_report(report);
    if got == buf.len() && buf == HELD {
        tracing::debug!(
            %pid,
            clone_us = cloned.as_micros() as u64,
            release_us = released.saturating_sub(cloned).as_micros() as u64,
            setup_us = t0.elapsed().saturating_sub(released).as_micros() as u64,
            "process held"
        );
        return Ok(Spawned::Held(Held {
            pid,
            go,
            err_r: Some(err_r),
            program: plan.argv[0].to_string_lossy().into_owned(),
        }));
    }
    drop(go);
    if got == 0 && !hold {
        // Where a start's time goes (the child's set-up and its exec are
        // the last figure: the error pipe closes on exec).
        tracing::debug!(
            %pid,
            clone_us = cloned.as_micros() as u64,
            release_us = released.saturating_sub(cloned).as_micros() as u64,
            setup_and_exec_us = t0.elapsed().saturating_sub(released).as_micros() as u64,
            "process launched"
        );
        return Ok(Spawned::Execd(pid));
    }
    if got == 0 {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        return Err(ContainerError::Prepare(
            "the process ended before its set-up was done".into(),
        ));
    }
    // The child failed before exec; the reaper collects it (its exit is
    // registered under this pid by the caller, which drops the receiver).
    Err(failure(&buf, |stage, item| match stage {
        Stage::Exec => Some(format!("{:?}", plan.argv[0])),
        Stage::Mount => plan
            .rootfs
            .as_ref()
            .and_then(|r| r.mounts.get(item))
            .map(|m| format!("mounts[{item}] on {:?}", m.target)),
        Stage::Dev => plan
            .rootfs
            .as_ref()
            .and_then(|r| r.devices.get(item))
            .map(|(path, _)| format!("{path:?}")),
        Stage::Sysctl => plan
            .rootfs
            .as_ref()
            .and_then(|r| r.sysctls.get(item))
            .map(|(k, _)| format!("{k:?}")),
        _ => None,
    }))
}

/// What the parent does for a fresh child before letting it go: its uid
/// and gid maps (one write each, as the kernel wants), its oom_score_adj.
fn release(
    pid: Pid,
    plan: &Plan,
    id_maps: Option<(String, String)>,
    go: OwnedFd,
) -> Result<(), ContainerError> {
    let write = |file: &str, what: &[u8], stage: Stage| {
        std::fs::write(format!("/proc/{pid}/{file}"), what).map_err(|e| ContainerError::Start {
            stage,
            errno: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            detail: Some(file.to_string()),
        })
    };
    if let Some((uid_map, gid_map)) = id_maps {
        write("uid_map", uid_map.as_bytes(), Stage::Sync)?;
        write("gid_map", gid_map.as_bytes(), Stage::Sync)?;
    }
    if let Some(v) = &plan.oom_score_adj {
        write("oom_score_adj", v.as_bytes(), Stage::OomScoreAdj)?;
    }
    nix::unistd::write(&go, &[1]).map_err(|e| ContainerError::Start {
        stage: Stage::Sync,
        errno: e,
        detail: None,
    })?;
    Ok(())
}

/// Reports `stage` and the current errno on the pipe and leaves.
fn fail(plan: &Plan, stage: Stage) -> isize {
    fail_at(plan, stage, 0)
}

/// Reports `stage`, which of its items (a mount's index) failed, and the
/// current errno on the pipe, and leaves.
fn fail_at(plan: &Plan, stage: Stage, item: usize) -> isize {
    let errno = nix::errno::Errno::last_raw();
    let mut msg = [0u8; 8];
    let code = (stage as u32) | ((item.min(0xff_ffff) as u32) << 8);
    msg[..4].copy_from_slice(&code.to_le_bytes());
    msg[4..].copy_from_slice(&errno.to_le_bytes());
    // SAFETY: write(2) and _exit(2) on our own fd and buffer.
    unsafe {
        libc::write(plan.err_w, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// Writes a whole small value to `path` (procfs files). Raw syscalls.
///
/// # Safety
/// `path` and `value` are valid C strings.
unsafe fn write_file(path: &CString, value: &CString) -> bool {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return false;
    }
    let n = value.as_bytes().len();
    let ok = libc::write(fd, value.as_ptr().cast(), n) == n as isize;
    libc::close(fd);
    ok
}

/// The cloned child. Raw syscalls only (see the module doc).
fn child_main(plan: &Plan, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> isize {
    // SAFETY (whole function): every pointer passed is a valid NUL-terminated
    // C string or a null-terminated array of them, owned by `plan`, `argv`
    // and `envp`, which outlive this call (the parent waits on the pipe).
    unsafe {
        // Until the parent has mapped our ids (a user namespace) and set
        // oom_score_adj (lowering it needs the agent's privilege).
        let mut go = 0u8;
        if libc::read(plan.sync_r, (&mut go as *mut u8).cast(), 1) != 1 {
            return fail(plan, Stage::Sync);
        }
        // Into the container's cgroup first, so that everything it does is
        // accounted and limited ("0" means the writer).
        if plan.cgroup_procs >= 0 && libc::write(plan.cgroup_procs, c"0".as_ptr().cast(), 1) != 1 {
            return fail(plan, Stage::Cgroup);
        }

        for (fd, kind) in &plan.join {
            if libc::setns(*fd, *kind) != 0 {
                return fail(plan, Stage::JoinNamespace);
            }
        }
        // In a user namespace (made by clone, or joined): become its root,
        // since our host ids are not mapped there.
        if plan.userns_root && (sys_setresgid(0) != 0 || sys_setresuid(0) != 0) {
            return fail(plan, Stage::Sync);
        }

        if let Some(r) = &plan.rootfs {
            if let Err((stage, item)) = setup_rootfs(r) {
                return fail_at(plan, stage, item);
            }
        }
        if plan.console >= 0 {
            if !open_console(plan.console) {
                return fail(plan, Stage::Terminal);
            }
        } else {
            for (i, fd) in plan.stdio.iter().enumerate() {
                if libc::dup2(*fd, i as RawFd) < 0 {
                    return fail(plan, Stage::Stdio);
                }
            }
        }
        if plan.terminal && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0) {
            return fail(plan, Stage::Terminal);
        }
        if plan.hold_r >= 0 && !hold(plan) {
            // Let go unstarted: the container is being removed.
            libc::_exit(127);
        }
        for (resource, limit) in &plan.rlimits {
            if libc::setrlimit(*resource as _, limit) != 0 {
                return fail(plan, Stage::Rlimits);
            }
        }
        // Without no_new_privileges installing a filter needs CAP_SYS_ADMIN:
        // do it while root still has it (runc's order); the profile must
        // then allow what follows (setuid, capset, execve), as real ones do.
        if !plan.no_new_privileges && !install_seccomp(&plan.seccomp) {
            return fail(plan, Stage::Seccomp);
        }
        if libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr()) != 0 {
            return fail(plan, Stage::Groups);
        }
        if sys_setresgid(plan.gid) != 0 {
            return fail(plan, Stage::Gid);
        }
        if let Some(caps) = &plan.caps {
            // The bounding set first (it needs CAP_SETPCAP, still held);
            // keep the permitted set across the uid change.
            for cap in 0..64u32 {
                if caps.bounding & (1u64 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong) == 1
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) != 0
                {
                    return fail(plan, Stage::Capabilities);
                }
            }
            if libc::prctl(libc::PR_SET_KEEPCAPS, 1) != 0 {
                return fail(plan, Stage::Capabilities);
            }
        }
        if sys_setresuid(plan.uid) != 0 {
            return fail(plan, Stage::Uid);
        }
        if let Some(caps) = &plan.caps {
            if !set_capabilities(caps) {
                return fail(plan, Stage::Capabilities);
            }
        }
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            return fail(plan, Stage::Cwd);
        }
        if plan.no_new_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail(plan, Stage::NoNewPrivileges);
        }
        // With it, as late as possible: only execve runs under the filter.
        if plan.no_new_privileges && !install_seccomp(&plan.seccomp) {
            return fail(plan, Stage::Seccomp);
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

/// Reports [`HELD`] and waits for the parent's byte. First closes every
/// descriptor but its error pipe and the hold's: the agent's fds it got at
/// the clone (another process's pipes among them) would otherwise stay
/// open for as long as it waits, and a pipe's reader waits for EOF.
/// False: let go without a start (the parent closed its end).
///
/// # Safety
/// Called in the cloned child only, with `plan`'s fds open.
unsafe fn hold(plan: &Plan) -> bool {
    let (lo, hi) = if plan.err_w < plan.hold_r {
        (plan.err_w, plan.hold_r)
    } else {
        (plan.hold_r, plan.err_w)
    };
    let close_range = |first: RawFd, last: libc::c_uint| {
        if first as libc::c_uint <= last {
            libc::syscall(libc::SYS_close_range, first as libc::c_uint, last, 0);
        }
    };
    close_range(3, (lo - 1) as libc::c_uint);
    close_range(lo + 1, (hi - 1) as libc::c_uint);
    close_range(hi + 1, libc::c_uint::MAX);
    if libc::write(plan.err_w, HELD.as_ptr().cast(), HELD.len()) != HELD.len() as isize {
        return false;
    }
    let mut go = 0u8;
    libc::read(plan.hold_r, (&mut go as *mut u8).cast(), 1) == 1
}

/// setresuid(2) as the raw syscall. The libc wrappers (glibc's setxid,
/// musl's __synccall) apply ids to every thread they know of: in a child
/// cloned from the multi-threaded agent they signal threads that are not
/// ours and wait for them forever (seen as a hang in the tests). The child
/// has one thread; the syscall is all it needs.
///
/// # Safety
/// Called in the cloned child only.
unsafe fn sys_setresuid(uid: libc::uid_t) -> libc::c_long {
    libc::syscall(libc::SYS_setresuid, uid, uid, uid)
}

/// setresgid(2) as the raw syscall; see [`sys_setresuid`].
///
/// # Safety
/// Called in the cloned child only.
unsafe fn sys_setresgid(gid: libc::gid_t) -> libc::c_long {
    libc::syscall(libc::SYS_setresgid, gid, gid, gid)
}

/// Installs the programs (seccomp(2) without flags). Raw syscalls.
///
/// # Safety
/// Called in the cloned child only.
unsafe fn install_seccomp(programs: &[super::seccomp::Program]) -> bool {
    for p in programs {
        let prog = libc::sock_fprog {
            len: p.len() as u16,
            // seccompiler's sock_filter has libc's layout (repr(C)).
            filter: p.as_ptr() as *mut libc::sock_filter,
        };
        if libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        ) != 0
        {
            return false;
        }
    }
    true
}

/// Opens a pty in the container's devpts (its /dev/ptmx), makes the slave
/// fds 0-2, and sends the master over `sock` (SCM_RIGHTS). Raw syscalls,
/// stack buffers only.
///
/// # Safety
/// Called in the cloned child only.
unsafe fn open_console(sock: RawFd) -> bool {
    let master = libc::open(
        c"/dev/ptmx".as_ptr(),
        libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
    );
    if master < 0 {
        return false;
    }
    let unlock: libc::c_int = 0;
    if libc::ioctl(master, libc::TIOCSPTLCK, &unlock) != 0 {
        return false;
    }
    // The slave straight from the master (Linux 4.13+): no path to build.
    let slave = libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY);
    if slave < 0 {
        return false;
    }
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // 32 bytes, 8-aligned: more than CMSG_SPACE(one int) on 64-bit.
    let mut control = [0u64; 4];
    let mut msg: libc::msghdr = std::mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as _;
    let cmsg = libc::CMSG_FIRSTHDR(&msg);
    if cmsg.is_null() {
        return false;
    }
    (*cmsg).cmsg_level = libc::SOL_SOCKET;
    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), master);
    if libc::sendmsg(sock, &msg, 0) != 1 {
        return false;
    }
    libc::close(master);
    for i in 0..3 {
        if libc::dup2(slave, i) < 0 {
            return false;
        }
    }
    if slave > 2 {
        libc::close(slave);
    }
    true
}

/// The pty master a terminal process's child sent (see [`Stdio::console`]).
/// Call once the child has exec'd: the message is already queued.
pub fn receive_console(sock: &OwnedFd) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this fd for us; we own it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::other("the child sent no terminal"))
}

/// A socketpair for [`Stdio::console`]: (ours, the child's).
pub fn console_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// capset(2) with the effective, permitted and inheritable sets, then the
/// ambient ones raised. Raw syscalls; libc has no capset wrapper.
///
/// # Safety
/// Called in the cloned child only.
unsafe fn set_capabilities(c: &super::spec::CapSets) -> bool {
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
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let half = |m: u64, hi: bool| if hi { (m >> 32) as u32 } else { m as u32 };
    let data = [false, true].map(|hi| Data {
        effective: half(c.effective, hi),
        permitted: half(c.permitted, hi),
        inheritable: half(c.inheritable, hi),
    });
    if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
        return false;
    }
    for cap in 0..64u32 {
        if c.ambient & (1u64 << cap) != 0
            && libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                cap as libc::c_ulong,
                0,
                0,
            ) != 0
        {
            return false;
        }
    }
    true
}

/// The new container's filesystem view: private mounts, the rootfs bound
/// and pivoted to, /dev, the spec's mounts, sysctls, masked and read-only
/// paths, hostname. Raw syscalls only.
///
/// # Safety
/// Called in the cloned child only; `r`'s C strings are valid.
unsafe fn setup_rootfs(r: &RootfsPlan) -> Result<(), (Stage, usize)> {
    let null = std::ptr::null::<libc::c_char>();
    // Sysctls while /proc is still the agent's (it shows this child's
    // namespaces through /proc/self, and /proc/sys follows the writer's).
    for (i, (path, value)) in r.sysctls.iter().enumerate() {
        if !write_file(path, value) {
            return Err((Stage::Sysctl, i));
        }
    }
    // Nothing we mount may propagate back to the agent's namespace.
    if libc::mount(
        null,
        c"/".as_ptr(),
        null,
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        return Err((Stage::Private, 0));
    }
    // pivot_root needs the new root to be a mount point.
    if libc::mount(
        r.root.as_ptr(),
        r.root.as_ptr(),
        null,
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    ) != 0
    {
        return Err((Stage::BindRoot, 0));
    }
    // A fresh /dev: tmpfs, the default devices, devpts, shm. The tmpfs is
    // nodev and each default device a bind of the guest's own node (a bind
    // keeps devtmpfs's permission to open it): a node the container makes
    // with CAP_MKNOD (ttyS0, to forge the kernel's power-down line on the
    // console husk-vmm reads, or kmsg) cannot be opened.
    if libc::mount(
        c"tmpfs".as_ptr(),
        r.dev.as_ptr(),
        c"tmpfs".as_ptr(),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_STRICTATIME,
        c"mode=755,size=65536k".as_ptr().cast(),
    ) != 0
    {
        return Err((Stage::Dev, 0));
    }
    for d in &r.dev_dirs {
        if libc::mkdir(d.as_ptr(), 0o755) != 0 && nix::errno::Errno::last_raw() != libc::EEXIST {
            return Err((Stage::Dev, 0));
        }
    }
    for (i, (path, guest_node)) in r.devices.iter().enumerate() {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644,
        );
        if fd < 0 {
            return Err((Stage::Dev, i));
        }
        libc::close(fd);
        if libc::mount(
            guest_node.as_ptr(),
            path.as_ptr(),
            null,
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err((Stage::Dev, i));
        }
    }
    libc::mkdir(r.dev_pts.as_ptr(), 0o755);
    libc::mkdir(r.dev_shm.as_ptr(), 0o1777);
    if libc::mount(
        c"devpts".as_ptr(),
        r.dev_pts.as_ptr(),
        c"devpts".as_ptr(),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        c"newinstance,ptmxmode=0666,mode=0620".as_ptr().cast(),
    ) != 0
    {
        return Err((Stage::Dev, 0));
    }
    libc::symlink(r.ptmx_target.as_ptr(), r.ptmx.as_ptr());
    if libc::mount(
        c"shm".as_ptr(),
        r.dev_shm.as_ptr(),
        c"tmpfs".as_ptr(),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        c"mode=1777,size=65536k".as_ptr().cast(),
    ) != 0
    {
        return Err((Stage::Dev, 0));
    }
    for (i, m) in r.mounts.iter().enumerate() {
        // Mount points below /dev exist only now, in the fresh tmpfs.
        if m.is_file {
            let fd = libc::open(
                m.target.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            );
            if fd >= 0 {
                libc::close(fd);
            }
        } else {
            libc::mkdir(m.target.as_ptr(), 0o755);
        }
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
            return Err((Stage::Mount, i));
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
            return Err((Stage::Mount, i));
        }
    }
    // pivot_root(".", "."): the old root ends up stacked on the new one
    // and is detached at once; no directory in the rootfs is needed.
    if libc::chdir(r.root.as_ptr()) != 0 {
        return Err((Stage::PivotRoot, 0));
    }
    if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0 {
        if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
            return Err((Stage::PivotRoot, 0));
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
            return Err((Stage::PivotRoot, 0));
        }
    } else {
        return Err((Stage::PivotRoot, 0));
    }
    if libc::chdir(c"/".as_ptr()) != 0 {
        return Err((Stage::PivotRoot, 0));
    }
    // Masked paths: /dev/null over files, an empty read-only tmpfs over
    // directories; a path the image lacks is skipped.
    for p in &r.masked {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(p.as_ptr(), &mut st) != 0 {
            continue;
        }
        let ok = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            libc::mount(
                c"tmpfs".as_ptr(),
                p.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                c"size=0".as_ptr().cast(),
            ) == 0
        } else {
            libc::mount(
                c"/dev/null".as_ptr(),
                p.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            ) == 0
        };
        if !ok {
            return Err((Stage::MaskPaths, 0));
        }
    }
    for p in &r.readonly_paths {
        if libc::access(p.as_ptr(), libc::F_OK) != 0 {
            continue;
        }
        if libc::mount(
            p.as_ptr(),
            p.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
            || libc::mount(
                null,
                p.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                std::ptr::null(),
            ) != 0
        {
            return Err((Stage::MaskPaths, 0));
        }
    }
    if r.readonly
        && libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
            std::ptr::null(),
        ) != 0
    {
        return Err((Stage::ReadonlyRoot, 0));
    }
    if let Some(h) = &r.hostname {
        if libc::sethostname(h.as_ptr(), h.as_bytes().len()) != 0 {
            return Err((Stage::Hostname, 0));
        }
    }
    Ok(())
}

/// A pipe for a process's stdio. Close-on-exec: the child gets its ends
/// by dup2 (which clears the flag), and no other process, the container's
/// own included, may inherit them (a stdin pipe's write end held by its
/// reader would never give it EOF; another container's pipes must never
/// leak into this one).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// `/dev/null` opened for reading, for a process without stdin.
pub fn null_stdin() -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_use_the_shared_option_parser() {
        let root = tempfile::tempdir().unwrap();
        let m = |kind: &str, opts: &[&str]| Mount {
            destination: PathBuf::from("/x"),
            kind: kind.into(),
            source: Some(PathBuf::from("/src")),
            options: opts.iter().map(|o| o.to_string()).collect(),
        };
        // A read-only bind: bound first, then remounted read-only.
        let p = prepare_one(
            root.path(),
            "/src".into(),
            &m("bind", &["rbind", "ro", "rprivate"]),
            true,
        )
        .unwrap();
        assert!(p.remount_ro && p.data.is_none());
        assert_eq!(p.flags, (MsFlags::MS_BIND | MsFlags::MS_REC).bits());
        let p = prepare_one(
            root.path(),
            "/src".into(),
            &m("tmpfs", &["nosuid", "size=1m", "ro", "rw"]),
            false,
        )
        .unwrap();
        assert!(!p.remount_ro);
        assert_eq!(p.flags, MsFlags::MS_NOSUID.bits());
        assert_eq!(p.data.as_deref(), Some(c"size=1m"));
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
