//! virtio-vsock constants (virtio 1.2, 5.10; include/uapi/linux/virtio_vsock.h).

/// The host's CID.
pub const HOST_CID: u64 = 2;

/// Queue indices and size.
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_vsock_event`'s only id (virtio 1.2, 5.10.6.4): the
/// device's transport was reset; the driver drops its connections and
/// re-reads the guest CID.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Socket type: stream (the only one offered; no SEQPACKET feature).
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The largest payload in one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// What each connection advertises as its receive buffer: bytes the guest may
/// have in flight towards the host stream.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Send a credit update once this much has been forwarded unannounced.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// Host-side ports for host-initiated connections start here (above the
/// well-known range, so they never collide with a guest's listening port).
pub const FIRST_HOST_PORT: u32 = 1 << 30;

/// The longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;

/// How long a host-initiated connection waits, from the `CONNECT <port>` line
/// to the guest's RESPONSE (or RST), before the host client is dropped and the
/// guest sent a RST. Also bounds how long a host client may take to send the
/// line itself. The agent answers in microseconds; 5 s is far beyond a busy
/// guest, and short enough that a wedged guest surfaces as a failed connect
/// instead of a hung shim.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a stream the guest has closed may keep its host socket open to
/// write out guest data that was still buffered (the host reader being slow).
/// After it the rest is dropped (and logged): a host that never reads must not
/// pin the VMM's memory.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most control packets (RST, RESPONSE, credit updates...) queued for the guest
/// while it posts no RX buffers. Each guest TX packet can queue one, so past this
/// the TX queue is left unprocessed until the guest takes its replies: a guest
/// that floods REQUESTs without receiving cannot grow the VMM's memory.
pub const MAX_PENDING_CTRL: usize = 1024;

/// Rounds of TX-then-RX in one wake-up while TX is held back by
/// [`MAX_PENDING_CTRL`]; bounds the work a busy guest makes one event cost.
pub const MAX_PUMP_ROUNDS: usize = 64;

/// Most guest-initiated streams open at once (established or draining). Each
/// holds a host socket, so a guest that opens connections in a loop would
/// otherwise spend husk-vmm's descriptors (1024 by default) and, through the
/// host listeners it reaches, the runtime's. Past it a REQUEST gets a RST.
/// Firecracker and Cloud Hypervisor stop near 1023 total; this keeps the two
/// directions' sum well under the default fd limit.
pub const MAX_GUEST_CONNS: usize = 256;

/// Most host-initiated streams (including clients still sending their
/// `CONNECT` line) open at once. A budget of their own, so a guest flooding
/// REQUESTs never locks the runtime out of the agent's port. A client past
/// it is accepted and closed at once, which also empties the listener's
/// backlog instead of leaving it readable (a spin).
pub const MAX_HOST_CONNS: usize = 256;

/// How long the listener is left out of the epoll set after an accept failed
/// for want of descriptors (EMFILE, ENFILE): a level-triggered listener with
/// a client waiting would wake the event loop without end.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
