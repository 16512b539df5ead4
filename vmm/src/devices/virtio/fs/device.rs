//! The virtio-fs device state machine: queues in, FUSE messages to the jailed
//! passthrough server (in this process, or in husk-vmm's file-system process
//! through [`super::remote`]), replies out.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::DescriptorChain;
use vm_memory::ByteValued;

use super::defs::*;
use super::jail::{FsConfig, FsLimits, Jail};
use crate::devices::virtio::chain::{self, ChainError};
use crate::devices::virtio::defs::F_VERSION_1;
use crate::devices::virtio::state::DeviceState;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, EXTRA_EVENT_BASE,
};
use crate::memory::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events};

/// Why a share could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {tag:?} must be 1 to {TAG_LEN} bytes of UTF-8 without NUL")]
    BadTag { tag: String },
    #[error("shared directory {}: {source}", path.display())]
    SharedDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("shared directory {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    // fuse-backend-rs takes the root as a String.
    #[error("shared directory {} is not valid UTF-8", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("setting up the passthrough file system for {}: {source}", path.display())]
    Passthrough {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why the device stopped serving its queues (it then needs a reset).
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("request {head} has {len} readable bytes, less than a FUSE header")]
    ShortHeader { head: u16, len: u64 },
    #[error("request {head}: the descriptor table changed after validation")]
    Changed { head: u16 },
    #[error("request {head}: {source}")]
    Transport {
        head: u16,
        #[source]
        source: io::Error,
    },
    #[error("request {head}: the file-system process: {source}")]
    Remote {
        head: u16,
        #[source]
        source: io::Error,
    },
    #[error("request {head}: the file-system process found it malformed")]
    RemoteRefused { head: u16 },
}

/// The jailed passthrough and the FUSE server over it, in this process.
pub struct Local {
    /// The same file system the server holds, for `destroy` after a device reset.
    fs: Arc<Jail>,
    server: Server<Arc<Jail>>,
}

/// Who serves the device's FUSE requests.
enum Backend {
    Local(Local),
    /// husk-vmm's file-system process, over a socket ([`super::remote`]):
    /// the VMM that holds guest memory then needs no file-system rights.
    Remote(super::remote::Client),
}

/// virtio-fs sharing one host directory.
pub struct Fs {
    tag: String,
    shared_dir: PathBuf,
    config: [u8; CONFIG_LEN],
    backend: Backend,
    state: DeviceState,
    /// A device reset happened: inodes and handles from the previous driver are
    /// dropped before the next request. Not done in `reset` itself, which runs on
    /// the vCPU thread whose seccomp filter has no file system calls.
    stale: bool,
    sizes: [u16; 2],
}

impl Fs {
    /// A device that shares `shared_dir` under the mount tag `tag` (what the guest
    /// passes to `mount -t virtiofs TAG DIR`).
    ///
    /// `shared_dir` is resolved here, once, to its canonical path (a host-side
    /// symlink in the configured path is the operator's choice); from then on
    /// nothing under it is followed out of it. Call before seccomp is applied:
    /// this opens `/proc/self/fd` and `/proc/self/mountinfo`.
    pub fn new(tag: &str, shared_dir: &Path, cfg: FsConfig) -> Result<Fs, FsError> {
        check_tag(tag)?;
        let (local, canonical) = Local::new(shared_dir, cfg)?;
        tracing::info!(tag, dir = %canonical.display(), ?cfg, limits = ?local.fs.limits(), "virtio-fs share");
        Ok(Self::with_backend(tag, canonical, Backend::Local(local)))
    }

    /// A device whose requests `client`'s file-system process serves
    /// ([`super::remote::serve`]); `shared_dir` only names the share here.
    pub fn remote(
        tag: &str,
        shared_dir: &Path,
        client: super::remote::Client,
    ) -> Result<Fs, FsError> {
        check_tag(tag)?;
        tracing::info!(tag, dir = %shared_dir.display(), "virtio-fs share, served by the file-system process");
        Ok(Self::with_backend(
            tag,
            shared_dir.to_owned(),
            Backend::Remote(client),
        ))
    }

    fn with_backend(tag: &str, shared_dir: PathBuf, backend: Backend) -> Fs {
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        Fs {
            tag: tag.to_owned(),
            shared_dir,
            config,
            backend,
            state: DeviceState::new(),
            stale: false,
            sizes: [HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE],
        }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The canonical path of the shared directory.
    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }

    /// What the guest may hold open on the host through this share (`None`
    /// when the file-system process keeps the books).
    pub fn limits(&self) -> Option<FsLimits> {
        match &self.backend {
            Backend::Local(l) => Some(l.fs.limits()),
            Backend::Remote(_) => None,
        }
    }

    /// Inodes and open files the guest holds now (at most [`Fs::limits`]).
    pub fn held(&self) -> Option<(usize, usize)> {
        match &self.backend {
            Backend::Local(l) => Some(l.fs.held()),
            Backend::Remote(_) => None,
        }
    }
}

fn check_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
        return Err(FsError::BadTag {
            tag: tag.to_owned(),
        });
    }
    Ok(())
}

impl Local {
    /// The passthrough over `shared_dir`, resolved here, once, to its
    /// canonical path (a host-side symlink in the configured path is the
    /// operator's choice); from then on nothing under it is followed out of
    /// it. Opens `/proc/self/fd` and `/proc/self/mountinfo`: call it before
    /// seccomp is applied.
    pub fn new(shared_dir: &Path, cfg: FsConfig) -> Result<(Local, PathBuf), FsError> {
        let canonical = shared_dir
            .canonicalize()
            .map_err(|source| FsError::SharedDir {
                path: shared_dir.to_owned(),
                source,
            })?;
        let meta = std::fs::metadata(&canonical).map_err(|source| FsError::SharedDir {
            path: canonical.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(FsError::NotADirectory { path: canonical });
        }
        let root = canonical.to_str().ok_or_else(|| FsError::NotUtf8 {
            path: canonical.clone(),
        })?;
        let fs = Arc::new(Jail::new(root, cfg).map_err(|source| FsError::Passthrough {
            path: canonical.clone(),
            source,
        })?);
        Ok((
            Local {
                server: Server::new(fs.clone()),
                fs,
            },
            canonical,
        ))
    }

    pub fn limits(&self) -> FsLimits {
        self.fs.limits()
    }

    /// Inodes and open files the guest holds now.
    pub fn held(&self) -> (usize, usize) {
        self.fs.held()
    }

    /// The previous driver's inodes and open files go.
    pub(super) fn destroy(&self) {
        self.fs.destroy();
    }

    /// Serves one request; returns the bytes written into the chain.
    pub(super) fn handle(
        &self,
        c: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, RequestError> {
        // Every buffer inside guest memory, readable before writable, bounded
        // total, copied out of the descriptor table once.
        let req = chain::validate(c.clone(), mem, MAX_CHAIN_BYTES)?;
        let head = req.head();
        let (readable, writable) = (req.readable_len(), req.writable_len());
        if readable < IN_HEADER_LEN as u64 {
            return Err(RequestError::ShortHeader {
                head,
                len: readable,
            });
        }
        let transport = |e: fuse_backend_rs::transport::Error| RequestError::Transport {
            head,
            source: io::Error::other(e),
        };

        // Our own look at the header, from the validated chain: to know which
        // requests want no reply, and the `unique` to answer with when the
        // server gives up on a request.
        let mut in_header = InHeader::default();
        req.reader(mem).read_exact(in_header.as_mut_slice())?;

        // fuse-backend-rs's Reader and Writer can only be built from a
        // DescriptorChain, so this is the one place the table is walked again
        // (once each). Both copy their buffer list at construction and never
        // walk it after, and map each buffer inside guest memory themselves;
        // a guest that rewrote its table since `validate` is caught by the
        // lengths, which must be the validated ones.
        let reader = Reader::from_descriptor_chain(mem, c.clone()).map_err(transport)?;
        let writer = VirtioFsWriter::new(mem, c).map_err(transport)?;
        if reader.available_bytes() as u64 != readable
            || writer.available_bytes() as u64 != writable
        {
            return Err(RequestError::Changed { head });
        }

        let written = match self
            .server
            .handle_message(reader, Writer::from(writer), None, None)
        {
            // DESTROY writes its reply but reports 0 bytes.
            Ok(0) if in_header.opcode == FUSE_DESTROY && writable >= OUT_HEADER_LEN as u64 => {
                OUT_HEADER_LEN as u64
            }
            Ok(n) => n as u64,
            Err(e) => {
                // The server could not decode the request or write its reply (a
                // `len` that lies, a missing name, a reply buffer too small...).
                // Answer with an error so the guest's request does not hang.
                crate::debug_limited!(
                    error = %e,
                    opcode = in_header.opcode,
                    unique = in_header.unique,
                    "virtio-fs: malformed request"
                );
                let no_reply = matches!(
                    in_header.opcode,
                    FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT
                );
                if no_reply || writable < OUT_HEADER_LEN as u64 {
                    return Ok(0);
                }
                let errno = match e {
                    fuse_backend_rs::Error::DecodeMessage(_)
                    | fuse_backend_rs::Error::MissingParameter
                    | fuse_backend_rs::Error::InvalidCString(_)
                    | fuse_backend_rs::Error::InvalidHeaderLength
                    | fuse_backend_rs::Error::InvalidXattrSize(_) => libc::EINVAL,
                    _ => libc::EIO,
                };
                let out = OutHeader {
                    len: OUT_HEADER_LEN as u32,
                    error: -errno,
                    unique: in_header.unique,
                };
                req.writer(mem).write(out.as_slice())?;
                OUT_HEADER_LEN as u64
            }
        };
        // The server writes only into the chain, which MAX_CHAIN_BYTES bounds far
        // below u32::MAX.
        Ok(written.min(writable) as u32)
    }
}

impl Fs {
    /// Serves `index` in this process, one chain after another.
    fn serve_locally(&mut self, index: usize) -> Result<(), RequestError> {
        DeviceState::process(
            self,
            |d| &mut d.state,
            |dev, active| {
                let Backend::Local(local) = &dev.backend else {
                    return Ok(false);
                };
                let mut used_any = false;
                let (mem, queue) = (&active.mem, &mut active.queues[index]);
                while let Some(c) = chain::pop(queue, mem)? {
                    let head = c.head_index();
                    let len = local.handle(c, mem)?;
                    chain::add_used(queue, mem, head, len)?;
                    tracing::trace!(queue = index, head, len, "virtio-fs: request served");
                    used_any = true;
                }
                Ok(used_any)
            },
        )
    }

    /// Moves requests to the file-system process and answers back, as far
    /// as neither waits: new chains from both queues (while the line has
    /// room), queued frames out, replies in. Runs on a queue notification
    /// and whenever the socket is readable or writable again; never blocks,
    /// so the transport's lock (which a vCPU takes to notify) is held only
    /// for copies.
    fn relay(&mut self) -> Result<(), RequestError> {
        loop {
            let mut progress = false;
            if self.state.is_active() && !self.state.is_broken() {
                if self.stale {
                    self.stale = false;
                    if let Backend::Remote(c) = &mut self.backend {
                        c.submit_destroy()
                            .map_err(|source| RequestError::Remote { head: 0, source })?;
                    }
                }
                DeviceState::process(
                    self,
                    |d| &mut d.state,
                    |dev, active| {
                        let Backend::Remote(c) = &mut dev.backend else {
                            return Ok(false);
                        };
                        for (index, queue) in active.queues.iter_mut().enumerate() {
                            while c.has_room() {
                                let Some(chain) = chain::pop(queue, &active.mem)? else {
                                    break;
                                };
                                c.submit(index, chain, &active.mem)?;
                            }
                        }
                        Ok::<_, RequestError>(false)
                    },
                )?;
            }
            let Backend::Remote(c) = &mut self.backend else {
                return Ok(());
            };
            c.flush()
                .map_err(|source| RequestError::Remote { head: 0, source })?;
            let done = c.receive()?;
            if !done.is_empty() {
                progress = true;
                DeviceState::process(
                    self,
                    |d| &mut d.state,
                    |_, active| {
                        for d in done {
                            let head = d.chain.head();
                            let len = d.chain.writer(&active.mem).write(&d.data)?;
                            // At most the chain's room, which MAX_CHAIN_BYTES bounds.
                            let len = len as u32;
                            chain::add_used(&mut active.queues[d.queue], &active.mem, head, len)?;
                            tracing::trace!(
                                queue = d.queue,
                                head,
                                len,
                                "virtio-fs: request served"
                            );
                        }
                        Ok::<_, RequestError>(true)
                    },
                )?;
            }
            if !progress {
                return Ok(());
            }
        }
    }

    /// What the event loop does when the socket is ready (tests drive it).
    #[cfg(test)]
    pub(super) fn pump(&mut self) {
        self.pump_remote();
    }

    /// Whether the file-system process serves this device.
    #[cfg(test)]
    pub(super) fn is_remote(&self) -> bool {
        matches!(self.backend, Backend::Remote(_))
    }

    /// Runs [`Fs::relay`]; a failure breaks the device (the driver is told)
    /// and is logged.
    fn pump_remote(&mut self) {
        if let Err(e) = self.relay() {
            // Outside `DeviceState::process` (the line failed while the
            // device was idle) the device is broken here.
            if self.state.is_active() && !self.state.is_broken() {
                let _ = DeviceState::process(self, |d| &mut d.state, |_, _| Err::<bool, ()>(()));
            }
            crate::warn_limited!(error = %e, "virtio-fs: device needs reset");
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        // VIRTIO_FS_F_NOTIFICATION (a notification queue) is not offered.
        F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != self.sizes.len() {
            return Err(ActivateError::BadQueue(a.queues.len()));
        }
        self.state.activate(a, &[0, 1])
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        let mut states = self.state.queue_states()?;
        // A snapshot taken with requests in the file-system process's hands
        // gives their chains back to the ring: a restored device pops them
        // again instead of leaving the guest waiting for answers that went
        // with this process.
        if let Backend::Remote(c) = &self.backend {
            for (i, s) in states.iter_mut().enumerate() {
                s.next_avail = s.next_avail.wrapping_sub(c.in_flight_on(i));
            }
        }
        Some(states)
    }

    fn reset(&mut self) {
        self.state.reset();
        self.stale = true;
        // Runs on a vCPU thread: no socket call here. What is in flight is
        // answered into nothing; the next driver's first request brings
        // the DESTROY.
        if let Backend::Remote(c) = &mut self.backend {
            c.orphan_all();
        }
    }

    fn process_queue(&mut self, index: usize) {
        if index >= self.sizes.len() {
            return;
        }
        if let Backend::Remote(_) = self.backend {
            self.pump_remote();
            return;
        }
        if self.state.is_broken() || !self.state.is_active() {
            return;
        }
        if self.stale {
            // The previous driver's inodes and open files go before the new one
            // sends anything (on this, the event-loop thread).
            self.stale = false;
            if let Backend::Local(l) = &self.backend {
                l.destroy();
            }
        }
        if let Err(e) = self.serve_locally(index) {
            crate::warn_limited!(error = %e, queue = index, "virtio-fs: malformed queue; device needs reset");
        }
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        if let Backend::Remote(c) = &self.backend {
            let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(c.fd(), EXTRA_EVENT_BASE, set)) {
                tracing::error!(error = ?e, "virtio-fs: watching the file-system process's socket failed");
            }
        }
    }

    fn process_event(&mut self, _events: Events, _ops: &mut EventOps) {
        self.pump_remote();
    }
}
