//! virtio-fs (virtio 1.2, section 5.11): one host directory shared into the
//! guest, served in-process by fuse-backend-rs's passthrough file system, with no
//! separate virtiofsd and no vhost-user socket. The guest mounts it with
//! `mount -t virtiofs <tag> <dir>`.
//!
//! - `device` ([`Fs`]): the virtio device: two queues (hiprio, one request queue), the
//!   configuration space (`tag[36]`, `num_request_queues`), chains in, FUSE
//!   messages to `fuse_backend_rs::api::server::Server`, replies out.
//! - `jail` ([`FsConfig`]): the file system the server drives: `PassthroughFs` behind a
//!   wrapper that refuses what could reach outside the share.
//! - [`defs`]: constants and limits.
//!
//! # The jail
//!
//! The guest is hostile; the VMM usually runs as root. Nothing the guest sends
//! may make the host read, write, stat or list anything outside the shared
//! directory. How each way out is closed:
//!
//! - **Every inode is reached one component at a time from the root.** The
//!   passthrough keeps an `O_PATH` fd per inode and resolves a LOOKUP with
//!   `openat(parent_fd, name, O_PATH | O_NOFOLLOW)`; node ids the guest never
//!   got from a LOOKUP/CREATE/MKDIR/... are unknown (`EBADF`), and open handles
//!   are checked against their inode. So the set of reachable host files is the
//!   tree under the root, as long as each step stays inside it:
//! - **Names are single components.** The jail refuses, in every request that
//!   names something (LOOKUP, MKDIR, MKNOD, SYMLINK, CREATE, UNLINK, RMDIR,
//!   RENAME, LINK), an empty name, a name with `/`, and `.` and `..` themselves.
//!   The passthrough alone turns `..` at the root into `.` but still resolves
//!   `..` elsewhere; the Linux FUSE client never sends either (it only looks them
//!   up for NFS export, which we never grant), so refusing both leaves no step
//!   that climbs.
//! - **Symlinks are never followed on the host.** LOOKUP of a symlink returns the
//!   link itself (`O_NOFOLLOW`); the guest reads it with READLINK and resolves it
//!   in its own namespace, so `evil -> /etc` or `evil -> ../../..` means the
//!   guest's `/etc`. A symlink inode is not a directory, so LOOKUP through it
//!   fails (`ENOTDIR`), and OPEN/OPENDIR only reopen regular files and
//!   directories (through `/proc/self/fd/N`, which lands on the inode itself,
//!   never on what a link points to). CREATE uses `O_CREAT | O_EXCL` (which does
//!   not follow a final symlink) and the jail adds `O_NOFOLLOW`; a CREATE over an
//!   existing symlink fails instead of creating the link's target.
//! - **Open flags are checked.** `O_PATH` makes `openat` ignore `O_EXCL` and
//!   `O_NOFOLLOW` and follow a final symlink: a CREATE with `O_PATH` of
//!   `evil -> /etc` would hand the guest a handle on the host's `/etc`. The jail
//!   refuses `O_PATH` and `O_TMPFILE` in OPEN, OPENDIR and CREATE.
//! - **No file handles.** `inode_file_handles` is off, so the host never calls
//!   `name_to_handle_at`/`open_by_handle_at`; FUSE has no request that takes a
//!   handle from the guest, and NFS export support (`EXPORT_SUPPORT`) is not
//!   offered. POSIX locks, ioctl, bmap, poll and DAX mapping requests are
//!   answered `ENOSYS`.
//! - **No extended attributes.** The passthrough's xattr calls go through
//!   `/proc/self/fd/N` paths and would let a root guest set `trusted.*` and
//!   `security.*` attributes (overlayfs metadata, file capabilities) on host
//!   files; all four xattr requests are answered `ENOSYS`, which the guest kernel
//!   turns into `EOPNOTSUPP`.
//! - **No device nodes.** MKNOD of block or character devices would create real
//!   host devices; only regular files, FIFOs, sockets and overlayfs whiteouts
//!   (char 0:0) are made.
//!
//! - **The root is the host's.** Its mode, owner, size and times are what the
//!   runtime made: SETATTR of any of them on node id 1 is `EPERM`, and so is a
//!   LINK of it. Nothing can name the root to UNLINK, RMDIR or RENAME it (names
//!   are single components, `.` and `..` refused), so those need no rule.
//!
//! # Bounds
//!
//! Each inode the guest holds (looked up and not yet forgotten) is an `O_PATH`
//! descriptor in husk-vmm, each open file or directory another. A guest that
//! never sends FORGET or RELEASE must not spend husk-vmm's descriptors (vsock,
//! the agent's line, needs its own), so the jail keeps the books the
//! passthrough does not show: each inode's lookup count (+1 per entry it hands
//! out, -n per FORGET or BATCH_FORGET of n) and the open handles (+OPEN,
//! OPENDIR, CREATE, -RELEASE, RELEASEDIR), both cleared at DESTROY and device
//! reset. Past [`FsLimits`] (by default sized from `RLIMIT_NOFILE`, which
//! husk-vmm raises to its hard limit, keeping 1024 back, at most 256 Ki inodes
//! and 64 Ki open files):
//!
//! - a request that would make the guest hold a new inode gets `ENFILE`:
//!   MKDIR, MKNOD, SYMLINK, LINK and CREATE before touching the host; a LOOKUP
//!   of an inode not yet held is forgotten again at once (its descriptor
//!   closed), while one already held still resolves; READDIRPLUS lists such
//!   entries with node id 0, which the guest takes as "look it up later";
//! - OPEN, OPENDIR and CREATE get `ENFILE`.
//!
//! CREATE is always exclusive towards the passthrough: without `O_EXCL`, and
//! when the name exists, it is served as LOOKUP then OPEN, because the
//! passthrough's own path keeps a lookup count (a descriptor) when the open
//! fails, with no entry the guest could forget.
//!
//! What stays the host's business: hard links or bind mounts that the host itself
//! placed inside the share, and host processes that move directories out of it
//! while the guest runs.
//!
//! - **Setuid and setgid only in writable layers.** A container's writable
//!   layer is an overlay (containerd's snapshot, the CLI's image overlay):
//!   files made setuid there keep the bit (`apt install sudo` in a
//!   container works) and no host user reaches them. Anywhere else in the
//!   share is a bind of a host directory (a volume, a hostPath), where a
//!   setuid-root file would be one on the host's file system: CREATE,
//!   MKNOD and SETATTR clear `S_ISUID` and `S_ISGID` there (a directory
//!   keeps setgid, which only passes its group on). Which devices are
//!   overlays comes from husk-vmm's `/proc/self/mountinfo`.
//!
//! # Threads, credentials, umask
//!
//! Requests are served one at a time on one thread: in husk-vmm's
//! file-system process ([`remote`]; the VMM's virtio-fs event loop only
//! relays them, without blocking), or in [`VirtioDevice::process_queue`] for
//! a device served in process (tests). To create files with the guest's ownership, the
//! passthrough switches the *thread's* effective uid/gid (raw `setresuid` /
//! `setresgid`, per thread) around the call; that needs a root (or
//! `CAP_SETUID`/`CAP_SETGID`) VMM for guest uids other than 0. Files are created
//! with the exact mode the guest computed, which needs umask 0 while creating:
//! the jail sets it around those calls and restores the VMM's own umask after.
//! The umask is process-wide, so requests must be served from one thread (all
//! `Fs` devices of a VMM on the event loop), and no other thread should create
//! files while one is being served.
//!
//! [`VirtioDevice::process_queue`]: crate::devices::virtio::VirtioDevice::process_queue

pub mod defs;
mod device;
mod jail;
pub mod remote;

pub use device::{Fs, FsError, Local};
pub use jail::{Cache, FsConfig, FsLimits};

#[cfg(test)]
mod tests;
