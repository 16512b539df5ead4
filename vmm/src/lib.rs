//! husk-vmm: Husk's KVM micro-VM monitor.
//!
//! One process runs one VM: guest memory in 2 MiB-aligned anonymous memory ([`memory`]), vCPUs on
//! KVM ([`vcpu`], [`arch`]), a Linux kernel loaded by linux-loader ([`boot`]), an
//! 8250 console and an i8042 reset line ([`devices::legacy`]) and virtio-mmio
//! devices on virtio-queue rings ([`devices::virtio`]). [`vmm`] wires them into an
//! epoll event loop; [`seccomp`] jails every thread. [`api`] is the shim's
//! control socket and ready signal. [`logging`] bounds husk-vmm's own log and
//! rate-limits what the guest can make it say.
//!
//! The guest is hostile: everything read from guest memory or device registers
//! is validated before use, and a bad ring puts its device into the virtio
//! `NEEDS_RESET` state instead of taking the VMM down.

pub mod api;
pub mod arch;
pub mod boot;
pub mod cmdline;
pub mod config;
pub mod confine;
pub mod devices;
pub mod exit;
pub mod fs_process;
pub mod logging;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vmm;

/// Everything that can stop the VMM from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("guest memory: {0}")]
    Memory(#[from] memory::MemoryError),
    #[error("booting the kernel: {0}")]
    Boot(#[from] boot::BootError),
    #[error("x86_64 vCPU/VM setup: {0}")]
    Arch(#[from] arch::x86_64::ArchError),
    #[error("vCPU: {0}")]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("device: {0}")]
    Device(#[from] devices::DeviceError),
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("jail: {0}")]
    Confine(#[from] confine::ConfineError),
    #[error("snapshot: {0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("restoring the snapshot: {0}")]
    Restore(String),
    #[error("ready signal: {0}")]
    Ready(#[from] api::ready::ReadyError),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
