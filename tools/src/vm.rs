//! One micro-VM on this host, as the `husk` CLI runs it: a runtime directory
//! `/run/husk/<id>/` (vsock socket, console log, pid), a `husk-vmm` process,
//! the guest log forwarded into ours, and the agent client.
//!
//! Cleanup is the point of this module: a VM that fails to come up is killed
//! and its directory removed; a directory left by a `husk` that was SIGKILLed
//! is found (its VMM is gone or its owner is) and removed by the next call.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use husk_agent_client::{logs::LogForwarder, Client, ConnectOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where VM runtime state lives (architecture convention).
pub fn runtime_root() -> PathBuf {
    std::env::var_os("HUSK_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/husk"))
}

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

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub boot_timeout: Duration,
    /// Extra kernel command line parameters (after husk-vmm's defaults).
    pub extra_cmdline: Option<String>,
    /// Leave the VM running when this process ends.
    pub detach: bool,
    /// The VM's id (its runtime directory's name); random when `None`.
    pub id: Option<String>,
    /// A host directory to show the guest, read-only, as `rootfs` in the
    /// sandbox share (virtio-fs, tag `husk-share`). The bind mount that puts it there is
    /// made in husk-vmm's own mount namespace, so it can never outlive the
    /// VM or be seen (or deleted through) from the host's namespace.
    pub rootfs: Option<PathBuf>,
    /// More host paths to show in the share (volumes), bound the same way.
    pub binds: Vec<Bind>,
    /// Share `shared/` with the guest even without a rootfs or binds: the
    /// caller (the shim) mounts into it from the host's namespace later.
    pub share: bool,
    /// The husk-vmm binary; `None`: [`vmm_binary`].
    pub vmm: Option<PathBuf>,
}

/// A host path bound into the sandbox share.
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    /// Where in the share: one relative component, e.g. `volumes/0`.
    pub target: PathBuf,
    pub readonly: bool,
}

impl Default for VmSpec {
    fn default() -> Self {
        let guest = husk_guest_image::install_dir();
        Self {
            kernel: guest.join("vmlinux"),
            initramfs: guest.join("initramfs.cpio"),
            vcpus: 1,
            memory_mib: 256,
            boot_timeout: Duration::from_secs(60),
            extra_cmdline: None,
            detach: false,
            id: None,
            rootfs: None,
            binds: Vec::new(),
            share: false,
            vmm: None,
        }
    }
}

/// A running VM. Dropping it kills the VMM (unless detached) and removes
/// the runtime directory.
pub struct Vm {
    pub id: String,
    pub dir: PathBuf,
    pub vmm_pid: Pid,
    pub client: Client,
    child: Option<tokio::process::Child>,
    _logs: Option<LogForwarder>,
    detached: bool,
}

fn random_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 8];
    // Unique enough for a directory name; falls back to pid and time.
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Vm {
    pub fn vsock_socket(dir: &Path) -> PathBuf {
        dir.join("vsock.sock")
    }
    pub fn console_log(dir: &Path) -> PathBuf {
        dir.join("console.log")
    }
    /// The sandbox share on the host (virtio-fs, tag `husk-share`).
    pub fn shared_dir(dir: &Path) -> PathBuf {
        dir.join("shared")
    }

    /// Boots `spec` and waits for the agent. On any failure the VM is gone
    /// and its directory removed before the error returns.
    pub async fn boot(spec: &VmSpec) -> Result<Vm> {
        reap_stale(&runtime_root());
        for f in [&spec.kernel, &spec.initramfs] {
            if !f.exists() {
                bail!(
                    "{} does not exist: run tools/setup (or make build)",
                    f.display()
                );
            }
        }
        let id = spec.id.clone().unwrap_or_else(random_id);
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            bail!("invalid VM id {id:?}");
        }
        let dir = runtime_root().join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let guard = DirGuard(Some(dir.clone()));
        let vsock = Self::vsock_socket(&dir);
        let console = Self::console_log(&dir);
        // Listen for the guest's log before it boots, so no line is lost.
        let logs = LogForwarder::start(&vsock, &id).context("listening for the guest log")?;

        let vmm = spec.vmm.clone().unwrap_or_else(vmm_binary);
        let mut cmd = tokio::process::Command::new(&vmm);
        cmd.arg("--kernel")
            .arg(&spec.kernel)
            .arg("--initramfs")
            .arg(&spec.initramfs)
            .args([
                "--vcpus",
                &spec.vcpus.to_string(),
                "--memory-mib",
                &spec.memory_mib.to_string(),
            ])
            .arg("--serial-out")
            .arg(&console)
            .arg("--vsock-socket")
            .arg(&vsock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("vmm.log")).context("creating vmm.log")?,
            ));
        if let Some(extra) = &spec.extra_cmdline {
            let cmdline = format!("{} {extra}", husk_guest_image::cmdline::default_cmdline());
            cmd.args(["--cmdline", &cmdline]);
        }
        let detach = spec.detach;
        // Binds into the share, made in husk-vmm's own mount namespace.
        let shared = Self::shared_dir(&dir);
        let mut binds: Vec<(std::ffi::CString, std::ffi::CString, bool)> = Vec::new();
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).context("a path holds NUL")
        };
        // Read-only: the guest writes to a layer of its own (the agent's
        // rootfs overlay), never to the host's directory.
        let rootfs_bind = spec.rootfs.as_ref().map(|r| Bind {
            source: r.clone(),
            target: PathBuf::from("rootfs"),
            readonly: true,
        });
        for b in rootfs_bind.iter().chain(&spec.binds) {
            if b.target.is_absolute()
                || b.target
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                bail!(
                    "bind target {} must be relative, without '..'",
                    b.target.display()
                );
            }
            let meta = std::fs::metadata(&b.source)
                .with_context(|| format!("{} (to share with the guest)", b.source.display()))?;
            let target = shared.join(&b.target);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            if meta.is_dir() {
                std::fs::create_dir_all(&target)
            } else {
                std::fs::File::create(&target).map(drop)
            }
            .with_context(|| format!("creating {}", target.display()))?;
            binds.push((c(&b.source)?, c(&target)?, b.readonly));
        }
        if spec.share || !binds.is_empty() {
            std::fs::create_dir_all(&shared)
                .with_context(|| format!("creating {}", shared.display()))?;
            cmd.arg("--shared-dir").arg(&shared);
        }
        // SAFETY: pre_exec runs in the child between fork and exec and only
        // makes raw syscalls (setsid, prctl, unshare, mount) on C strings
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if detach {
                    // Its own session: it outlives us and our terminal.
                    libc::setsid();
                } else if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let null = std::ptr::null::<libc::c_char>();
                if !binds.is_empty()
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
                for (src, dst, readonly) in &binds {
                    if libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ) != 0
                        || (*readonly
                            && libc::mount(
                                null,
                                dst.as_ptr(),
                                null,
                                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                                std::ptr::null(),
                            ) != 0)
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", vmm.display()))?;
        let vmm_pid = Pid::from_raw(child.id().context("husk-vmm exited at once")? as i32);
        std::fs::write(
            dir.join("pid"),
            format!("{vmm_pid}\n{}\n", std::process::id()),
        )?;

        let mut opts = ConnectOptions::new(&vsock);
        opts.boot_timeout = spec.boot_timeout;
        opts.console_log = Some(console);
        let (client, child) = connect_or_exit(opts, child).await?;
        if detach {
            std::fs::write(dir.join("detached"), "")?;
        }
        guard.disarm();
        Ok(Vm {
            id,
            dir,
            vmm_pid,
            client,
            child: Some(child),
            _logs: Some(logs),
            detached: detach,
        })
    }

    /// Asks the guest to shut down and waits for husk-vmm to exit; kills it
    /// if it does not within `timeout`. Returns husk-vmm's exit status.
    pub async fn shutdown(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let asked = self.client.shutdown(Duration::from_secs(2)).await;
        let mut child = self
            .child
            .take()
            .context("the VM is not ours to wait for")?;
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(s) => s?,
            Err(_) => {
                let _ = child.kill().await;
                bail!(
                    "husk-vmm did not exit within {timeout:?} of Shutdown ({}); killed it",
                    asked.map_or_else(|e| e.to_string(), |_| "the agent accepted".into())
                );
            }
        };
        // The agent may power off before its answer leaves (the answer and the
        // end of the guest race): a lost connection is fine once husk-vmm has
        // exited cleanly. A refusal is not.
        match asked {
            Ok(()) | Err(husk_agent_client::ClientError::Transport { .. }) if status.success() => {}
            Err(e) => return Err(anyhow::Error::from(e).context("Shutdown")),
            Ok(()) => {}
        }
        Ok(status)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes the directory unless disarmed.
struct DirGuard(Option<PathBuf>);

impl DirGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Waits for the agent; if the VMM dies first, says so with its log.
async fn connect_or_exit(
    opts: ConnectOptions,
    mut child: tokio::process::Child,
) -> Result<(Client, tokio::process::Child)> {
    let vmm_log = opts.vsock_socket.with_file_name("vmm.log");
    tokio::select! {
        r = Client::connect(opts) => match r {
            Ok(c) => Ok((c, child)),
            Err(e) => {
                let _ = child.kill().await;
                Err(e.into())
            }
        },
        s = child.wait() => {
            let log = husk_agent_client::client::file_tail(&vmm_log, 20);
            bail!("husk-vmm exited ({}) before the agent answered:\n{log}", s.map_or_else(|e| e.to_string(), |s| s.to_string()))
        }
    }
}

/// Whether a process exists (signal 0 reaches it).
fn alive(pid: i32) -> bool {
    pid > 0 && kill(Pid::from_raw(pid), None).is_ok()
}

/// Removes runtime directories whose VMM is gone, and kills VMMs whose
/// owning `husk` died without detaching them (it was SIGKILLed).
pub fn reap_stale(root: &Path) -> usize {
    let Ok(dir) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut n = 0;
    for e in dir.filter_map(|e| e.ok()) {
        let p = e.path();
        let Ok(pids) = std::fs::read_to_string(p.join("pid")) else {
            continue;
        };
        let mut it = pids.lines().map(|l| l.trim().parse::<i32>().unwrap_or(0));
        let (vmm, owner) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        let detached = p.join("detached").exists();
        if alive(vmm) && (detached || alive(owner)) {
            continue;
        }
        if alive(vmm) {
            let _ = kill(Pid::from_raw(vmm), Signal::SIGKILL);
        }
        tracing::info!(dir = %p.display(), "removing a VM left behind");
        // A shim's VM has rootfs and volume mounts below its directory:
        // deleting through them would delete the container's files.
        if !unmount_below(&p) {
            tracing::warn!(dir = %p.display(), "mounts below it remain; left in place");
            continue;
        }
        if std::fs::remove_dir_all(&p).is_ok() {
            n += 1;
        }
    }
    n
}

/// Mount points at or below `dir`, deepest first, from /proc/self/mountinfo
/// (field 5 is the mount point, with spaces and the like octal-escaped).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let oct = |c: u8| u32::from(c - b'0');
            // Octal escapes are at most \\377; anything above is cut to a byte.
            out.push((oct(b[i + 1]) * 64 + oct(b[i + 2]) * 8 + oct(b[i + 3])) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything at or below `dir`; true when nothing is left.
pub fn unmount_below(dir: &Path) -> bool {
    for m in mounts_below(dir) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", m.display());
        }
    }
    mounts_below(dir).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/run/a\\040b"), "/run/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }

    #[test]
    fn stale_directories_are_removed_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let mk = |name: &str, pids: &str| {
            let d = root.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("pid"), pids).unwrap();
            d
        };
        let live = mk("live", &format!("{me}\n{me}\n"));
        let dead_vmm = mk("dead", "2147483646\n1\n");
        let mut orphan = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let orphaned = mk("orphaned", &format!("{}\n2147483646\n", orphan.id()));
        assert_eq!(reap_stale(root.path()), 2);
        assert!(live.exists());
        assert!(!dead_vmm.exists());
        assert!(!orphaned.exists());
        // The VMM whose owner died was killed.
        assert!(orphan.wait().unwrap().code().is_none());
    }
}
