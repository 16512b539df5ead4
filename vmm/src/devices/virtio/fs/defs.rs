//! Constants of the virtio-fs device (virtio 1.2, section 5.11) and the limits we
//! put on guest requests.

/// Device ID of a file system device (virtio 1.2, 5 Device Types).
pub const TYPE_FS: u32 = 26;

/// Bytes of the `tag` field in the configuration space (5.11.4): UTF-8, NUL padded,
/// not NUL terminated when all 36 bytes are used.
pub const TAG_LEN: usize = 36;
/// The configuration space: `tag[36]` then `num_request_queues` (le32).
pub const CONFIG_LEN: usize = TAG_LEN + 4;

/// Queue 0 carries FORGET, BATCH_FORGET and INTERRUPT (5.11.2).
pub const HIPRIO_QUEUE: usize = 0;
/// Queue 1 is the (single) request queue.
pub const REQUEST_QUEUE: usize = 1;
/// Request queues offered; one, as all requests are served by one thread.
pub const NUM_REQUEST_QUEUES: u32 = 1;

/// Queue sizes: the hiprio queue only sees small forget messages; the request queue
/// is sized like other virtio-fs devices (Cloud Hypervisor uses 1024).
pub const HIPRIO_QUEUE_SIZE: u16 = 128;
pub const REQUEST_QUEUE_SIZE: u16 = 1024;

/// The longest chain (readable and writable bytes summed) a request may use. The
/// FUSE server caps one message at 1 MiB of data plus a 4 KiB header
/// (`fuse_backend_rs::api::server::MAX_BUFFER_SIZE`), and a request carries a message
/// one way and the reply the other; anything longer is a malformed chain. This also
/// bounds what a READDIR makes the server allocate (it sizes its buffer from the
/// writable space).
pub const MAX_CHAIN_BYTES: u64 = 4 << 20;

/// `struct fuse_in_header` and `struct fuse_out_header` (include/uapi/linux/fuse.h).
pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;

/// FUSE opcodes that never get a reply (include/uapi/linux/fuse.h).
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_BATCH_FORGET: u32 = 42;

/// Descriptors kept back from the share's budget for everything else husk-vmm
/// holds: vsock's 256 guest streams and 256 host clients
/// (`vsock::defs::{MAX_GUEST_CONNS, MAX_HOST_CONNS}`) and their pending
/// connects, the control socket and its clients, KVM and eventfds, the
/// console and log files. At most half the limit when the limit is small.
pub const RESERVED_FDS: u64 = 1024;

/// Ceilings on what one guest holds open through its share, whatever the
/// descriptor limit: each inode pins an `O_PATH` file, its dentry and inode in
/// the host kernel and an entry in the passthrough (about 1.5 KiB together),
/// so 256 Ki inodes cost a host some 400 MiB at worst. That is more than a
/// guest's own inode cache keeps for a large container image (a node or
/// python image has 30 to 100 thousand files); open files are fewer.
pub const MAX_INODES: usize = 1 << 18;
pub const MAX_HANDLES: usize = 1 << 16;
