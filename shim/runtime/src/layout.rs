//! Every path and name a sandbox has on the host and in the guest, in one
//! place: `/run/husk/<sandbox>/` and what is in it, the share's layout on
//! both sides, the virtio-fs tag, and the pid file.
//!
//! ```text
//! /run/husk/<sandbox>/          (HUSK_RUNTIME_DIR overrides /run/husk)
//!   pid                          husk-vmm and its owner, with start times (see PidFile)
//!   detached                     present: the VM outlives its owner (husk run -d)
//!   vmm.json                     the VmConfig husk-vmm was started with
//!   vmm.log                      husk-vmm's stderr
//!   console.log                  the guest's serial console
//!   guest.log                    the agent's log lines (bounded)
//!   vsock.sock, vsock.sock_1025  hybrid vsock: host side, guest log port
//!   api.sock                     husk-vmm's control socket
//!   command                      what `husk run` ran (for `husk ps`)
//!   mounts/                      host-only: every mount is made here, on fds
//!     <container>/rootfs         the container's root
//!     <container>/volumes/<n>    its volumes
//!   shared/                      the share (virtio-fs): a read-only, nosuid,
//!                                nodev slave bind of mounts/; GUEST-WRITABLE
//!                                inside the rw mounts that propagate into it
//! ```

use std::path::{Path, PathBuf};

use crate::error::Error;

/// The virtio-fs tag of the sandbox share (the VMM's default).
pub const SHARE_TAG: &str = husk_vmm::config::DEFAULT_FS_TAG;
/// Where the agent mounts the share in the guest.
pub const GUEST_SHARE: &str = "/run/husk/share";
/// Where runtime state lives unless `HUSK_RUNTIME_DIR` says otherwise.
pub const DEFAULT_RUNTIME_ROOT: &str = "/run/husk";

/// `/run/husk`, or `$HUSK_RUNTIME_DIR`.
pub fn runtime_root() -> PathBuf {
    std::env::var_os("HUSK_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_ROOT))
}

/// containerd's own limit for ids; /run/husk/<id>/vsock.sock_1025 still fits
/// a Unix socket's 108 bytes.
pub const MAX_ID_LEN: usize = 76;

/// Checks that `id` can name a directory of its own: one path component,
/// not hidden, printable, bounded (the vsock socket path must fit sun_path).
pub fn check_id(what: &str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} id {id:?}: 1-{MAX_ID_LEN} characters of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

/// A fresh id: 16 hex digits from the kernel's random pool (pid and time
/// when that cannot be read).
pub fn random_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One sandbox's directory and everything in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLayout {
    id: String,
    dir: PathBuf,
}

impl SandboxLayout {
    /// The layout of sandbox `id` under [`runtime_root`].
    pub fn new(id: &str) -> Result<Self, Error> {
        Self::under(&runtime_root(), id)
    }

    /// The layout of sandbox `id` under `root`.
    pub fn under(root: &Path, id: &str) -> Result<Self, Error> {
        check_id("sandbox", id)?;
        Ok(Self {
            id: id.to_string(),
            dir: root.join(id),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }
    pub fn detached_marker(&self) -> PathBuf {
        self.dir.join("detached")
    }
    pub fn vmm_config(&self) -> PathBuf {
        self.dir.join("vmm.json")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn guest_log(&self) -> PathBuf {
        self.dir.join("guest.log")
    }
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn command_file(&self) -> PathBuf {
        self.dir.join("command")
    }
    /// The share on the host, what virtio-fs serves. The guest writes
    /// here: never follow a path inside it that the guest could have
    /// changed. Its own directories are read-only (a bind of [`Self::mounts`]).
    pub fn share(&self) -> PathBuf {
        self.dir.join("shared")
    }
    /// The host-only tree the share is a slave of: mount points are made
    /// and mounted here, where the guest cannot plant anything.
    pub fn mounts(&self) -> PathBuf {
        self.dir.join("mounts")
    }
    /// A container's directory in the host-only tree.
    pub fn container_dir(&self, container_id: &str) -> PathBuf {
        self.mounts().join(container_id)
    }
}

/// A container's paths relative to the share: the same on the host (under
/// [`SandboxLayout::share`]) and in the guest (under [`GUEST_SHARE`]).
pub mod in_share {
    use std::path::{Path, PathBuf};

    pub fn rootfs(container_id: &str) -> PathBuf {
        Path::new(container_id).join("rootfs")
    }
    pub fn volume(container_id: &str, n: usize) -> PathBuf {
        Path::new(container_id).join("volumes").join(n.to_string())
    }
}

/// A process's identity that survives pid reuse: its pid and its start
/// time in clock ticks since boot (`/proc/<pid>/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcessId {
    /// The identity of the running process `pid`, if it exists.
    pub fn of(pid: i32) -> Option<Self> {
        Some(Self {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// This process.
    pub fn current() -> Option<Self> {
        Self::of(std::process::id() as i32)
    }

    /// Whether `pid` is still the process this identity was taken of.
    pub fn is_alive(&self) -> bool {
        self.pid > 0 && start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 of `/proc/<pid>/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last ')'.
fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `/run/husk/<id>/pid`: who runs the VM and who owns it.
///
/// ```text
/// <vmm pid> <vmm start time>
/// <owner pid> <owner start time>
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidFile {
    pub vmm: ProcessId,
    pub owner: ProcessId,
}

impl PidFile {
    pub fn to_text(&self) -> String {
        format!(
            "{} {}\n{} {}\n",
            self.vmm.pid, self.vmm.start_time, self.owner.pid, self.owner.start_time
        )
    }

    /// Parses the file's text; `None` for anything malformed (a file from
    /// an older Husk, or half-written).
    pub fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines().map(|l| {
            let mut it = l.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next(), it.next()) {
                (Some(Ok(pid)), Some(Ok(start_time)), None)
                    if pid > 0 && pid <= i32::MAX as u64 =>
                {
                    Some(ProcessId {
                        pid: pid as i32,
                        start_time,
                    })
                }
                _ => None,
            }
        });
        let vmm = lines.next()??;
        let owner = lines.next()??;
        lines.next().is_none().then_some(Self { vmm, owner })
    }

    pub fn read(path: &Path) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(path).ok()?)
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        // Written whole to a temporary name, then renamed: a reader never
        // sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.to_text())?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_a_sandbox() {
        let l = SandboxLayout::under(Path::new("/run/husk"), "pod1").unwrap();
        assert_eq!(l.vsock_socket(), PathBuf::from("/run/husk/pod1/vsock.sock"));
        assert_eq!(
            l.container_dir("c1"),
            PathBuf::from("/run/husk/pod1/mounts/c1")
        );
        assert_eq!(in_share::rootfs("c1"), PathBuf::from("c1/rootfs"));
        assert_eq!(in_share::volume("c1", 2), PathBuf::from("c1/volumes/2"));
        assert_eq!(SHARE_TAG, "husk-share");
    }

    #[test]
    fn ids_that_cannot_name_a_directory_are_refused() {
        for bad in ["", ".", "..", ".x", "a/b", "a b", "x\n", &"a".repeat(77)] {
            assert!(check_id("sandbox", bad).is_err(), "{bad:?}");
        }
        for good in ["a", "pod-1_x.y", &"a".repeat(76)] {
            assert!(check_id("sandbox", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn random_ids_are_valid_and_differ() {
        let (a, b) = (random_id(), random_id());
        assert_ne!(a, b);
        assert!(check_id("sandbox", &a).is_ok());
    }

    #[test]
    fn pid_file_round_trips_and_refuses_junk() {
        let p = PidFile {
            vmm: ProcessId {
                pid: 10,
                start_time: 99,
            },
            owner: ProcessId {
                pid: 11,
                start_time: 5,
            },
        };
        assert_eq!(PidFile::parse(&p.to_text()), Some(p));
        for junk in [
            "",
            "10\n11\n",
            "10 1\n",
            "x 1\n2 3\n",
            "0 1\n2 3\n",
            "1 1\n2 3\n4 5\n",
        ] {
            assert_eq!(PidFile::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 12345 1000 100";
        assert_eq!(parse_start_time(stat), Some(12345));
        let me = ProcessId::current().unwrap();
        assert!(me.is_alive());
        let other = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive(), "a reused pid is not the same process");
    }
}
