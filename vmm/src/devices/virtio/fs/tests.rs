//! The device driven the way the guest's virtio-fs driver drives it: hand-built
//! FUSE requests in descriptor chains in guest memory, over a temporary share.
//! No KVM needed.

use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, BatchForgetIn, CreateIn, EntryOut, ForgetOne, GetattrIn, GetxattrIn, InHeader, InitIn,
    InitOut, LinkIn, MkdirIn, MknodIn, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, RenameIn,
    SetattrIn, SetxattrIn, WriteIn, WriteOut,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::defs::*;
use super::{remote, Fs, FsConfig, FsError, FsLimits, Local};
use crate::devices::virtio::chain::test_utils::{desc, memory, publish};
use crate::devices::virtio::defs::F_VERSION_1;
use crate::devices::virtio::{ActivateError, Activation, Interrupt, VirtioDevice};
use crate::memory::GuestMemoryMmap;

// FUSE opcodes (include/uapi/linux/fuse.h).
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const SYMLINK: u32 = 6;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const RMDIR: u32 = 11;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const RELEASE: u32 = 18;
const SETXATTR: u32 = 21;
const GETXATTR: u32 = 22;
const LISTXATTR: u32 = 23;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const RELEASEDIR: u32 = 29;
const BATCH_FORGET: u32 = 42;
const READDIRPLUS: u32 = 44;
const IOCTL: u32 = 39;
const CREATE: u32 = 35;

const ROOT: u64 = 1;
/// Where requests and replies live in guest memory.
const REQ: u64 = 0x10000;
const RESP: u64 = 0x40000;
const RESP_LEN: u32 = 0x10000;

/// The umask is process-wide and the jail sets it around file creation; tests
/// that serve requests run one at a time, as the one event-loop thread would.
static SERIAL: Mutex<()> = Mutex::new(());

struct Guest<'a> {
    _serial: MutexGuard<'static, ()>,
    mem: &'a GuestMemoryMmap,
    queues: [MockSplitQueue<'a, GuestMemoryMmap>; 2],
    dev: Fs,
    irq: Arc<Interrupt>,
    unique: u64,
}

/// A NUL-terminated name.
fn c(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap, dir: &Path) -> Self {
        Self::with_config(mem, dir, FsConfig::default())
    }

    fn with_limits(mem: &'a GuestMemoryMmap, dir: &Path, inodes: usize, handles: usize) -> Self {
        let limits = Some(FsLimits { inodes, handles });
        Self::with_config(
            mem,
            dir,
            FsConfig {
                limits,
                ..FsConfig::default()
            },
        )
    }

    fn with_config(mem: &'a GuestMemoryMmap, dir: &Path, cfg: FsConfig) -> Self {
        let dev = Fs::new("share", dir, cfg).unwrap();
        Self::with_device(mem, dev)
    }

    /// The device relaying to a file-system "process" (a thread here)
    /// serving `dir` over a socket pair, as husk-vmm's does.
    fn remote(mem: &'a GuestMemoryMmap, dir: &Path) -> (Self, std::thread::JoinHandle<String>) {
        let (vmm, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let (local, _) = Local::new(dir, FsConfig::default()).unwrap();
        let served = std::thread::spawn(move || {
            match remote::serve(
                std::fs::File::from(std::os::fd::OwnedFd::from(server)),
                &local,
            ) {
                Ok(()) => "eof".to_string(),
                Err(e) => e.to_string(),
            }
        });
        let client = remote::Client::new(vmm).unwrap();
        let dev = Fs::remote("share", dir, client).unwrap();
        (Self::with_device(mem, dev), served)
    }

    fn with_device(mem: &'a GuestMemoryMmap, dev: Fs) -> Self {
        let mut g = Guest {
            _serial: SERIAL.lock().unwrap_or_else(|e| e.into_inner()),
            mem,
            queues: [
                MockSplitQueue::create(mem, GuestAddress(0x1000), 16),
                MockSplitQueue::create(mem, GuestAddress(0x4000), 16),
            ],
            dev,
            irq: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            unique: 0,
        };
        g.activate();
        g
    }

    fn activate(&mut self) {
        let queues = self
            .queues
            .iter()
            .map(|q| q.create_queue().unwrap())
            .collect();
        self.dev
            .activate(Activation {
                mem: self.mem.clone(),
                queues,
                interrupt: self.irq.clone(),
                features: F_VERSION_1,
            })
            .unwrap();
    }

    /// Publishes one chain on queue `q`; returns the used length, or None when the
    /// device did not return the chain.
    fn send(&mut self, q: usize, descs: &[RawDescriptor]) -> Option<u32> {
        let vq = &self.queues[q];
        let before = vq.used().idx().load();
        // The mock lays its used ring over the avail ring's upper slots, so
        // the used index is read only once the device has answered (its
        // interrupt), never while a published slot may sit on it.
        let _ = self.irq.eventfd().read();
        publish(vq, descs, &[0]);
        self.dev.process_queue(q);
        // The file-system process answers through the socket: the event
        // loop's part, until the chain is back or the device gave up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.dev.is_remote()
            && self.irq.eventfd().read().is_err()
            && !self.irq.needs_reset()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_micros(200));
            self.dev.pump();
        }
        let after = vq.used().idx().load();
        if after == before {
            return None;
        }
        Some(
            vq.used()
                .ring()
                .ref_at(before as usize % 16)
                .unwrap()
                .load()
                .len(),
        )
    }

    fn header(&mut self, opcode: u32, nodeid: u64, body_len: usize) -> InHeader {
        self.unique += 1;
        InHeader {
            len: (IN_HEADER_LEN + body_len) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        }
    }

    /// Sends `header` and `body` with a reply buffer of `resp_len` bytes; returns
    /// the reply bytes.
    fn raw(&mut self, header: InHeader, body: &[u8], resp_len: u32) -> Vec<u8> {
        let req = cat(&[header.as_slice(), body]);
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        let descs = if resp_len == 0 {
            vec![desc(REQ, req.len() as u32, false, None)]
        } else {
            vec![
                desc(REQ, req.len() as u32, false, Some(1)),
                desc(RESP, resp_len, true, None),
            ]
        };
        // Stale bytes must not pass for a reply.
        self.mem
            .write_slice(&vec![0xee; RESP_LEN as usize], GuestAddress(RESP))
            .unwrap();
        let used = self.send(1, &descs).expect("the chain comes back");
        let mut out = vec![0u8; used as usize];
        self.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
        out
    }

    /// One request; Ok(payload) or Err(errno).
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Result<Vec<u8>, i32> {
        let h = self.header(opcode, nodeid, body.len());
        let reply = self.raw(h, body, RESP_LEN);
        assert!(reply.len() >= OUT_HEADER_LEN, "short reply {reply:?}");
        let out = OutHeader::from_slice(&reply[..OUT_HEADER_LEN]).unwrap();
        assert_eq!(out.unique, h.unique);
        assert_eq!(out.len as usize, reply.len());
        assert!(!self.irq.needs_reset());
        if out.error != 0 {
            return Err(-out.error);
        }
        Ok(reply[OUT_HEADER_LEN..].to_vec())
    }

    fn obj<T: ByteValued>(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Result<T, i32> {
        let p = self.call(opcode, nodeid, body)?;
        Ok(*T::from_slice(&p[..std::mem::size_of::<T>()]).expect("reply too short"))
    }

    fn init(&mut self) -> InitOut {
        let init = InitIn {
            major: 7,
            minor: 33,
            max_readahead: 1 << 20,
            // BIG_WRITES | MAX_PAGES | EXPORT_SUPPORT
            flags: 0x20 | 0x40_0000 | 0x10,
        };
        self.obj(INIT, 0, init.as_slice()).unwrap()
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        self.obj(LOOKUP, parent, &c(name))
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let o: OpenOut = self.obj(
            OPEN,
            node,
            OpenIn {
                flags: flags as u32,
                fuse_flags: 0,
            }
            .as_slice(),
        )?;
        Ok(o.fh)
    }

    fn release(&mut self, node: u64, fh: u64) -> Result<(), i32> {
        let rel = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(RELEASE, node, rel.as_slice()).map(drop)
    }

    fn opendir(&mut self, node: u64) -> Result<u64, i32> {
        let od = OpenIn {
            flags: libc::O_RDONLY as u32 | libc::O_DIRECTORY as u32,
            fuse_flags: 0,
        };
        let o: OpenOut = self.obj(OPENDIR, node, od.as_slice())?;
        Ok(o.fh)
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let m = MkdirIn {
            mode: 0o755,
            umask: 0,
        };
        self.obj(MKDIR, parent, &cat(&[m.as_slice(), &c(name)]))
    }

    fn setattr(&mut self, node: u64, attr: SetattrIn) -> Result<AttrOut, i32> {
        self.obj(SETATTR, node, attr.as_slice())
    }

    /// FORGET on the hiprio queue (no reply).
    fn forget(&mut self, node: u64, n: u64) {
        let h = self.header(FORGET, node, 8);
        let req = cat(&[h.as_slice(), &n.to_le_bytes()]);
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        let used = self.send(0, &[desc(REQ, req.len() as u32, false, None)]);
        assert_eq!(used, Some(0));
    }

    fn batch_forget(&mut self, nodes: &[(u64, u64)]) {
        let mut body = BatchForgetIn {
            count: nodes.len() as u32,
            dummy: 0,
        }
        .as_slice()
        .to_vec();
        for &(nodeid, nlookup) in nodes {
            body.extend_from_slice(ForgetOne { nodeid, nlookup }.as_slice());
        }
        let h = self.header(BATCH_FORGET, 0, body.len());
        let req = cat(&[h.as_slice(), &body]);
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        let used = self.send(0, &[desc(REQ, req.len() as u32, false, None)]);
        assert_eq!(used, Some(0));
    }

    fn read(&mut self, node: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
        let r = ReadIn {
            fh,
            offset: 0,
            size,
            ..Default::default()
        };
        self.call(READ, node, r.as_slice())
    }

    fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: i32,
        mode: u32,
    ) -> Result<(EntryOut, OpenOut), i32> {
        let args = CreateIn {
            flags: flags as u32,
            mode,
            umask: 0o022,
            fuse_flags: 0,
        };
        let p = self.call(CREATE, parent, &cat(&[args.as_slice(), &c(name)]))?;
        let n = std::mem::size_of::<EntryOut>();
        Ok((
            *EntryOut::from_slice(&p[..n]).unwrap(),
            *OpenOut::from_slice(&p[n..n + std::mem::size_of::<OpenOut>()]).unwrap(),
        ))
    }
}

fn share() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello world").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/inner"), b"inner").unwrap();
    dir
}

fn is_lnk(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFLNK
}

#[test]
fn config_space_holds_tag_and_queue_count() {
    let dir = share();
    let dev = Fs::new("rootfs", dir.path(), FsConfig::default()).unwrap();
    assert_eq!(dev.device_type(), 26);
    assert_eq!(
        dev.queue_max_sizes(),
        &[HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE]
    );
    assert_eq!(dev.features(), F_VERSION_1);
    let mut cfg = [0xffu8; CONFIG_LEN];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], b"rootfs");
    assert!(cfg[6..TAG_LEN].iter().all(|b| *b == 0));
    assert_eq!(&cfg[TAG_LEN..], &1u32.to_le_bytes());
    // Reads past the end are zero; a 4-byte read of num_request_queues works.
    let mut d = [0xffu8; 4];
    dev.read_config(TAG_LEN as u64, &mut d);
    assert_eq!(u32::from_le_bytes(d), 1);
    dev.read_config(CONFIG_LEN as u64, &mut d);
    assert_eq!(d, [0; 4]);
    assert_eq!(dev.tag(), "rootfs");
    assert_eq!(dev.shared_dir(), dir.path().canonicalize().unwrap());
}

#[test]
fn constructor_refuses_bad_tags_and_dirs() {
    let dir = share();
    for tag in ["", &"x".repeat(37), "a\0b"] {
        assert!(matches!(
            Fs::new(tag, dir.path(), FsConfig::default()),
            Err(FsError::BadTag { .. })
        ));
    }
    // 36 bytes fill the field exactly.
    Fs::new(&"t".repeat(36), dir.path(), FsConfig::default()).unwrap();
    assert!(matches!(
        Fs::new("t", &dir.path().join("missing"), FsConfig::default()),
        Err(FsError::SharedDir { .. })
    ));
    assert!(matches!(
        Fs::new("t", &dir.path().join("hello.txt"), FsConfig::default()),
        Err(FsError::NotADirectory { .. })
    ));
}

#[test]
fn activation_needs_both_queues() {
    let dir = share();
    let mem = memory();
    let mut dev = Fs::new("t", dir.path(), FsConfig::default()).unwrap();
    let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let e = dev
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![q.create_queue().unwrap()],
            interrupt: irq,
            features: F_VERSION_1,
        })
        .unwrap_err();
    assert!(matches!(e, ActivateError::BadQueue(1)));
    // Notifications before activation are ignored.
    dev.process_queue(1);
}

#[test]
fn init_lookup_getattr_open_read() {
    let dir = share();
    let mem = memory();
    let mut g = Guest::new(&mem, dir.path());
    let init = g.init();
    assert_eq!(init.major, 7);
    // 1 MiB requests, and no NFS export even though the driver offered it.
    assert_eq!(init.max_pages, 256);
    assert_eq!(init.max_write, 1 << 20);
    assert_eq!(init.flags & 0x10, 0);

    let e = g.lookup(ROOT, "hello.txt").unwrap();
    assert_eq!(e.attr.size, 11);
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let host_ino = std::fs::metadata(dir.path().join("hello.txt"))
        .unwrap()
        .ino();
    assert_eq!(e.attr.ino, host_ino);

    let a: AttrOut = g
        .obj(GETATTR, e.nodeid, GetattrIn::default().as_slice())
        .unwrap();
    assert_eq!(a.attr.size, 11);

    let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(e.nodeid, fh, 100).unwrap(), b"hello world");
    let rel = ReleaseIn {
        fh,
        ..Default::default()
    };
    g.call(RELEASE, e.nodeid, rel.as_slice()).unwrap();

    let sub = g.lookup(ROOT, "sub").unwrap();
    let inner = g.lookup(sub.nodeid, "inner").unwrap();
    let fh = g.open(inner.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(inner.nodeid, fh, 4096).unwrap(), b"inner");

    assert_eq!(g.lookup(ROOT, "nope").unwrap_err(), libc::ENOENT);
    // FORGET on the hiprio queue: no reply, no writable buffer, no reset.
    let h = g.header(FORGET, e.nodeid, 8);
    let req = cat(&[h.as_slice(), &1u64.to_le_bytes()]);
    mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    assert_eq!(
        g.send(0, &[desc(REQ, req.len() as u32, false, None)]),
        Some(0)
    );
    assert!(!g.irq.needs_reset());
}

#[test]
fn guest_writes_land_on_the_host() {
    let dir = share();
    let mem = memory();
    let mut g = Guest::new(&mem, dir.path());
    g.init();
    let umask_before = current_umask();

    let (e, o) = g
        .create(ROOT, "new.txt", libc::O_WRONLY | libc::O_CREAT, 0o100640)
        .unwrap();
    let data = b"written by the guest";
    let w = WriteIn {
        fh: o.fh,
        offset: 0,
        size: data.len() as u32,
        ..Default::default()
    };
    let out: WriteOut = g.obj(WRITE, e.nodeid, &cat(&[w.as_slice(), data])).unwrap();
    assert_eq!(out.size as usize, data.len());
    let path = dir.path().join("new.txt");
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // The guest's mode exactly (its umask is its own business), and the VMM's
    // umask is back to what it was.
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(current_umask(), umask_before);

    let m = MkdirIn {
        mode: 0o1777,
        umask: 0,
    };
    let d: EntryOut = g
        .obj(MKDIR, ROOT, &cat(&[m.as_slice(), &c("tmp")]))
        .unwrap();
    assert_eq!(d.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    let meta = std::fs::metadata(dir.path().join("tmp")).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o1777);

    // Symlinks are made as given and read back verbatim.
    let l: EntryOut = g
        .obj(SYMLINK, ROOT, &cat(&[&c("lnk"), &c("/etc/passwd")]))
        .unwrap();
    assert!(is_lnk(l.attr.mode));
    assert_eq!(
        std::fs::read_link(dir.path().join("lnk")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(g.call(READLINK, l.nodeid, &[]).unwrap(), b"/etc/passwd");

    // A FIFO and an overlayfs whiteout are allowed; real devices are not.
    let fifo = MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..Default::default()
    };
    g.obj::<EntryOut>(MKNOD, ROOT, &cat(&[fifo.as_slice(), &c("fifo")]))
        .unwrap();
    assert!(std::fs::metadata(dir.path().join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let mem_dev = MknodIn {
        mode: libc::S_IFCHR | 0o666,
        rdev: (1 << 8) | 1,
        ..Default::default()
    };
    assert_eq!(
        g.call(MKNOD, ROOT, &cat(&[mem_dev.as_slice(), &c("mem")]))
            .unwrap_err(),
        libc::EPERM
    );
    let blk = MknodIn {
        mode: libc::S_IFBLK | 0o666,
        rdev: (8 << 8),
        ..Default::default()
    };
    assert_eq!(
        g.call(MKNOD, ROOT, &cat(&[blk.as_slice(), &c("sda")]))
            .unwrap_err(),
        libc::EPERM
    );
    assert!(!dir.path().join("mem").exists() && !dir.path().join("sda").exists());
}

/// Setuid and setgid bits the guest asks for on a host file system that is
/// not an overlay (a volume) are cleared, in CREATE, MKNOD, MKDIR (a
/// directory keeps setgid) and SETATTR; on an overlay (a container's
/// writable layer) they are kept. The share here is a plain directory; on a
/// machine whose /tmp is an overlay the bits must be kept instead.
#[test]
fn setid_bits_are_kept_only_on_overlays() {
    let dir = share();
    let mem = memory();
    let mut g = Guest::new(&mem, dir.path());
    g.init();
    let dev = std::fs::metadata(dir.path()).unwrap().dev();
    let on_overlay =
        super::jail::overlay_devices(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
            .contains(&dev);
    let host_mode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().mode() & 0o7777;
    let want = |asked: u32, cleared: u32| if on_overlay { asked } else { cleared };

    g.create(ROOT, "suid", libc::O_WRONLY | libc::O_CREAT, 0o104755)
        .unwrap();
    assert_eq!(host_mode("suid"), want(0o4755, 0o755));
    let node = MknodIn {
        mode: libc::S_IFREG | 0o2755,
        ..Default::default()
    };
    g.obj::<EntryOut>(MKNOD, ROOT, &cat(&[node.as_slice(), &c("sgid")]))
        .unwrap();
    assert_eq!(host_mode("sgid"), want(0o2755, 0o755));
    let m = MkdirIn {
        mode: 0o6775,
        umask: 0,
    };
    let d = g
        .obj::<EntryOut>(MKDIR, ROOT, &cat(&[m.as_slice(), &c("shared")]))
        .unwrap();
    // mkdir(2) itself takes no setid bits on Linux.
    assert_eq!(host_mode("shared"), 0o775);
    let attr = SetattrIn {
        valid: 1, // FATTR_MODE
        mode: libc::S_IFDIR | 0o6775,
        ..Default::default()
    };
    g.setattr(d.nodeid, attr).unwrap();
    assert_eq!(host_mode("shared"), want(0o6775, 0o2775));
    // chmod u+s, g+s of a file the guest made plain.
    let (e, _) = g
        .create(ROOT, "plain", libc::O_WRONLY | libc::O_CREAT, 0o100755)
        .unwrap();
    let attr = SetattrIn {
        valid: 1, // FATTR_MODE
        mode: libc::S_IFREG | 0o6755,
        ..Default::default()
    };
    let out = g.setattr(e.nodeid, attr).unwrap();
    assert_eq!(host_mode("plain"), want(0o6755, 0o755));
    assert_eq!(out.attr.mode & 0o7777, want(0o6755, 0o755));
    // Modes without the bits are the guest's exactly.
    let attr = SetattrIn {
        valid: 1, // FATTR_MODE
        mode: libc::S_IFREG | 0o1700,
        ..Default::default()
    };
    g.setattr(e.nodeid, attr).unwrap();
    assert_eq!(host_mode("plain"), 0o1700);
}

#[test]
fn overlay_mounts_are_found_by_device() {
    let text = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
90 27 0:61 / /run/husk/x/shared/c/rootfs rw,relatime shared:5 - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/w
91 27 0:62 / /run/husk/x/shared/c/volumes/0 rw - tmpfs tmpfs rw
bad line
92 27 0:x / /y rw - overlay overlay rw
";
    let found = super::jail::overlay_devices(text);
    assert_eq!(found.len(), 1);
    assert!(found.contains(&libc::makedev(0, 61)));
}

fn current_umask() -> libc::mode_t {
    // SAFETY: umask swaps an integer; the old value is put straight back.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    }
}

#[test]
fn dotdot_and_slashes_do_not_climb() {
    let dir = share();
    let mem = memory();
    let mut g = Guest::new(&mem, dir.path());
    g.init();
    for name in ["..", ".", "../etc", "sub/../..", "/etc", ""] {
        assert_eq!(g.lookup(ROOT, name).unwrap_err(), libc::EINVAL, "{name:?}");
    }
    let sub = g.lookup(ROOT, "sub").unwrap();
    assert_eq!(g.lookup(sub.nodeid, "..").unwrap_err(), libc::EINVAL);
    let m = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    assert_eq!(
        g.call(MKDIR, ROOT, &cat(&[m.as_slice(), &c("../escaped")]))
            .unwrap_err(),
        libc::EINVAL
    );
    assert!(!dir.path().parent().unwrap().join("escaped").exists());
}

#[test]
fn symlinks_are_not_followed_on_the_host() {
    let dir = share();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"host secret").unwrap();
    symlink("/etc", dir.path().join("evil")).unwrap();
    symlink("../../..", dir.path().join("evil2")).unwrap();
    symlink(outside.path(), dir.path().join("evil3")).unwrap();
    symlink(outside.path().join("planted"), dir.path().join("dangling")).unwrap();
    let etc_ino = std::fs::metadata("/etc").unwrap().ino();

    let mem = memory();
    let mut g = Guest::new(&mem, dir.path());
    g.init();
    for (name, target) in [
        ("evil", "/etc".to_owned()),
        ("evil2", "../../..".to_owned()),
        ("evil3", outside.path().to_str().unwrap().to_owned()),
    ] {
        // LOOKUP returns the link itself...
        let e = g.lookup(ROOT, name).unwrap();
        assert!(is_lnk(e.attr.mode), "{name}");
        assert_ne!(e.attr.ino, etc_ino);
        // ...whose target the guest reads and resolves on its own side.
        assert_eq!(g.call(READLINK, e.nodeid, &[]).unwrap(), target.as_bytes());
        // Nothing resolves through it on the host.
        for inner in ["passwd", "secret", "etc"] {
            assert_eq!(g.lookup(e.nodeid, inner).unwrap_err(), libc::ENOTDIR);
        }
        let od = OpenIn {
            flags: libc::O_RDONLY as u32 | libc::O_DIRECTORY as u32,
            fuse_flags: 0,
        };
        assert!(g.call(OPENDIR, e.nodeid, od.as_slice()).is_err());
        assert!(g.open(e.nodeid, libc::O_RDONLY).is_err());
        assert!(g.open(e.nodeid, libc::O_RDWR | libc::O_TRUNC).is_err());
        // CREATE over the link opens nothing behind it.
        assert!(g
            .create(ROOT, name, libc::O_RDWR | libc::O_CREAT, 0o100644)
            .is_err());
        // O_PATH would make the host ignore O_EXCL/O_NOFOLLOW and follow the link.
        assert_eq!(
            g.create(ROOT, name, libc::O_PATH | libc::O_CREAT, 0o100644)
                .unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(g.open(e.nodeid, libc::O_PATH).unwrap_err(), libc::EINVAL);
    }
    // A dangling link to a path outside: CREATE must not make the target.
    assert!(g
        .create(ROOT, "dangling", libc::O_WRONLY | libc::O_CREAT, 0o100644)
        .is_err());
    assert!(!outside.path().join("planted").exists());
    assert_eq!(
        std::fs::read(outside.path().join("secret")).unwrap(),
        b"host secret"
    );
}

#[test]
fn xattrs_handles_and_unknown_nodes_are_refused() {
    let dir = share();
    let mem = memory();
    let mut g = Guest::new(&mem, dir.path());
    g.init();
    let gx = GetxattrIn {
        size: 256,
        padding: 0,
    };
    for name in ["user.x", "security.selinux", "trusted.overlay.opaque"] {
        assert_eq!(
            g.call(GETXATTR, ROOT, &cat(&[gx.as_slice(), &c(name)]))
                .unwrap_err(),
            libc::ENOSYS
        );
    }
    assert_eq!(
        g.call(LISTXATTR, ROOT, gx.as_slice()).unwrap_err(),
        libc::ENOSYS
    );
    let sx = SetxattrIn { size: 1, flags: 0 };
    assert_eq!(
        g.call(
            SETXATTR,
            ROOT,
            &cat(&[sx.as_slice(), &c("trusted.x"), b"1"])
        )
        .unwrap_err(),
        libc::ENOSYS
    );

    // Node ids and file handles the guest was never given are unknown.
    let a = GetattrIn::default();
    assert!(g.call(GETATTR, 999, a.as_slice()).is_err());
    assert!(g.open(0xdead_beef, libc::O_RDONLY).is_err());
    let f = g.lookup(ROOT, "hello.txt").unwrap();
    let fh = g.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(f.nodeid, fh + 100, 10).unwrap_err(), libc::EBADF);
    // A handle belongs to its inode: not usable through another node id.
    let sub = g.lookup(ROOT, "sub").unwrap();
    assert_eq!(g.read(sub.nodeid, fh, 10).unwrap_err(), libc::EBADF);
    // ioctl is not served (the server reports ENOSYS as ENOTTY, as for any
    // ioctl a file does not know).
    let ioctl = [0u8; 32];
    assert_eq!(g.call(IOCTL, f.nodeid, &ioctl).unwrap_err(), libc::ENOTTY);
    // Unknown opcodes get ENOSYS.
    assert_eq!(g.call(9999, ROOT, &[]).unwrap_err(), libc::ENOSYS);
}

#[test]
fn lying_lengths_get_error_replies() {
    let dir = share();
    let mem = memory();
    let mut g = Guest::new(&mem, dir.path());
    g.init();

    let reply_errno = |reply: &[u8]| -> i32 {
        assert_eq!(reply.len(), OUT_HEADER_LEN);
        -OutHeader::from_slice(reply).unwrap().error
    };
    // `len` claims more than the chain holds.
    let mut h = g.header(LOOKUP, ROOT, 10);
    h.len = 4000;
    let r = g.raw(h, &c("hello.txt"), RESP_LEN);
    assert_eq!(reply_errno(&r), libc::EINVAL);
    // `len` shorter than the header itself.
    let mut h = g.header(LOOKUP, ROOT, 10);
    h.len = 8;
    let r = g.raw(h, &c("hello.txt"), RESP_LEN);
    assert_eq!(reply_errno(&r), libc::EINVAL);
    // `len` beyond any message size.
    let mut h = g.header(LOOKUP, ROOT, 10);
    h.len = u32::MAX;
    let r = g.raw(h, &c("hello.txt"), RESP_LEN);
    assert_eq!(reply_errno(&r), libc::ENOMEM);
    // A name without its NUL.
    let h = g.header(LOOKUP, ROOT, 5);
    let r = g.raw(h, b"hello", RESP_LEN);
    assert_eq!(reply_errno(&r), libc::EINVAL);
    // A READ whose body is cut short.
    let h = g.header(READ, ROOT, 8);
    let r = g.raw(h, &[0u8; 8], RESP_LEN);
    assert_eq!(reply_errno(&r), libc::EINVAL);
    // A WRITE claiming more data than it carries.
    let f = g.lookup(ROOT, "hello.txt").unwrap();
    let fh = g.open(f.nodeid, libc::O_RDWR).unwrap();
    let w = WriteIn {
        fh,
        offset: 0,
        size: 1 << 20,
        ..Default::default()
    };
    let body = cat(&[w.as_slice(), b"xx"]);
    let h = g.header(WRITE, f.nodeid, body.len());
    // The server writes what the chain really carries, nothing more.
    let r = g.raw(h, &body, RESP_LEN);
    let out = OutHeader::from_slice(&r[..OUT_HEADER_LEN]).unwrap();
    if out.error == 0 {
        let w = WriteOut::from_slice(&r[OUT_HEADER_LEN..]).unwrap();
        assert!(w.size <= 2, "{}", w.size);
    }
    let content = std::fs::read(dir.path().join("hello.txt")).unwrap();
    assert_eq!(content.len(), 11);
    assert_eq!(&content[2..], b"llo world");
    // A READ asking for more than the reply buffer holds.
    let h = g.header(READ, f.nodeid, std::mem::size_of::<ReadIn>());
    let rd = ReadIn {
        fh,
        size: 1 << 20,
        ..Default::default()
    };
    let r = g.raw(h, rd.as_slice(), 24);
    assert!(r.len() <= 24);
    // A reply buffer too small for any reply: the chain comes back empty.
    let h = g.header(LOOKUP, ROOT, 10);
    assert!(g.raw(h, &c("hello.txt"), 8).is_empty());
    // No reply buffer at all.
    let h = g.header(LOOKUP, ROOT, 10);
    assert!(g.raw(h, &c("hello.txt"), 0).is_empty());

    // After all that the device still works.
    assert!(!g.irq.needs_reset());
    assert_eq!(g.lookup(ROOT, "hello.txt").unwrap().attr.size, 11);
}

#[test]
fn malformed_chains_need_reset() {
    let dir = share();
    let mem = memory();

    // A header cut short: fewer readable bytes than a fuse_in_header.
    let mut g = Guest::new(&mem, dir.path());
    mem.write_slice(&[0u8; 20], GuestAddress(REQ)).unwrap();
    let used = g.send(
        1,
        &[desc(REQ, 20, false, Some(1)), desc(RESP, 64, true, None)],
    );
    assert_eq!(used, None);
    assert!(g.irq.needs_reset());
    // A broken device ignores further notifications until reset...
    assert_eq!(g.send(1, &[desc(REQ, 64, false, None)]), None);
    // ...and works again after one, with a fresh INIT.
    g.dev.reset();
    g.irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    g.queues = [
        MockSplitQueue::create(&mem, GuestAddress(0x1000), 16),
        MockSplitQueue::create(&mem, GuestAddress(0x4000), 16),
    ];
    g.activate();
    g.init();
    assert!(g.lookup(ROOT, "hello.txt").is_ok());

    // Only writable buffers.
    drop(g);
    let mut g = Guest::new(&mem, dir.path());
    assert_eq!(g.send(1, &[desc(RESP, 64, true, None)]), None);
    assert!(g.irq.needs_reset());

    // A zero-length buffer, and one outside guest memory.
    drop(g);
    let mut g = Guest::new(&mem, dir.path());
    assert_eq!(g.send(1, &[desc(REQ, 0, false, None)]), None);
    assert!(g.irq.needs_reset());
    drop(g);
    let mut g = Guest::new(&mem, dir.path());
    assert_eq!(g.send(1, &[desc(u64::MAX - 8, 64, false, None)]), None);
    assert!(g.irq.needs_reset());

    // Readable after writable.
    drop(g);
    let mut g = Guest::new(&mem, dir.path());
    assert_eq!(
        g.send(
            1,
            &[desc(RESP, 64, true, Some(1)), desc(REQ, 64, false, None)]
        ),
        None
    );
    assert!(g.irq.needs_reset());

    // More than the device accepts in one chain.
    drop(g);
    let mut g = Guest::new(&mem, dir.path());
    let big = (MAX_CHAIN_BYTES / 2 + 1) as u32;
    assert_eq!(
        g.send(
            1,
            &[desc(REQ, big, false, Some(1)), desc(REQ, big, true, None)]
        ),
        None
    );
    assert!(g.irq.needs_reset());

    // A loop.
    drop(g);
    let mut g = Guest::new(&mem, dir.path());
    assert_eq!(
        g.send(
            1,
            &[desc(REQ, 64, false, Some(1)), desc(RESP, 64, true, Some(0))]
        ),
        None
    );
    assert!(g.irq.needs_reset());
}

#[test]
fn the_share_roots_attributes_are_the_hosts() {
    let dir = share();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o751)).unwrap();
    let before = std::fs::metadata(dir.path()).unwrap();
    let mem = memory();
    let mut g = Guest::new(&mem, dir.path());
    g.init();
    // FATTR_* (include/uapi/linux/fuse.h).
    let (mode, uid, gid, size, atime, mtime, fh, atime_now, mtime_now, ctime) =
        (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024);
    for valid in [
        mode,
        uid,
        gid,
        uid | gid,
        size,
        atime,
        mtime,
        atime_now | mtime_now,
        ctime,
        mode | fh,
    ] {
        let a = SetattrIn {
            valid,
            mode: libc::S_IFDIR | 0o777,
            uid: 1234,
            gid: 1234,
            atime: 1,
            mtime: 1,
            ..Default::default()
        };
        assert_eq!(g.setattr(ROOT, a).unwrap_err(), libc::EPERM, "{valid:#x}");
    }
    let after = std::fs::metadata(dir.path()).unwrap();
    assert_eq!(after.permissions().mode(), before.permissions().mode());
    assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
    assert_eq!(after.mtime(), before.mtime());
    // A SETATTR that changes nothing is no refusal; the root stays readable.
    g.setattr(ROOT, SetattrIn::default()).unwrap();
    // Everything below the root is the guest's.
    let f = g.lookup(ROOT, "hello.txt").unwrap();
    let a = SetattrIn {
        valid: mode,
        mode: libc::S_IFREG | 0o600,
        ..Default::default()
    };
    assert_eq!(g.setattr(f.nodeid, a).unwrap().attr.mode & 0o777, 0o600);
    let sub = g.lookup(ROOT, "sub").unwrap();
    let a = SetattrIn {
        valid: mode,
        mode: libc::S_IFDIR | 0o700,
        ..Default::default()
    };
    g.setattr(sub.nodeid, a).unwrap();
    // The root has no name to unlink, remove, rename or link it by.
    for op in [UNLINK, RMDIR] {
        for name in [".", "..", ""] {
            assert_eq!(g.call(op, ROOT, &c(name)).unwrap_err(), libc::EINVAL);
        }
    }
    let r = RenameIn { newdir: sub.nodeid };
    assert_eq!(
        g.call(RENAME, ROOT, &cat(&[r.as_slice(), &c("."), &c("moved")]))
            .unwrap_err(),
        libc::EINVAL
    );
    let l = LinkIn { oldnodeid: ROOT };
    assert_eq!(
        g.call(LINK, sub.nodeid, &cat(&[l.as_slice(), &c("root")]))
            .unwrap_err(),
        libc::EPERM
    );
    assert!(dir.path().join("hello.txt").exists());
    assert!(!dir.path().join("sub/moved").exists() && !dir.path().join("sub/root").exists());
}

#[test]
fn inodes_past_the_limit_get_enfile_and_forget_gives_them_back() {
    let dir = share();
    for i in 0..4 {
        std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
    }
    let mem = memory();
    let mut g = Guest::with_limits(&mem, dir.path(), 3, 100);
    g.init();
    assert_eq!(g.dev.held().unwrap(), (0, 0));
    let f0 = g.lookup(ROOT, "f0").unwrap();
    let sub = g.lookup(ROOT, "sub").unwrap();
    let inner = g.lookup(sub.nodeid, "inner").unwrap();
    assert_eq!(g.dev.held().unwrap(), (3, 0));
    // At the limit: what the guest holds still resolves (no new descriptor)...
    for _ in 0..10 {
        assert_eq!(g.lookup(ROOT, "f0").unwrap().nodeid, f0.nodeid);
    }
    // ...a new inode does not, and nothing is made on the host.
    for name in ["f1", "f2", "hello.txt"] {
        assert_eq!(g.lookup(ROOT, name).unwrap_err(), libc::ENFILE, "{name}");
    }
    assert_eq!(g.mkdir(ROOT, "newdir").unwrap_err(), libc::ENFILE);
    assert_eq!(
        g.create(ROOT, "new", libc::O_RDWR | libc::O_CREAT, 0o100644)
            .unwrap_err(),
        libc::ENFILE
    );
    let l = LinkIn {
        oldnodeid: f0.nodeid,
    };
    assert_eq!(
        g.call(LINK, ROOT, &cat(&[l.as_slice(), &c("f0link")]))
            .unwrap_err(),
        libc::ENFILE
    );
    let s = cat(&[&c("lnk"), &c("target")]);
    assert_eq!(g.call(SYMLINK, ROOT, &s).unwrap_err(), libc::ENFILE);
    for p in ["newdir", "new", "f0link", "lnk"] {
        assert!(
            std::fs::symlink_metadata(dir.path().join(p)).is_err(),
            "{p}"
        );
    }
    assert_eq!(g.dev.held().unwrap(), (3, 0));
    // f0 was looked up 11 times: 10 FORGETs leave it held...
    g.forget(f0.nodeid, 10);
    assert_eq!(g.lookup(ROOT, "f1").unwrap_err(), libc::ENFILE);
    // ...the 11th gives its room back.
    g.forget(f0.nodeid, 1);
    assert_eq!(g.dev.held().unwrap(), (2, 0));
    let f1 = g.lookup(ROOT, "f1").unwrap();
    assert_eq!(g.lookup(ROOT, "f2").unwrap_err(), libc::ENFILE);
    // BATCH_FORGET too; forgetting what the guest never held changes nothing.
    g.batch_forget(&[(inner.nodeid, 1), (sub.nodeid, 1), (999, 5), (ROOT, 9)]);
    assert_eq!(g.dev.held().unwrap(), (1, 0));
    g.mkdir(ROOT, "newdir").unwrap();
    g.lookup(ROOT, "f2").unwrap();
    assert_eq!(g.lookup(ROOT, "f3").unwrap_err(), libc::ENFILE);
    g.forget(f1.nodeid, u64::MAX);
    g.lookup(ROOT, "f3").unwrap();
    assert_eq!(g.dev.held().unwrap(), (3, 0));
    // A device reset drops everything the previous driver held.
    g.dev.reset();
    g.irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    g.queues = [
        MockSplitQueue::create(&mem, GuestAddress(0x1000), 16),
        MockSplitQueue::create(&mem, GuestAddress(0x4000), 16),
    ];
    g.activate();
    g.init();
    assert_eq!(g.dev.held().unwrap(), (0, 0));
    g.lookup(ROOT, "hello.txt").unwrap();
}

#[test]
fn open_files_past_the_limit_get_enfile_and_release_gives_them_back() {
    let dir = share();
    let mem = memory();
    let mut g = Guest::with_limits(&mem, dir.path(), 100, 2);
    g.init();
    let f = g.lookup(ROOT, "hello.txt").unwrap();
    let sub = g.lookup(ROOT, "sub").unwrap();
    let a = g.open(f.nodeid, libc::O_RDONLY).unwrap();
    let d = g.opendir(sub.nodeid).unwrap();
    assert_eq!(g.dev.held().unwrap(), (2, 2));
    assert_eq!(g.open(f.nodeid, libc::O_RDONLY).unwrap_err(), libc::ENFILE);
    assert_eq!(g.opendir(ROOT).unwrap_err(), libc::ENFILE);
    assert_eq!(
        g.create(ROOT, "new", libc::O_RDWR | libc::O_CREAT, 0o100644)
            .unwrap_err(),
        libc::ENFILE
    );
    assert!(!dir.path().join("new").exists());
    // A RELEASE of a handle through the wrong inode releases nothing.
    assert_eq!(g.release(sub.nodeid, a).unwrap_err(), libc::EBADF);
    assert_eq!(g.open(f.nodeid, libc::O_RDONLY).unwrap_err(), libc::ENFILE);
    g.release(f.nodeid, a).unwrap();
    assert_eq!(g.dev.held().unwrap(), (2, 1));
    let b = g.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(f.nodeid, b, 100).unwrap(), b"hello world");
    assert_eq!(g.opendir(ROOT).unwrap_err(), libc::ENFILE);
    let rel = ReleaseIn {
        fh: d,
        ..Default::default()
    };
    g.call(RELEASEDIR, sub.nodeid, rel.as_slice()).unwrap();
    let (e, o) = g
        .create(ROOT, "new", libc::O_RDWR | libc::O_CREAT, 0o100644)
        .unwrap();
    assert_eq!(g.dev.held().unwrap(), (3, 2));
    g.release(e.nodeid, o.fh).unwrap();
    g.release(f.nodeid, b).unwrap();
    assert_eq!(g.dev.held().unwrap(), (3, 0));
}

#[test]
fn create_of_an_existing_name_is_booked_and_leaks_nothing() {
    let dir = share();
    let mem = memory();
    let mut g = Guest::with_limits(&mem, dir.path(), 100, 100);
    g.init();
    // Without O_EXCL an existing file is opened (with O_TRUNC, truncated).
    let (e, o) = g
        .create(ROOT, "hello.txt", libc::O_RDWR | libc::O_CREAT, 0o100644)
        .unwrap();
    assert_eq!(e.attr.size, 11);
    assert_eq!(g.read(e.nodeid, o.fh, 100).unwrap(), b"hello world");
    assert_eq!(g.dev.held().unwrap(), (1, 1));
    // With O_EXCL it is EEXIST, and nothing is held.
    assert_eq!(
        g.create(
            ROOT,
            "hello.txt",
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            0o100644
        )
        .unwrap_err(),
        libc::EEXIST
    );
    // An existing directory cannot be opened for writing: the error, and the
    // lookup taken on the way is given back (the passthrough alone kept it).
    for _ in 0..20 {
        assert_eq!(
            g.create(ROOT, "sub", libc::O_WRONLY | libc::O_CREAT, 0o100644)
                .unwrap_err(),
            libc::EISDIR
        );
    }
    assert_eq!(g.dev.held().unwrap(), (1, 1));
    g.release(e.nodeid, o.fh).unwrap();
    g.forget(e.nodeid, 1);
    assert_eq!(g.dev.held().unwrap(), (0, 0));
}

/// (name, node id) of each entry in a READDIRPLUS reply.
fn direntplus(mut p: &[u8]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let entry = std::mem::size_of::<EntryOut>();
    while p.len() >= entry + 24 {
        let e = EntryOut::from_slice(&p[..entry]).unwrap();
        let d = &p[entry..];
        let namelen = u32::from_le_bytes(d[16..20].try_into().unwrap()) as usize;
        let name = String::from_utf8_lossy(&d[24..24 + namelen]).into_owned();
        out.push((name, e.nodeid));
        let len = entry + (24 + namelen).next_multiple_of(8);
        p = &p[len.min(p.len())..];
    }
    out
}

#[test]
fn readdirplus_past_the_inode_limit_lists_names_without_node_ids() {
    let dir = share();
    let mem = memory();
    let mut g = Guest::with_limits(&mem, dir.path(), 1, 10);
    g.init();
    let fh = g.opendir(ROOT).unwrap();
    let r = ReadIn {
        fh,
        size: 4096,
        ..Default::default()
    };
    let list = direntplus(&g.call(READDIRPLUS, ROOT, r.as_slice()).unwrap());
    let mut names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    // (The passthrough leaves out "." and "..".)
    assert_eq!(names, ["hello.txt", "sub"]);
    // One of the two children got a node id (the limit), the other none.
    let ids: Vec<u64> = list
        .iter()
        .filter(|(n, _)| n == "hello.txt" || n == "sub")
        .map(|(_, id)| *id)
        .collect();
    assert_eq!(ids.iter().filter(|id| **id != 0).count(), 1, "{list:?}");
    assert_eq!(g.dev.held().unwrap(), (1, 1));
    let held = *ids.iter().find(|id| **id != 0).unwrap();
    g.forget(held, 1);
    assert_eq!(g.dev.held().unwrap(), (0, 1));
}

#[test]
fn the_descriptor_budget_follows_rlimit_nofile() {
    // A shell's 1024: half kept back, the rest three to one.
    assert_eq!(
        FsLimits::from_nofile(1024),
        FsLimits {
            inodes: 384,
            handles: 128
        }
    );
    assert_eq!(
        FsLimits::from_nofile(65536),
        FsLimits {
            inodes: 48384,
            handles: 16128
        }
    );
    // containerd's 1048576: the ceilings.
    assert_eq!(
        FsLimits::from_nofile(1 << 20),
        FsLimits {
            inodes: MAX_INODES,
            handles: MAX_HANDLES
        }
    );
    let l = FsLimits::from_nofile(u64::MAX);
    assert_eq!((l.inodes, l.handles), (MAX_INODES, MAX_HANDLES));
    assert_eq!(
        FsLimits::from_nofile(0),
        FsLimits {
            inodes: 0,
            handles: 0
        }
    );
    // The default comes from this process's limit.
    let dir = share();
    let dev = Fs::new("t", dir.path(), FsConfig::default()).unwrap();
    assert!(dev.limits().unwrap().inodes > 0 && dev.limits().unwrap().inodes <= MAX_INODES);
}

#[test]
fn the_file_system_process_serves_what_the_device_would() {
    let dir = share();
    symlink("/etc", dir.path().join("evil")).unwrap();
    let mem = memory();
    let (mut g, served) = Guest::remote(&mem, dir.path());
    assert_eq!(g.init().max_write, 1 << 20);
    let e = g.lookup(ROOT, "hello.txt").unwrap();
    assert_eq!(e.attr.size, 11);
    let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(e.nodeid, fh, 100).unwrap(), b"hello world");
    g.release(e.nodeid, fh).unwrap();
    // Files made through it land in the share, as the guest's.
    let (made, out) = g
        .create(ROOT, "made", libc::O_CREAT | libc::O_RDWR, 0o640)
        .unwrap();
    let w = WriteIn {
        fh: out.fh,
        size: 5,
        ..Default::default()
    };
    let wo: WriteOut = g
        .obj(WRITE, made.nodeid, &cat(&[w.as_slice(), b"bytes"]))
        .unwrap();
    assert_eq!(wo.size, 5);
    assert_eq!(std::fs::read(dir.path().join("made")).unwrap(), b"bytes");
    // The jail's rules hold there too: a symlink is never followed.
    let evil = g.lookup(ROOT, "evil").unwrap();
    assert!(is_lnk(evil.attr.mode));
    assert_eq!(g.lookup(evil.nodeid, "passwd").unwrap_err(), libc::ENOTDIR);
    assert_eq!(g.lookup(ROOT, "..").unwrap_err(), libc::EINVAL);
    // A FORGET wants no reply and gets none (the helper checks).
    g.forget(e.nodeid, 1);
    // A request shorter than a FUSE header breaks the device, as in process.
    mem.write_slice(&[0u8; 8], GuestAddress(REQ)).unwrap();
    g.send(
        1,
        &[desc(REQ, 8, false, Some(1)), desc(RESP, 64, true, None)],
    );
    assert!(g.irq.needs_reset());
    // The VMM gone, the process ends.
    drop(g);
    assert_eq!(served.join().unwrap(), "eof");
}

#[test]
fn the_file_system_process_ends_on_a_frame_no_vmm_sends() {
    use std::io::Write;
    let dir = share();
    for (frame, why) in [
        (
            [9u32, 0, 0].map(u32::to_le_bytes).concat(),
            "a frame of kind 9",
        ),
        (
            [remote::KIND_REQUEST, 0, 64].map(u32::to_le_bytes).concat(),
            "a request of 0 + 64 bytes",
        ),
        (
            [remote::KIND_REQUEST, 3 << 20, 2 << 20]
                .map(u32::to_le_bytes)
                .concat(),
            "a request of 3145728 + 2097152 bytes",
        ),
    ] {
        let (mut vmm, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let (local, _) = Local::new(dir.path(), FsConfig::default()).unwrap();
        let served = std::thread::spawn(move || {
            remote::serve(
                std::fs::File::from(std::os::fd::OwnedFd::from(server)),
                &local,
            )
            .unwrap_err()
            .to_string()
        });
        vmm.write_all(&frame).unwrap();
        let e = served.join().unwrap();
        assert!(e.contains(why), "{e}");
    }
}

#[test]
fn a_reset_drops_what_the_driver_held_in_the_file_system_process() {
    let dir = share();
    let mem = memory();
    let (vmm, server) = std::os::unix::net::UnixStream::pair().unwrap();
    let local = Arc::new(Local::new(dir.path(), FsConfig::default()).unwrap().0);
    let theirs = local.clone();
    let served = std::thread::spawn(move || {
        remote::serve(
            std::fs::File::from(std::os::fd::OwnedFd::from(server)),
            &theirs,
        )
        .is_ok()
    });
    let client = remote::Client::new(vmm).unwrap();
    // A driver that looked two files up, then a reset and a new driver.
    let dev = Fs::remote("share", dir.path(), client).unwrap();
    let mut g = Guest::with_device(&mem, dev);
    g.init();
    g.lookup(ROOT, "hello.txt").unwrap();
    g.lookup(ROOT, "sub").unwrap();
    assert_eq!(local.held(), (2, 0));
    g.dev.reset();
    g.activate();
    // The new driver's first request takes the DESTROY before it.
    g.init();
    assert_eq!(local.held(), (0, 0));
    g.lookup(ROOT, "hello.txt").unwrap();
    assert_eq!(local.held(), (1, 0));
    drop(g);
    assert!(served.join().unwrap());
}

/// Requests wait in the socket, not in a lock: many chains are sent
/// before the first answer, a slow answer holds up nothing but itself,
/// and a snapshot taken meanwhile gives the unanswered chains back to
/// the ring.
#[test]
fn requests_are_pipelined_and_a_snapshot_gives_back_what_is_in_flight() {
    use std::io::{Read, Write};
    let dir = share();
    let mem = memory();
    let (vmm, mut server) = std::os::unix::net::UnixStream::pair().unwrap();
    let dev = Fs::remote("share", dir.path(), remote::Client::new(vmm).unwrap()).unwrap();
    let mut g = Guest::with_device(&mem, dev);
    // Three GETATTRs published at once (heads 0, 2, 4), nobody answering yet.
    let vq = &g.queues[1];
    for i in 0..3u16 {
        let h = InHeader {
            len: (IN_HEADER_LEN + std::mem::size_of::<GetattrIn>()) as u32,
            opcode: GETATTR,
            unique: 100 + u64::from(i),
            nodeid: ROOT,
            ..Default::default()
        };
        let req = cat(&[h.as_slice(), GetattrIn::default().as_slice()]);
        let at = REQ + 0x100 * u64::from(i);
        mem.write_slice(&req, GuestAddress(at)).unwrap();
        let table = vq.desc_table();
        table
            .store(2 * i, desc(at, req.len() as u32, false, Some(2 * i + 1)))
            .unwrap();
        table
            .store(
                2 * i + 1,
                desc(RESP + 0x1000 * u64::from(i), 0x1000, true, None),
            )
            .unwrap();
        vq.avail()
            .ring()
            .ref_at(usize::from(i))
            .unwrap()
            .store(2 * i);
    }
    vq.avail().idx().store(3);
    // process_queue returns at once: the three frames are on the line.
    g.dev.process_queue(1);
    assert_eq!(vq.used().idx().load(), 0);
    server
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut frames = Vec::new();
    for _ in 0..3 {
        let mut h = [0u8; 12];
        server.read_exact(&mut h).unwrap();
        let readable = u32::from_le_bytes(h[4..8].try_into().unwrap());
        assert_eq!(
            u32::from_le_bytes(h[0..4].try_into().unwrap()),
            remote::KIND_REQUEST
        );
        assert_eq!(u32::from_le_bytes(h[8..12].try_into().unwrap()), 0x1000);
        let mut body = vec![0u8; readable as usize];
        server.read_exact(&mut body).unwrap();
        frames.push(body);
    }
    // A snapshot now hands all three back to the ring.
    let states = g.dev.queue_states().unwrap();
    assert_eq!(states[1].next_avail, 0);
    // The first answer completes the first chain only.
    let out = OutHeader {
        len: OUT_HEADER_LEN as u32,
        error: -libc::EIO,
        unique: 100,
    };
    let mut reply = [remote::STATUS_OK, OUT_HEADER_LEN as u32]
        .map(u32::to_le_bytes)
        .concat();
    reply.extend_from_slice(out.as_slice());
    server.write_all(&reply).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while vq.used().idx().load() == 0 && std::time::Instant::now() < deadline {
        g.dev.pump();
    }
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(g.dev.queue_states().unwrap()[1].next_avail, 1);
    let mut got = [0u8; OUT_HEADER_LEN];
    mem.read_slice(&mut got, GuestAddress(RESP)).unwrap();
    assert_eq!(OutHeader::from_slice(&got).unwrap().unique, 100);
    // An answer larger than the room asked for breaks the device.
    let mut big = [remote::STATUS_OK, 0x1001].map(u32::to_le_bytes).concat();
    big.extend_from_slice(&[0u8; 0x1001]);
    server.write_all(&big).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !g.irq.needs_reset() && std::time::Instant::now() < deadline {
        g.dev.pump();
    }
    assert!(g.irq.needs_reset());
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(frames.len(), 3);
}
