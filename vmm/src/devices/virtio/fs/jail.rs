//! The jail: a [`FileSystem`] in front of fuse-backend-rs's `PassthroughFs` that
//! refuses what could reach outside the shared directory (the module doc of
//! [`super`] explains why each rule is there).

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use super::defs::{MAX_HANDLES, MAX_INODES, RESERVED_FDS};

/// How the guest may cache what it reads from the share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cache {
    /// No data caching in the guest: every read reaches the host. For directories
    /// that the host changes under the guest's feet.
    Never,
    /// Close-to-open consistency: cached data is dropped when a file is reopened.
    /// Host changes show up at the next open.
    #[default]
    Auto,
    /// The guest keeps what it read; only right when the guest is the only writer.
    Always,
}

/// Options of a share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsConfig {
    pub cache: Cache,
    /// Let the guest coalesce writes in its page cache (needs exclusive access).
    pub writeback: bool,
    /// What the guest may hold open on the host; [`FsLimits::for_this_process`]
    /// when `None`.
    pub limits: Option<FsLimits>,
}

/// How many host objects the guest may hold through a share. Each inode the
/// guest has looked up (and not forgotten) is an `O_PATH` descriptor in
/// husk-vmm, each open file or directory another; without a bound a guest that
/// never sends FORGET or RELEASE would spend all of husk-vmm's descriptors, and
/// vsock (the agent's only line to the host) could no longer accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsLimits {
    /// Inodes held (looked up, created, linked, listed by READDIRPLUS) at once,
    /// the root not counted. Past it a request that would reach a new inode
    /// gets `ENFILE`; inodes already held still resolve.
    pub inodes: usize,
    /// Open files and directories (OPEN, OPENDIR, CREATE without RELEASE). Past
    /// it those get `ENFILE`.
    pub handles: usize,
}

impl FsLimits {
    /// The budget for a process whose `RLIMIT_NOFILE` soft limit is `nofile`:
    /// [`RESERVED_FDS`] (at most half of it) kept back for the rest of
    /// husk-vmm, three quarters of what is left for inodes and a quarter for
    /// open files, each at most [`MAX_INODES`] / [`MAX_HANDLES`].
    pub fn from_nofile(nofile: u64) -> FsLimits {
        let reserved = RESERVED_FDS.min(nofile / 2);
        let budget = nofile - reserved;
        let inodes = budget / 4 * 3;
        let handles = budget - inodes;
        let clamp = |n: u64, max: usize| usize::try_from(n).unwrap_or(usize::MAX).min(max);
        FsLimits {
            inodes: clamp(inodes, MAX_INODES),
            handles: clamp(handles, MAX_HANDLES),
        }
    }

    /// [`FsLimits::from_nofile`] of this process's soft limit now (husk-vmm
    /// raises it to the hard limit before it makes devices, see `vmm::run`).
    pub fn for_this_process() -> FsLimits {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into memory we own.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
            rl.rlim_cur
        } else {
            // The usual default; getrlimit cannot fail for a valid resource.
            1024
        };
        Self::from_nofile(soft)
    }
}

/// `__O_TMPFILE` without the `O_DIRECTORY` bit that `O_TMPFILE` includes.
const O_TMPFILE_BIT: u32 = (libc::O_TMPFILE & !libc::O_DIRECTORY) as u32;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn enosys() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSYS)
}

fn eperm() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// `ENFILE` ("too many open files in system"), for the share's own budget:
/// distinct from the host's `EMFILE`, and what the guest's open(2) passes on.
fn enfile() -> io::Error {
    io::Error::from_raw_os_error(libc::ENFILE)
}

/// FUSE's node id of the share root.
const ROOT_ID: u64 = fuse_backend_rs::api::filesystem::ROOT_ID;

/// SETATTR fields that change the share root: its mode, owner, size and times
/// belong to the host (the runtime made it, with the mode it chose). `FH` and
/// `LOCKOWNER` only say how the request is addressed.
fn changes_attributes(valid: SetattrValid) -> bool {
    valid.intersects(
        SetattrValid::MODE
            | SetattrValid::UID
            | SetattrValid::GID
            | SetattrValid::SIZE
            | SetattrValid::ATIME
            | SetattrValid::MTIME
            | SetattrValid::ATIME_NOW
            | SetattrValid::MTIME_NOW
            | SetattrValid::CTIME
            | SetattrValid::KILL_SUIDGID,
    )
}

/// A name the guest wants to resolve or create in one directory: a single path
/// component. `.` and `..` are refused everywhere: the Linux FUSE client only
/// looks them up for NFS export (`EXPORT_SUPPORT`, which we never grant), and
/// without them no name can climb out of a directory at all.
fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        crate::debug_limited!(name = ?name, "virtio-fs: refused a name that is not one path component");
        return Err(einval());
    }
    Ok(())
}

/// Open flags from the guest: `O_PATH` would make the host's `openat` ignore
/// `O_NOFOLLOW`/`O_EXCL` and follow a final symlink (out of the share);
/// `O_TMPFILE` creates files the jail never looked up. Neither is something the
/// Linux FUSE client sends.
fn check_open_flags(flags: u32) -> io::Result<()> {
    if flags & (libc::O_PATH as u32) != 0 || flags & O_TMPFILE_BIT != 0 {
        crate::debug_limited!(flags, "virtio-fs: refused O_PATH or O_TMPFILE");
        return Err(einval());
    }
    Ok(())
}

/// Sets the process umask to 0 and puts the previous one back when dropped.
///
/// PassthroughFs creates files with exactly the mode the guest computed (the guest
/// applied its own umask already), so the host umask must be 0 while it creates
/// files, and its `import` sets the umask to 0 for the whole process. The umask
/// is process-wide: without the guard, everything the VMM created after the first
/// FUSE INIT (sockets, logs) would get mode 0777/0666.
struct UmaskGuard(libc::mode_t);

impl UmaskGuard {
    fn zero() -> Self {
        // SAFETY: umask only swaps an integer in the kernel; it cannot fail.
        UmaskGuard(unsafe { libc::umask(0) })
    }
}

impl Drop for UmaskGuard {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::umask(self.0) };
    }
}

/// What the guest holds, mirrored from the passthrough's own books (which it
/// does not expose): each inode's lookup count as the passthrough keeps it
/// (+1 per entry handed to the guest, -n per FORGET of n, gone at 0), and the
/// open handles.
#[derive(Default)]
struct Held {
    inodes: HashMap<u64, u64>,
    handles: HashSet<u64>,
}

/// Where the guest may make files setuid or setgid on the host: only on
/// overlay file systems, which is what a container's writable layer is
/// (containerd's snapshot, the CLI's image overlay), whose files no host
/// user reaches. Anything else in the share is a bind of a host directory
/// (a volume, a hostPath), where a setuid-root file the guest made would
/// be one on the host's own file system, runnable by whoever reaches it
/// there: the bits are cleared, as on a `nosuid` upload. A directory keeps
/// its setgid bit (group inheritance, no privilege).
///
/// The file system of an inode is named by its device number; which devices
/// are overlays comes from husk-vmm's own `/proc/self/mountinfo` (opened
/// before the jail), read again whenever an unknown device shows up (a
/// container made after boot).
struct SetidPolicy {
    mountinfo: Option<std::fs::File>,
    /// Device number -> on an overlay. Bounded: cleared when full.
    known: HashMap<u64, bool>,
}

/// The most devices [`SetidPolicy`] remembers.
const MAX_KNOWN_DEVICES: usize = 4096;

impl SetidPolicy {
    fn new() -> Self {
        SetidPolicy {
            mountinfo: std::fs::File::open("/proc/self/mountinfo").ok(),
            known: HashMap::new(),
        }
    }

    /// Whether files on device `dev` may keep setuid/setgid bits.
    fn allows(&mut self, dev: u64) -> bool {
        if let Some(&b) = self.known.get(&dev) {
            return b;
        }
        let overlays = self.read_overlays();
        if self.known.len() >= MAX_KNOWN_DEVICES {
            self.known.clear();
        }
        let b = overlays.contains(&dev);
        self.known.insert(dev, b);
        b
    }

    fn read_overlays(&mut self) -> HashSet<u64> {
        use std::io::{Read, Seek};
        let Some(f) = self.mountinfo.as_mut() else {
            return HashSet::new();
        };
        let mut text = String::new();
        if f.rewind().is_err() || f.read_to_string(&mut text).is_err() {
            return HashSet::new();
        }
        overlay_devices(&text)
    }
}

/// The device numbers of the overlay mounts in a mountinfo text
/// (`ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [TAGS...] - FSTYPE ...`).
pub(super) fn overlay_devices(mountinfo: &str) -> HashSet<u64> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? != "overlay" {
                return None;
            }
            let (major, minor) = left.split_whitespace().nth(2)?.split_once(':')?;
            Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
        })
        .collect()
}

/// `mode` without the setuid bit, and without setgid unless a directory.
fn without_setid(mode: u32) -> u32 {
    if mode & libc::S_IFMT == libc::S_IFDIR {
        mode & !libc::S_ISUID
    } else {
        mode & !(libc::S_ISUID | libc::S_ISGID)
    }
}

/// The jailed passthrough file system.
pub struct Jail {
    inner: PassthroughFs<()>,
    limits: FsLimits,
    held: Mutex<Held>,
    setid: Mutex<SetidPolicy>,
}

impl Jail {
    /// A passthrough of `root` (an absolute, canonical path to a directory).
    ///
    /// Opens `/proc/self/fd` and `/proc/self/mountinfo` now; `root` itself is
    /// opened (by path, `O_PATH | O_NOFOLLOW`) at every FUSE INIT and DESTROY.
    pub fn new(root: &str, cfg: FsConfig) -> io::Result<Jail> {
        let cache_policy = match cfg.cache {
            Cache::Never => CachePolicy::Never,
            Cache::Auto => CachePolicy::Auto,
            Cache::Always => CachePolicy::Always,
        };
        let config = Config {
            root_dir: root.to_owned(),
            cache_policy,
            writeback: cfg.writeback,
            // Off: see the module doc (xattrs).
            xattr: false,
            // Import the root at INIT, and keep the passthrough's own name checks on
            // (it skips them when it thinks a VFS layer did them).
            do_import: true,
            // Off: inodes are O_PATH fds, never file handles (no
            // name_to_handle_at/open_by_handle_at on guest input).
            inode_file_handles: false,
            // Off: every open goes through OPEN, where the jail checks the flags.
            no_open: false,
            no_opendir: false,
            // Off: it would drop and raise CAP_FSETID (capget/capset) per write.
            killpriv_v2: false,
            use_host_ino: false,
            seal_size: false,
            dax_file_size: None,
            ..Config::default()
        };
        Ok(Jail {
            inner: PassthroughFs::new(config)?,
            limits: cfg.limits.unwrap_or_else(FsLimits::for_this_process),
            held: Mutex::new(Held::default()),
            setid: Mutex::new(SetidPolicy::new()),
        })
    }

    /// The permission bits of `mode` (a `kind`: `S_IFREG`, `S_IFDIR`, ...)
    /// as the host may store them for a file made in, or being, `inode`
    /// (see [`SetidPolicy`]).
    fn host_mode(&self, ctx: &Context, inode: u64, kind: u32, mode: u32) -> io::Result<u32> {
        if mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
            return Ok(mode);
        }
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        let allowed = self
            .setid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allows(st.st_dev);
        if allowed {
            return Ok(mode);
        }
        let kept =
            (mode & libc::S_IFMT) | (without_setid(kind | (mode & !libc::S_IFMT)) & !libc::S_IFMT);
        if kept != mode {
            crate::debug_limited!(
                mode,
                "virtio-fs: setuid/setgid bits cleared outside an overlay"
            );
        }
        Ok(kept)
    }

    pub fn limits(&self) -> FsLimits {
        self.limits
    }

    /// Inodes and handles the guest holds now.
    pub fn held(&self) -> (usize, usize) {
        let h = self.held_mut();
        (h.inodes.len(), h.handles.len())
    }

    fn held_mut(&self) -> MutexGuard<'_, Held> {
        // Held only for bookkeeping, never across a call into the passthrough.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses a request that makes a new inode when the guest holds its most.
    fn room_for_inode(&self) -> io::Result<()> {
        if self.held_mut().inodes.len() >= self.limits.inodes {
            crate::warn_limited!(
                limit = self.limits.inodes,
                "virtio-fs: the guest holds its most inodes; ENFILE"
            );
            return Err(enfile());
        }
        Ok(())
    }

    fn room_for_handle(&self) -> io::Result<()> {
        if self.held_mut().handles.len() >= self.limits.handles {
            crate::warn_limited!(
                limit = self.limits.handles,
                "virtio-fs: the guest holds its most open files; ENFILE"
            );
            return Err(enfile());
        }
        Ok(())
    }

    /// Books an entry the passthrough is about to hand to the guest (it took
    /// one lookup count on it). A new inode past the limit is forgotten again
    /// at once, which closes its descriptor, and the request gets `ENFILE`.
    fn admit(&self, ctx: &Context, inode: u64) -> io::Result<()> {
        // The passthrough never forgets the root (and counts it on its own).
        if inode == ROOT_ID {
            return Ok(());
        }
        let mut held = self.held_mut();
        if let Some(n) = held.inodes.get_mut(&inode) {
            *n = n.saturating_add(1);
            return Ok(());
        }
        if held.inodes.len() >= self.limits.inodes {
            drop(held);
            self.inner.forget(ctx, inode, 1);
            crate::warn_limited!(
                limit = self.limits.inodes,
                "virtio-fs: the guest holds its most inodes; ENFILE"
            );
            return Err(enfile());
        }
        held.inodes.insert(inode, 1);
        Ok(())
    }

    /// Takes `count` lookups off the books, as the passthrough's FORGET does.
    fn unbook(held: &mut Held, inode: u64, count: u64) {
        if let Some(n) = held.inodes.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                held.inodes.remove(&inode);
            }
        }
    }

    fn opened(&self, handle: Option<u64>) {
        if let Some(h) = handle {
            self.held_mut().handles.insert(h);
        }
    }

    fn closed(&self, handle: u64, res: io::Result<()>) -> io::Result<()> {
        // The passthrough drops the handle only when it belongs to the inode
        // (else EBADF and it stays).
        if res.is_ok() {
            self.held_mut().handles.remove(&handle);
        }
        res
    }

    /// An entry-making request (MKDIR, MKNOD, SYMLINK, LINK) past the room check.
    fn made(&self, ctx: &Context, res: io::Result<Entry>) -> io::Result<Entry> {
        let entry = res?;
        self.admit(ctx, entry.inode)?;
        Ok(entry)
    }
}

impl FileSystem for Jail {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // `import` (run by init) sets the umask to 0; the guard restores it.
        let _umask = UmaskGuard::zero();
        let mut want = self.inner.init(capable)?;
        // 1 MiB requests instead of the 4 KiB default: the FUSE server sizes
        // max_write and max_pages from these.
        want |= FsOptions::BIG_WRITES | FsOptions::MAX_PAGES;
        // No NFS export (lookups of "." and ".." by node id) and no DAX window.
        want.remove(FsOptions::EXPORT_SUPPORT | FsOptions::PERFILE_DAX);
        Ok(want)
    }

    fn destroy(&self) {
        // Drops every inode and handle, then re-imports the root (umask 0 again).
        let _umask = UmaskGuard::zero();
        self.inner.destroy();
        *self.held_mut() = Held::default();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        // Served at the inode limit too: a name the guest already holds
        // resolves, only a new inode is refused (see `admit`).
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.admit(ctx, entry.inode)?;
        Ok(entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count);
        Self::unbook(&mut self.held_mut(), inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        {
            let mut held = self.held_mut();
            for &(inode, count) in &requests {
                Self::unbook(&mut held, inode, count);
            }
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        if inode == ROOT_ID && changes_attributes(valid) {
            crate::warn_limited!(
                valid = valid.bits(),
                "virtio-fs: refused SETATTR on the share root"
            );
            return Err(eperm());
        }
        let mut attr = attr;
        if valid.contains(SetattrValid::MODE) && attr.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0
        {
            // The inode's own type decides what a directory keeps.
            let (st, _) = self.inner.getattr(ctx, inode, handle)?;
            attr.st_mode = self.host_mode(ctx, inode, st.st_mode & libc::S_IFMT, attr.st_mode)?;
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        // The target is stored verbatim: it means something only in the guest,
        // which resolves it; the host never follows it.
        check_name(name)?;
        self.room_for_inode()?;
        let _umask = UmaskGuard::zero();
        self.made(ctx, self.inner.symlink(ctx, linkname, parent, name))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        // Device nodes made by the guest would be real devices on the host. FIFOs,
        // sockets and overlayfs whiteouts (character device 0:0) are what
        // containers make; other devices belong on the guest's own /dev.
        let allowed = match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => true,
            libc::S_IFCHR => rdev == 0,
            _ => false,
        };
        if !allowed {
            crate::debug_limited!(mode, rdev, "virtio-fs: refused a device node");
            return Err(eperm());
        }
        self.room_for_inode()?;
        let mode = self.host_mode(ctx, parent, mode & libc::S_IFMT, mode)?;
        let _umask = UmaskGuard::zero();
        self.made(ctx, self.inner.mknod(ctx, parent, name, mode, rdev, umask))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        self.room_for_inode()?;
        let mode = self.host_mode(ctx, parent, libc::S_IFDIR, mode)?;
        let _umask = UmaskGuard::zero();
        self.made(ctx, self.inner.mkdir(ctx, parent, name, mode, umask))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        check_name(oldname)?;
        check_name(newname)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        check_name(newname)?;
        // Directories cannot be hard-linked anyway; the root gets a clear no.
        if inode == ROOT_ID {
            return Err(eperm());
        }
        self.room_for_inode()?;
        self.made(ctx, self.inner.link(ctx, inode, newparent, newname))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        check_open_flags(flags)?;
        self.room_for_handle()?;
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.opened(opened.0);
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        check_name(name)?;
        check_open_flags(args.flags)?;
        self.room_for_inode()?;
        self.room_for_handle()?;
        // The passthrough creates with O_CREAT | O_EXCL, which already refuses a
        // final symlink; O_NOFOLLOW keeps that true whatever the flags become.
        args.flags |= libc::O_NOFOLLOW as u32;
        args.mode = self.host_mode(ctx, parent, libc::S_IFREG, args.mode)?;
        let excl = libc::O_EXCL as u32;
        let created = {
            let _umask = UmaskGuard::zero();
            // Always exclusive: without O_EXCL the passthrough opens an
            // existing file after its lookup, and when that open fails the
            // lookup count stays taken with no entry for the guest to forget
            // (a descriptor per file, off the books). An existing file is
            // opened below instead, as LOOKUP + OPEN, each booked.
            self.inner.create(
                ctx,
                parent,
                name,
                CreateIn {
                    flags: args.flags | excl,
                    ..args
                },
            )
        };
        match created {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && args.flags & excl == 0 => {
                let entry = self.lookup(ctx, parent, name)?;
                let flags = args.flags & !(libc::O_CREAT as u32);
                match self.inner.open(ctx, entry.inode, flags, args.fuse_flags) {
                    Ok((handle, opts, passthrough)) => {
                        self.opened(handle);
                        Ok((entry, handle, opts, passthrough))
                    }
                    Err(e) => {
                        self.forget(ctx, entry.inode, 1);
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
            Ok(c) => {
                if let Err(e) = self.admit(ctx, c.0.inode) {
                    // Cannot happen after the room check (one thread serves the
                    // share); if it did, the handle goes too.
                    if let Some(h) = c.1 {
                        let _ = self.inner.release(ctx, c.0.inode, 0, h, false, false, None);
                    }
                    return Err(e);
                }
                self.opened(c.1);
                Ok(c)
            }
        }
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let res = self
            .inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner);
        self.closed(handle, res)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    // Extended attributes are refused (see the module doc). ENOSYS makes the guest
    // kernel remember that and answer EOPNOTSUPP itself from then on.
    fn setxattr(
        &self,
        _ctx: &Context,
        _inode: u64,
        _name: &CStr,
        _value: &[u8],
        _flags: u32,
    ) -> io::Result<()> {
        Err(enosys())
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        _inode: u64,
        _name: &CStr,
        _size: u32,
    ) -> io::Result<GetxattrReply> {
        Err(enosys())
    }

    fn listxattr(&self, _ctx: &Context, _inode: u64, _size: u32) -> io::Result<ListxattrReply> {
        Err(enosys())
    }

    fn removexattr(&self, _ctx: &Context, _inode: u64, _name: &CStr) -> io::Result<()> {
        Err(enosys())
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        check_open_flags(flags)?;
        self.room_for_handle()?;
        let opened = self.inner.opendir(ctx, inode, flags)?;
        self.opened(opened.0);
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // The passthrough looks up each entry it lists (one count each, given
        // back by itself when the entry does not fit the reply).
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |dirent, entry| {
                let ino = entry.inode;
                if self.admit(ctx, ino).is_err() {
                    // Past the inode limit: the name without a node id (the
                    // FUSE client then just looks it up later, when it needs
                    // it). `admit` has forgotten the inode already, so the
                    // passthrough's own forget on a full reply finds nothing.
                    return add_entry(dirent, Entry { inode: 0, ..entry });
                }
                let res = add_entry(dirent, entry);
                if let Ok(0) = res {
                    Self::unbook(&mut self.held_mut(), ino, 1);
                }
                res
            })
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        let res = self.inner.releasedir(ctx, inode, flags, handle);
        self.closed(handle, res)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    // Everything else keeps the trait's default, ENOSYS: ioctl (arbitrary host
    // ioctls), bmap, poll, POSIX locks (getlk/setlk/setlkw: the guest kernel
    // then keeps locks local), and setupmapping/removemapping (no DAX window).
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_one_component() {
        for bad in [&b"\0"[..], b".\0", b"..\0", b"a/b\0", b"/\0", b"../etc\0"] {
            let name = CStr::from_bytes_with_nul(bad).unwrap();
            assert!(check_name(name).is_err(), "{name:?}");
        }
        for good in [&b"a\0"[..], b"...\0", b".hidden\0", b"..x\0"] {
            check_name(CStr::from_bytes_with_nul(good).unwrap()).unwrap();
        }
    }

    #[test]
    fn open_flags() {
        check_open_flags(libc::O_RDWR as u32 | libc::O_CREAT as u32).unwrap();
        check_open_flags(libc::O_DIRECTORY as u32).unwrap();
        assert!(check_open_flags(libc::O_PATH as u32).is_err());
        assert!(check_open_flags(libc::O_TMPFILE as u32 | libc::O_RDWR as u32).is_err());
    }
}
