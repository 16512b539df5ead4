//! husk-vmm as the [`Hypervisor`]: the VM's `VmConfig` is written to
//! `vmm.json` and husk-vmm started with `--config` and `--ready-fd`; the
//! ready byte says the vCPUs run (EOF: it died first). A pidfd follows the
//! process; the control socket (`api.sock`) stops it cleanly.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use husk_vmm::config::VmConfig;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{Hypervisor, PidFd, VmExit, VmProcess, VmSpec};
use crate::container::{
    self,
    fdmount::{self, Attrs, Kind},
};
use crate::error::{Error, Result};
use crate::layout::{PidFile, ProcessId, SandboxLayout, SHARE_TAG};

/// The husk-vmm binary: `$HUSK_VMM`, else beside this executable, else PATH.
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HUSK_VMM") {
        return p.into();
    }
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("husk-vmm")))
    {
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("husk-vmm")
}

/// The fd number husk-vmm gets the ready pipe on.
const READY_FD: i32 = 3;

/// The capabilities husk-vmm's file-system process keeps (the bounding set
/// is cut to these before exec, so root gets no others): it makes and
/// changes files in the share with the guest's ownership. KVM, vsock,
/// memory and the console need none, so husk-vmm itself, once set up and
/// its file-system process started, becomes an unprivileged user of its own
/// ([`vmm_user`]) and holds none of them. Everything else, among them
/// CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE and
/// CAP_SETPCAP, is gone from both.
pub const VMM_CAPABILITIES: [libc::c_int; 7] = [
    // chown to the guest's owners (FUSE SETATTR, files made for a guest uid).
    0, // CAP_CHOWN
    // Reach and write files of any owner in the share, as the guest's root can.
    1, // CAP_DAC_OVERRIDE
    // chmod/utimes on files the VMM's uid does not own.
    3, // CAP_FOWNER
    // Keep setgid bits when writing, as the guest kernel asked.
    4, // CAP_FSETID
    // The passthrough switches a thread's gid and uid to create as the guest's.
    6, // CAP_SETGID
    7, // CAP_SETUID
    // FIFOs, sockets and overlayfs whiteouts (char 0:0) the guest makes.
    27, // CAP_MKNOD
];

/// The first uid (and gid) of those husk-vmm runs as, and how many there
/// are: each VM gets one at random, so two VMMs share a user only by a
/// chance of about one in 16 million per pair. Far above any login user,
/// system user or container's subordinate range (typically 100000 to a few
/// million), below 2^31 for tools that read uids as signed numbers.
pub const VMM_UID_BASE: u32 = 0x4000_0000;
pub const VMM_UID_COUNT: u32 = 1 << 24;

/// A fresh uid/gid pair for one husk-vmm.
pub fn vmm_user() -> husk_vmm::config::User {
    let r = crate::layout::random_id();
    let n = u32::from_str_radix(&r[..6], 16).unwrap_or(0) % VMM_UID_COUNT;
    husk_vmm::config::User {
        uid: VMM_UID_BASE + n,
        gid: VMM_UID_BASE + n,
    }
}

/// What husk-vmm must still reach as `user` after it gives up root: the
/// sandbox directory to pass through (mode 0710, its group), the guest log's
/// listener to connect to (0660, its group), and the snapshot directory it
/// writes a template into (its own). Nothing else of the sandbox becomes
/// its: it can neither list nor change the directory.
fn grant(user: husk_vmm::config::User, layout: &SandboxLayout, spec: &VmSpec) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let group = |path: &Path, mode: u32| -> Result<()> {
        std::os::unix::fs::lchown(path, None, Some(user.gid))
            .map_err(Error::io("handing to husk-vmm's group", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(Error::io("setting the mode of", path))
    };
    group(layout.dir(), 0o710)?;
    let log =
        husk_agent_client::vsock::listener_path(&layout.vsock_socket(), husk_agent_api::LOG_PORT);
    if std::fs::symlink_metadata(&log).is_ok() {
        group(&log, 0o660)?;
    }
    if let Some(dir) = &spec.snapshot_to {
        // It reaches the directory by its path, as its user: every parent
        // must let others (or its group) pass.
        for parent in dir.ancestors().skip(1) {
            use std::os::unix::fs::MetadataExt;
            let Ok(meta) = std::fs::metadata(parent) else {
                continue;
            };
            let passable =
                meta.mode() & 0o001 != 0 || (meta.gid() == user.gid && meta.mode() & 0o010 != 0);
            if !passable {
                return Err(Error::InvalidArgument(format!(
                    "husk-vmm's user cannot reach the snapshot directory {}: {} does not let others pass (o+x)",
                    dir.display(),
                    parent.display()
                )));
            }
        }
        std::os::unix::fs::lchown(dir, Some(user.uid), Some(user.gid))
            .map_err(Error::io("handing to husk-vmm", dir))?;
    }
    Ok(())
}

/// The environment husk-vmm keeps from its caller: its log filter and Rust's
/// backtrace switch; everything else is cleared.
const VMM_ENV: [&str; 2] = ["HUSK_VMM_LOG", "RUST_BACKTRACE"];

/// The highest capability this kernel knows (`/proc/sys/kernel/cap_last_cap`),
/// read before the fork; Linux 6.1's when it cannot be read.
fn last_capability() -> libc::c_int {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// husk-vmm, started as our child.
#[derive(Debug, Default, Clone, Copy)]
pub struct HuskVmm;

impl HuskVmm {
    /// The VMM's own configuration for `spec` in `layout`.
    pub fn vm_config(spec: &VmSpec, layout: &SandboxLayout) -> VmConfig {
        let shared = spec.has_share();
        VmConfig {
            kernel: Some(spec.kernel.clone()),
            initramfs: Some(spec.initramfs.clone()),
            extra_cmdline: spec.extra_cmdline.clone(),
            vcpus: u64::from(spec.vcpus),
            memory_mib: u64::from(spec.memory_mib),
            serial_out: Some(layout.console_log()),
            vsock_socket: Some(layout.vsock_socket()),
            api_socket: Some(layout.api_socket()),
            shared_dir: shared.then(|| layout.share()),
            fs_tag: SHARE_TAG.to_string(),
            snapshot_to: spec.snapshot_to.clone(),
            restore_from: spec.restore_from.clone(),
            ..VmConfig::default()
        }
    }

    /// The VM of `layout` started by another process (a `husk run -d`, a
    /// shim that died), if its pid file names a husk-vmm that still runs.
    pub fn open(layout: &SandboxLayout) -> Option<ExternalVm> {
        let pids = PidFile::read(&layout.pid_file())?;
        let pidfd = PidFd::open_verified(pids.vmm)?;
        Some(ExternalVm {
            pid: pids.vmm.pid as u32,
            pidfd,
            api_socket: layout.api_socket(),
        })
    }
}

/// One bind, checked and turned into C strings before the fork.
struct PreparedBind {
    source: CString,
    target: CString,
    readonly: bool,
}

/// One overlay mount: its target and option string, made before the fork.
struct PreparedOverlay {
    target: CString,
    data: CString,
    readonly: bool,
}

/// The longest option string mount(2) takes (one page).
const MOUNT_DATA_MAX: usize = 4095;

/// A share target: relative, no `..`.
fn check_target(target: &Path) -> Result<()> {
    if target.is_absolute()
        || target
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(Error::InvalidArgument(format!(
            "share target {} must be relative, without '..'",
            target.display()
        )));
    }
    Ok(())
}

/// Makes each overlay's mount point in the host-only tree and its option
/// string. Paths with overlayfs's separators (`:` `,` `\\`) are refused
/// rather than escaped: the store's own paths never have them.
fn prepare_overlays(spec: &VmSpec, layout: &SandboxLayout) -> Result<Vec<PreparedOverlay>> {
    let mut out = Vec::new();
    for o in &spec.overlays {
        check_target(&o.target)?;
        if o.lower.is_empty() {
            return Err(Error::InvalidArgument("an overlay without layers".into()));
        }
        let mut paths = Vec::new();
        for p in o.lower.iter().chain([&o.upper, &o.work]) {
            let s = p
                .to_str()
                .filter(|s| p.is_absolute() && !s.contains([':', ',', '\\', '\0']));
            paths.push(s.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "overlay path {} is not usable in mount options",
                    p.display()
                ))
            })?);
        }
        let (lower, rest) = paths.split_at(o.lower.len());
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            rest[0],
            rest[1]
        );
        if data.len() > MOUNT_DATA_MAX {
            return Err(Error::InvalidArgument(format!(
                "an image of {} layers is more than one overlay mount can stack here",
                o.lower.len()
            )));
        }
        fdmount::ensure_beneath(&layout.mounts(), &o.target, Kind::Dir)
            .map_err(Error::io("creating", layout.mounts().join(&o.target)))?;
        out.push(PreparedOverlay {
            target: cstring(&layout.share().join(&o.target))?,
            data: CString::new(data)
                .map_err(|_| Error::InvalidArgument("NUL in an overlay path".into()))?,
            readonly: o.readonly,
        });
    }
    Ok(out)
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::InvalidArgument(format!("{} holds a NUL byte", p.display())))
}

/// Makes each bind's mount point in the host-only tree (the share is a
/// read-only bind of it), beneath it without following symlinks, and
/// prepares the mount calls onto the share's path of it.
fn prepare_binds(spec: &VmSpec, layout: &SandboxLayout) -> Result<Vec<PreparedBind>> {
    let (share, mounts) = (layout.share(), layout.mounts());
    let mut out = Vec::new();
    for b in &spec.binds {
        check_target(&b.target)?;
        let meta = std::fs::metadata(&b.source).map_err(Error::io("sharing", &b.source))?;
        // Bound over in husk-vmm's own namespace at boot.
        let kind = if meta.is_dir() { Kind::Dir } else { Kind::File };
        fdmount::ensure_beneath(&mounts, &b.target, kind)
            .map_err(Error::io("creating", mounts.join(&b.target)))?;
        let target = share.join(&b.target);
        out.push(PreparedBind {
            source: cstring(&b.source)?,
            target: cstring(&target)?,
            readonly: b.readonly,
        });
    }
    Ok(out)
}

#[async_trait]
impl Hypervisor for HuskVmm {
    async fn launch(&self, spec: &VmSpec, layout: &SandboxLayout) -> Result<Box<dyn VmProcess>> {
        for f in [&spec.kernel, &spec.initramfs] {
            if !f.exists() {
                return Err(Error::InvalidArgument(format!(
                    "{} does not exist: run tools/setup (or make build)",
                    f.display()
                )));
            }
        }
        let t0 = std::time::Instant::now();
        let phase =
            |what: &str| tracing::debug!(ms = t0.elapsed().as_millis() as u64, "launch: {what}");
        let mut config = Self::vm_config(spec, layout);
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            let user = vmm_user();
            grant(user, layout, spec)?;
            config.user = Some(user);
        }
        // The VMM checks it again; checking here gives the caller a clear
        // error before anything starts.
        config
            .validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if config.shared_dir.is_some() {
            container::mounts::setup_share(&layout.mounts(), &layout.share())
                .map_err(|e| Error::Hypervisor(format!("setting up the share: {e}")))?;
        }
        let overlays = prepare_overlays(spec, layout)?;
        let binds = prepare_binds(spec, layout)?;
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| Error::Hypervisor(format!("encoding its config: {e}")))?;
        std::fs::write(layout.vmm_config(), json)
            .map_err(Error::io("writing", layout.vmm_config()))?;
        let log = std::fs::File::create(layout.vmm_log())
            .map_err(Error::io("creating", layout.vmm_log()))?;

        let (ready_r, ready_w): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| Error::Hypervisor(format!("ready pipe: {e}")))?;
        let vmm = spec.vmm.clone().unwrap_or_else(vmm_binary);
        let mut cmd = tokio::process::Command::new(&vmm);
        // A clean environment: nothing of the caller's (containerd's, a
        // user's shell) reaches the VMM but what tunes its own log.
        cmd.env_clear();
        for keep in VMM_ENV {
            if let Some(v) = std::env::var_os(keep) {
                cmd.env(keep, v);
            }
        }
        cmd.arg("--config")
            .arg(layout.vmm_config())
            .args(["--ready-fd", &READY_FD.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // Each tap is inherited under the number its --net flag names:
        // a duplicate numbered 10 or more (never the ready fd's 3), whose
        // close-on-exec is cleared in the child only; ours close after spawn.
        let mut tap_dups: Vec<OwnedFd> = Vec::new();
        for n in &spec.nics {
            let dup =
                nix::fcntl::fcntl(n.tap.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
                    .map_err(|e| Error::Hypervisor(format!("duplicating a tap fd: {e}")))?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
            let dup = unsafe { OwnedFd::from_raw_fd(dup) };
            let mut flag = format!("fd={},mac={},mtu={}", dup.as_raw_fd(), n.mac, n.mtu);
            if let Some(b) = spec.net_rate.0 {
                flag.push_str(&format!(",rx-bps={b}"));
            }
            if let Some(b) = spec.net_rate.1 {
                flag.push_str(&format!(",tx-bps={b}"));
            }
            cmd.arg("--net").arg(flag);
            tap_dups.push(dup);
        }
        let taps: Vec<i32> = tap_dups.iter().map(|d| d.as_raw_fd()).collect();
        let detach = spec.detach;
        let ready_w_raw = ready_w.as_raw_fd();
        let last_cap = last_capability();
        // Dropping capabilities needs CAP_SETPCAP; a caller that is not root
        // has none to hand on anyway.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let drop_caps = unsafe { libc::geteuid() } == 0;
        // SAFETY: pre_exec runs in the child between fork and exec and only
        // makes raw syscalls (dup2, close_range, fcntl, setsid, prctl, unshare, mount,
        // setrlimit, and mount_setattr through fdmount::set_attrs_raw, which
        // allocates nothing) on values and C strings prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if ready_w_raw == READY_FD {
                    // dup2 onto itself keeps close-on-exec: clear it.
                    if libc::fcntl(READY_FD, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(ready_w_raw, READY_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Nothing inherited by accident: every descriptor above the
                // ready fd is marked close-on-exec (the caller's, containerd's,
                // a library's that forgot O_CLOEXEC); the taps are then let
                // through by name.
                if libc::syscall(
                    libc::SYS_close_range,
                    READY_FD as libc::c_uint + 1,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                for &t in &taps {
                    if libc::fcntl(t, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if detach {
                    // Its own session: it outlives us and our terminal.
                    libc::setsid();
                } else if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // No network, SysV IPC or host name of the host's: husk-vmm
                // speaks only over Unix sockets named by path (which cross
                // network namespaces), inherited taps and KVM, so a
                // compromised VMM reaches no host address, not even
                // loopback.
                if drop_caps
                    && libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)
                        != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                let null = std::ptr::null::<libc::c_char>();
                if !(binds.is_empty() && overlays.is_empty())
                    && (libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(
                            null,
                            c"/".as_ptr(),
                            null,
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                for o in &overlays {
                    let ro = if o.readonly { libc::MS_RDONLY } else { 0 };
                    if libc::mount(
                        c"overlay".as_ptr(),
                        o.target.as_ptr(),
                        c"overlay".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | ro,
                        o.data.as_ptr().cast(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for b in &binds {
                    // nosuid and nodev always, read-only when asked, on
                    // every mount of the bound tree (a plain read-only
                    // remount would leave its submounts writable).
                    if libc::mount(
                        b.source.as_ptr(),
                        b.target.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    fdmount::set_attrs_raw(
                        libc::AT_FDCWD,
                        &b.target,
                        libc::AT_RECURSIVE,
                        Attrs {
                            readonly: b.readonly,
                        },
                    )?;
                }
                // No core dumps: they would hold guest memory.
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // After exec, root's capabilities are its bounding set: only
                // what the VMM needs stays (VMM_CAPABILITIES).
                if drop_caps {
                    for cap in 0..=last_cap {
                        if !VMM_CAPABILITIES.contains(&cap)
                            && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                // Nothing it could exec gains privileges.
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        phase("prepared");
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Hypervisor(format!("starting {}: {e}", vmm.display())))?;
        phase("spawned");
        drop(ready_w);
        drop(tap_dups);
        let pid = child
            .id()
            .ok_or_else(|| Error::Hypervisor("exited at once".into()))?;
        // A pidfd before anything else can reap it: the pid is ours now.
        let pidfd = PidFd::open(pid as i32)
            .map_err(|e| Error::Hypervisor(format!("pidfd_open({pid}): {e}")))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let vm = ChildVm {
            pid,
            pidfd,
            api_socket: layout.api_socket(),
            exit: exit_rx,
            released: AtomicBool::new(false),
        };
        // The pid file at once: whoever cleans up after us (a later `husk`,
        // the shim's delete) finds this VMM even if we die while it boots.
        let pids = PidFile {
            vmm: ProcessId::of(pid as i32)
                .ok_or_else(|| Error::Hypervisor("exited as it started".into()))?,
            owner: ProcessId::current()
                .ok_or_else(|| Error::Hypervisor("no /proc/self/stat".into()))?,
        };
        pids.write(&layout.pid_file())
            .map_err(Error::io("writing", layout.pid_file()))?;
        let ready = tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 1];
            nix::unistd::read(ready_r.as_raw_fd(), &mut b).map(|n| n == 1)
        });
        let ready = tokio::select! {
            r = tokio::time::timeout(spec.boot_timeout, ready) => r,
            s = child.wait() => {
                let status = s.map_or_else(|e| e.to_string(), |s| s.to_string());
                return Err(Error::Hypervisor(format!(
                    "exited ({status}) before the guest ran:\n{}",
                    husk_agent_client::client::file_tail(&layout.vmm_log(), 20)
                )));
            }
        };
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            exit_tx.send_replace(status.or_else(failed_status));
        });
        phase("ready signal");
        match ready {
            Ok(Ok(Ok(true))) => {}
            Ok(Ok(Ok(false))) | Ok(Ok(Err(_))) | Ok(Err(_)) => {
                // Dropping `vm` kills it; the log says why it stopped.
                let exit = vm.stop(Duration::from_secs(1)).await;
                return Err(Error::Hypervisor(format!(
                    "ended ({exit}) before the guest ran:\n{}",
                    husk_agent_client::client::file_tail(&layout.vmm_log(), 20)
                )));
            }
            Err(_) => {
                vm.stop(Duration::ZERO).await;
                return Err(Error::Hypervisor(format!(
                    "its vCPUs did not start within {:?}",
                    spec.boot_timeout
                )));
            }
        }
        if detach {
            std::fs::write(layout.detached_marker(), "")
                .map_err(Error::io("writing", layout.detached_marker()))?;
        }
        Ok(Box::new(vm))
    }
}

/// An ExitStatus for a wait that failed (the child is gone either way).
fn failed_status() -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    Some(ExitStatus::from_raw(libc::SIGKILL))
}

/// Asks husk-vmm (started with a `snapshot_to`) for its snapshot over its
/// control socket; `Ok` once written (the VM then ends by itself).
pub async fn control_snapshot(api_socket: &Path, timeout: Duration) -> std::io::Result<()> {
    let mut s = tokio::net::UnixStream::connect(api_socket).await?;
    s.write_all(b"{\"op\":\"snapshot\"}\n").await?;
    let mut line = String::new();
    let mut r = tokio::io::BufReader::new(s).take(husk_vmm::api::request::MAX_LINE as u64);
    tokio::time::timeout(timeout, r.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::other(format!("no answer within {timeout:?}")))??;
    match serde_json::from_str::<husk_vmm::api::Response>(&line) {
        Ok(resp) if resp.ok => Ok(()),
        Ok(resp) => Err(std::io::Error::other(
            resp.error.unwrap_or_else(|| "refused".into()),
        )),
        Err(e) => Err(std::io::Error::other(format!("answer {line:?}: {e}"))),
    }
}

/// Asks husk-vmm to stop over its control socket; `Ok` once it accepted.
async fn control_shutdown(api_socket: &Path) -> std::io::Result<()> {
    let mut s = tokio::net::UnixStream::connect(api_socket).await?;
    s.write_all(b"{\"op\":\"shutdown\"}\n").await?;
    let mut line = String::new();
    // The answer is one short line; the VMM may exit before it arrives.
    let mut r = tokio::io::BufReader::new(s).take(husk_vmm::api::request::MAX_LINE as u64);
    let _ = tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line)).await;
    match serde_json::from_str::<husk_vmm::api::Response>(&line) {
        Ok(resp) if !resp.ok => Err(std::io::Error::other(
            resp.error.unwrap_or_else(|| "refused".into()),
        )),
        _ => Ok(()),
    }
}

/// husk-vmm as our child.
struct ChildVm {
    pid: u32,
    pidfd: PidFd,
    api_socket: PathBuf,
    exit: watch::Receiver<Option<ExitStatus>>,
    released: AtomicBool,
}

/// Makes the mount at `target` in husk-vmm `pid`'s mount namespace (where
/// its launch mounted the images' overlays) read-only, recursively. The
/// runtime is multi-threaded and setns(CLONE_NEWNS) wants a process that
/// shares no file system state, so a forked child enters the namespace and
/// makes the one call; it makes only raw syscalls, as a pre_exec hook does.
/// The path is resolved from husk-vmm's own root (`/proc/PID/root`, opened
/// before the fork), not the namespace's: the two differ where the host
/// runs chrooted (the nested test host does). Its last component is not
/// followed (it is the mount point, made by the launch in the host-only
/// tree the guest sees read-only).
/// husk-vmm's file-system process (`husk-vmm-fs`, its child), or husk-vmm
/// itself when it has none.
fn share_process(vmm: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{vmm}/task/{vmm}/children"))
        .ok()
        .and_then(|children| {
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .find(|c| {
                    std::fs::read_to_string(format!("/proc/{c}/comm"))
                        .is_ok_and(|comm| comm.trim_end() == husk_vmm::fs_process::PROCESS_NAME)
                })
        })
        .unwrap_or(vmm)
}

fn readonly_in_vmm_namespace(pid: u32, target: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // The share's mounts live where husk-vmm was started; husk-vmm itself
    // moves to a root of its own once set up, while its file-system
    // process, which serves the share, stays there.
    let pid = share_process(pid);
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(format!("/proc/{pid}/root"))?;
    let relative = target
        .strip_prefix("/")
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let target = CString::new(relative.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fork in a threaded process: the child makes only raw syscalls
    // (setns, mount_setattr) on data prepared before the fork, then _exit.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: raw syscalls on fds and a C string the parent made.
        let code = unsafe {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            } else {
                match fdmount::set_attrs_raw(
                    root.as_raw_fd(),
                    &target,
                    libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW,
                    Attrs { readonly: true },
                ) {
                    Ok(()) => 0,
                    Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
                }
            }
        };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for the child forked above, with a live out-pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(()),
        (true, errno) => Err(std::io::Error::from_raw_os_error(errno)),
        _ => Err(std::io::Error::other(format!(
            "the helper entering husk-vmm's mount namespace ended with status {status:#x}"
        ))),
    }
}

#[async_trait]
impl VmProcess for ChildVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn make_readonly(&self, target: &Path) -> std::io::Result<()> {
        readonly_in_vmm_namespace(self.pid, target)
    }

    fn exited(&self) -> Option<VmExit> {
        (*self.exit.borrow()).map(VmExit::Status)
    }

    async fn wait(&self) -> VmExit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return VmExit::Status(s);
            }
            if rx.changed().await.is_err() {
                // The waiter went without a status: the child is gone.
                return failed_status().map_or(VmExit::Gone, VmExit::Status);
            }
        }
    }

    async fn stop(&self, grace: Duration) -> VmExit {
        if self.exited().is_none() {
            // A zero grace is a kill: no time for the control socket.
            if !grace.is_zero() {
                if let Err(e) = control_shutdown(&self.api_socket).await {
                    tracing::debug!(error = %e, "control socket shutdown");
                }
                if let Ok(exit) = tokio::time::timeout(grace, self.wait()).await {
                    return exit;
                }
                tracing::warn!(pid = self.pid, ?grace, "husk-vmm did not stop; killing it");
            }
            let _ = self.pidfd.signal(libc::SIGKILL);
        }
        self.wait().await
    }

    fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }
}

impl Drop for ChildVm {
    fn drop(&mut self) {
        if !self.released.load(Ordering::SeqCst) && self.exited().is_none() {
            let _ = self.pidfd.signal(libc::SIGKILL);
        }
    }
}

/// husk-vmm started by another process, found through its pid file and
/// held by a verified pidfd.
pub struct ExternalVm {
    pid: u32,
    pidfd: PidFd,
    api_socket: PathBuf,
}

impl ExternalVm {
    /// SIGKILL, through the pidfd (never to a bare pid from a file).
    pub fn kill(&self) {
        let _ = self.pidfd.signal(libc::SIGKILL);
    }
}

#[async_trait]
impl VmProcess for ExternalVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn make_readonly(&self, target: &Path) -> std::io::Result<()> {
        readonly_in_vmm_namespace(self.pid, target)
    }

    fn exited(&self) -> Option<VmExit> {
        self.pidfd.has_exited().then_some(VmExit::Gone)
    }

    async fn wait(&self) -> VmExit {
        self.pidfd.exited().await;
        VmExit::Gone
    }

    async fn stop(&self, grace: Duration) -> VmExit {
        if self.exited().is_none() {
            if !grace.is_zero() {
                if let Err(e) = control_shutdown(&self.api_socket).await {
                    tracing::debug!(error = %e, "control socket shutdown");
                }
            }
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                self.kill();
            }
        }
        self.wait().await
    }

    fn release(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Bind;

    /// The options of the mount at `dir` as process `pid` sees it.
    fn mount_options(pid: u32, dir: &Path) -> Option<String> {
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
        info.lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.get(4) == Some(&dir.to_str().unwrap_or_default()))
            .and_then(|f| f.get(5).map(|o| o.to_string()))
    }

    /// A process in a mount namespace of its own, as husk-vmm is, with a
    /// tmpfs and a submount in it that only it sees: both become read-only
    /// there, and nothing changes in ours. (Needs root, as the VM tests do.)
    #[test]
    fn a_mount_in_another_namespace_becomes_read_only_all_the_way_down() {
        let dir = tempfile::tempdir().unwrap();
        let (d, sub) = (dir.path().to_path_buf(), dir.path().join("sub"));
        let script = format!(
            "mount -t tmpfs t {d} && mkdir {sub} && mount -t tmpfs s {sub} && echo ready && exec sleep 60",
            d = d.display(),
            sub = sub.display()
        );
        let mut child = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare(1)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready", "needs root to make mounts");
        let pid = child.id();
        assert!(mount_options(pid, &sub).unwrap().starts_with("rw"));
        readonly_in_vmm_namespace(pid, &d).unwrap();
        let (top, below) = (mount_options(pid, &d), mount_options(pid, &sub));
        let _ = child.kill();
        let _ = child.wait();
        assert!(top.unwrap().starts_with("ro,"), "the mount itself");
        assert!(below.unwrap().starts_with("ro,"), "its submount");
        assert_eq!(
            mount_options(std::process::id(), &d),
            None,
            "ours untouched"
        );
        // A path that is not there is an error, not a silent success.
        let e = readonly_in_vmm_namespace(std::process::id(), &d.join("missing")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }

    #[test]
    fn the_vmm_config_names_the_layout() {
        let l = SandboxLayout::under(Path::new("/run/husk"), "s1").unwrap();
        let spec = VmSpec {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            vcpus: 2,
            memory_mib: 512,
            ..VmSpec::default()
        };
        let c = HuskVmm::vm_config(&spec, &l);
        assert_eq!(c.kernel, Some("/k".into()));
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.vsock_socket, Some(l.vsock_socket()));
        assert_eq!(c.api_socket, Some(l.api_socket()));
        assert_eq!(c.serial_out, Some(l.console_log()));
        assert_eq!(c.shared_dir, None, "no share asked for");
        assert!(c.seccomp);
        let shared = HuskVmm::vm_config(
            &VmSpec {
                share: true,
                ..spec
            },
            &l,
        );
        assert_eq!(shared.shared_dir, Some(l.share()));
        assert_eq!(shared.fs_tag, SHARE_TAG);
        // What husk-vmm reads back is what was meant.
        let json = serde_json::to_string(&shared).unwrap();
        assert_eq!(VmConfig::from_json_str(&json, "t").unwrap(), shared);
    }

    #[test]
    fn bind_targets_stay_in_the_share() {
        let root = tempfile::tempdir().unwrap();
        let l = SandboxLayout::under(root.path(), "s").unwrap();
        for target in ["/etc", "../x", "a/../../b"] {
            let spec = VmSpec {
                binds: vec![Bind {
                    source: "/".into(),
                    target: target.into(),
                    readonly: true,
                }],
                ..VmSpec::default()
            };
            assert!(
                matches!(prepare_binds(&spec, &l), Err(Error::InvalidArgument(_))),
                "{target}"
            );
        }
    }

    #[tokio::test]
    async fn a_vmm_that_dies_before_the_guest_runs_is_reported_and_gone() {
        let root = tempfile::tempdir().unwrap();
        let l = SandboxLayout::under(root.path(), "s").unwrap();
        std::fs::create_dir_all(l.dir()).unwrap();
        let fake = root.path().join("fake-vmm");
        std::fs::write(&fake, "#!/bin/sh\necho 'no KVM here' >&2\nexit 1\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let spec = VmSpec {
            kernel: fake.clone(),
            initramfs: fake.clone(),
            vmm: Some(fake),
            boot_timeout: Duration::from_secs(10),
            ..VmSpec::default()
        };
        let err = match HuskVmm.launch(&spec, &l).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a VMM that exits cannot be running"),
        };
        assert!(err.contains("no KVM here"), "{err}");
        // It was recorded as it started, and it is gone.
        let pids = PidFile::read(&l.pid_file()).unwrap();
        assert!(!pids.vmm.is_alive());
    }
}
