//! husk-vmm's file-system process: the virtio-fs share served outside the
//! VMM, so that the process holding guest memory and KVM can give up every
//! privilege ([`crate::devices::virtio::fs::remote`] says why and how).
//!
//! The VMM starts it ([`spawn`]) as its own binary with `--serve-fs`, the
//! share's directory and tag, before it drops its user; the child keeps the
//! caller's uid (root under the runtime) and the capabilities virtio-fs
//! needs, which the runtime's bounding set already cut to those, and:
//! - is named `husk-vmm-fs`, dies with the VMM (`PR_SET_PDEATHSIG`, and the
//!   socket's end of file), inherits no descriptor but its socket (stdin)
//!   and the log (stderr);
//! - opens the share, then enters a Landlock jail of the share alone (no
//!   socket, no snapshot directory) and a seccomp filter of the file-system
//!   calls the passthrough makes: no socket, connect, ioctl or KVM;
//! - serves one request at a time on one thread (the umask it sets around
//!   creation is process-wide, see [`crate::devices::virtio::fs`]).

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::VmConfig;
use crate::devices::virtio::fs::remote::{self, Client, ServeError};
use crate::devices::virtio::fs::{FsConfig, FsError, Local};

/// The file-system process's name (its `comm`), what `ps` and `pgrep` show.
pub const PROCESS_NAME: &str = "husk-vmm-fs";

#[derive(Debug, thiserror::Error)]
pub enum FsProcessError {
    #[error("starting the file-system process: {0}")]
    Spawn(#[source] io::Error),
    #[error("shared directory {}: {source}", path.display())]
    SharedDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no shared directory to serve (--shared-dir)")]
    NoShare,
    #[error(transparent)]
    Share(#[from] FsError),
    #[error("the Landlock jail: {0}")]
    Jail(#[from] crate::confine::ConfineError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("serving the share: {0}")]
    Serve(#[from] ServeError),
}

/// Starts the file-system process for `cfg`'s share and returns the VMM's
/// end of its socket. The directory is checked here so that a missing one
/// is refused at start, not at the guest's first request.
pub fn spawn(cfg: &VmConfig, dir: &Path) -> Result<Client, FsProcessError> {
    let meta = std::fs::metadata(dir).map_err(|source| FsProcessError::SharedDir {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(FsProcessError::SharedDir {
            path: dir.to_owned(),
            source: io::Error::other("not a directory"),
        });
    }
    let (ours, theirs) = UnixStream::pair().map_err(FsProcessError::Spawn)?;
    let exe = std::env::current_exe().map_err(FsProcessError::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.arg("--serve-fs")
        .arg("--shared-dir")
        .arg(dir)
        .arg("--fs-tag")
        .arg(&cfg.fs_tag)
        .arg("--log-limit-bytes")
        .arg(cfg.log_limit_bytes.to_string());
    if !cfg.seccomp {
        cmd.arg("--no-seccomp");
    }
    if !cfg.landlock {
        cmd.arg("--no-landlock");
    }
    cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: runs between fork and exec and makes raw syscalls only.
    unsafe {
        cmd.pre_exec(|| {
            // Nothing of the VMM's reaches it: not its taps, KVM, guest
            // memory's fds or sockets (stdin, stdout, stderr stay).
            if libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Spawned from the VMM's main thread, which lives as long as the
            // VMM: the share goes when the VM does, however it ends.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(FsProcessError::Spawn)?;
    tracing::info!(pid = child.id(), dir = %dir.display(), "virtio-fs: file-system process started");
    // Never waited for: it ends with the VMM (a zombie until then if it
    // ends first, which the guest sees as a failing share).
    drop(child);
    Client::new(ours).map_err(FsProcessError::Spawn)
}

/// The file-system process's whole life (`husk-vmm --serve-fs`): set up,
/// jail, serve stdin until the VMM closes it.
pub fn serve(cfg: &VmConfig) -> Result<(), FsProcessError> {
    name_this_process();
    let dir = cfg.shared_dir.as_deref().ok_or(FsProcessError::NoShare)?;
    // The share's budget of descriptors is sized from the limit (FsLimits).
    crate::vmm::raise_nofile();
    let (local, canonical) = Local::new(dir, FsConfig::default())?;
    tracing::info!(tag = %cfg.fs_tag, dir = %canonical.display(), limits = ?local.limits(), "virtio-fs: serving the share");
    if cfg.landlock {
        let jail = crate::confine::Jail {
            shares: vec![canonical],
            removable_in: Vec::new(),
            snapshot_dir: None,
        };
        if jail.enter()? == crate::confine::Confined::Not {
            tracing::warn!("this kernel has no Landlock: no file-system jail");
        }
    }
    if cfg.seccomp {
        crate::seccomp::install_sigsys_handler()?;
        crate::seccomp::apply("file-system process", &crate::seccomp::fs_process()?)?;
    }
    // SAFETY: fd 0 is the socket the VMM handed us as stdin; nothing else
    // in this process owns it.
    let sock = File::from(unsafe { OwnedFd::from_raw_fd(0) });
    remote::serve(sock, &local)?;
    Ok(())
}

fn name_this_process() {
    let mut name = [0u8; 16];
    name[..PROCESS_NAME.len()].copy_from_slice(PROCESS_NAME.as_bytes());
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}
