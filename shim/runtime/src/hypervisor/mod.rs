//! The VM process at the seam: what to boot ([`VmSpec`]), the trait that
//! boots it ([`Hypervisor`]) and the handle of a running one
//! ([`VmProcess`]). [`HuskVmm`] is the one implementation: the husk-vmm
//! binary, started from its own serialized `VmConfig`, its ready fd, a
//! pidfd for liveness and signals, and its control socket for shutdown.

mod husk_vmm;
mod pidfd;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use async_trait::async_trait;

pub use husk_vmm::{control_snapshot, vmm_binary, HuskVmm};
pub use pidfd::PidFd;

use crate::error::Result;
use crate::layout::SandboxLayout;

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Until the agent answers (the hypervisor waits only for the ready fd).
    pub boot_timeout: Duration,
    /// Kernel command line parameters after the VMM's defaults.
    pub extra_cmdline: Option<String>,
    /// Leave the VM running when this process ends (`husk run -d`).
    pub detach: bool,
    /// Host paths to show the guest in the share, bound in husk-vmm's own
    /// mount namespace: they can never outlive the VM nor be seen (or
    /// deleted through) from the host's namespace.
    pub binds: Vec<Bind>,
    /// Overlay file systems made in husk-vmm's namespace the same way, before
    /// the binds (the CLI's image rootfs: layers + a writable upper).
    pub overlays: Vec<Overlay>,
    /// Share `shared/` even without binds: the caller (the shim) mounts
    /// into it from the host's namespace later.
    pub share: bool,
    /// The husk-vmm binary; `None`: [`vmm_binary`].
    pub vmm: Option<PathBuf>,
    /// virtio-net devices, each on a tap the runtime made
    /// ([`crate::network`]); husk-vmm inherits the fds.
    pub nics: Vec<NetDevice>,
    /// Each NIC's rate limit (received, sent), bytes per second.
    pub net_rate: (Option<u64>, Option<u64>),
    /// Where husk-vmm writes its snapshot when asked (a template's VM).
    pub snapshot_to: Option<PathBuf>,
    /// A snapshot to resume instead of booting ([`crate::template`]).
    pub restore_from: Option<PathBuf>,
}

/// A guest NIC: a tap fd (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) and the MAC
/// and MTU the guest sees.
#[derive(Debug, Clone)]
pub struct NetDevice {
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    pub mac: String,
    pub mtu: u32,
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
            binds: Vec::new(),
            overlays: Vec::new(),
            share: false,
            vmm: None,
            nics: Vec::new(),
            net_rate: (None, None),
            snapshot_to: None,
            restore_from: None,
        }
    }
}

impl VmSpec {
    /// Whether the VM gets the virtio-fs share: asked for, or needed by
    /// binds or overlays.
    pub fn has_share(&self) -> bool {
        self.share || !self.binds.is_empty() || !self.overlays.is_empty()
    }
}

/// A host path bound into the sandbox share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    /// Where in the share, relative (`rootfs`, `volumes/0`).
    pub target: PathBuf,
    pub readonly: bool,
}

/// An overlayfs mounted into the sandbox share: read-only `lower` layers
/// (topmost first) under a writable `upper` (with its `work` directory on
/// the same file system).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Where in the share, relative (`rootfs`).
    pub target: PathBuf,
    pub readonly: bool,
}

/// Boots VMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Starts a VM for `layout` (whose directory exists) and returns once
    /// its vCPUs run. On failure nothing of the VM is left running.
    async fn launch(&self, spec: &VmSpec, layout: &SandboxLayout) -> Result<Box<dyn VmProcess>>;
}

/// A running VM.
#[async_trait]
pub trait VmProcess: Send + Sync {
    /// The VMM's pid (what containerd shows as the task's pid).
    fn pid(&self) -> u32;
    /// The exit status once the VM has ended (`None` while it runs; an
    /// exit of a VM that is not our child has no status to give).
    fn exited(&self) -> Option<VmExit>;
    /// Waits until the VM has ended.
    async fn wait(&self) -> VmExit;
    /// Stops the VM: the control socket's shutdown, then SIGKILL when it
    /// has not ended within `grace`. Returns how it ended.
    async fn stop(&self, grace: Duration) -> VmExit;
    /// Leaves the VM running when this handle goes (detached VMs).
    fn release(&self);
    /// Makes a mount the launch made in the VMM's own mount namespace (an
    /// image's overlay at `target`, an absolute path as the launch saw it)
    /// read-only on every mount below it. A VMM without such mounts has
    /// nothing to change.
    fn make_readonly(&self, target: &std::path::Path) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("{}: this VM has no mounts of its own", target.display()),
        ))
    }
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// Our child, with its status.
    Status(ExitStatus),
    /// Not our child: it is gone, its status went to its parent.
    Gone,
}

impl VmExit {
    pub fn success(&self) -> bool {
        matches!(self, VmExit::Status(s) if s.success())
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Status(s) => write!(f, "{s}"),
            VmExit::Gone => write!(f, "gone"),
        }
    }
}
