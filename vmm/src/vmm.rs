//! Building and running one VM: KVM, guest memory, devices, boot state, vCPU
//! threads and the event loop.
//!
//! Threads: one per vCPU (KVM_RUN; port/MMIO exits are handled on the vCPU thread
//! under the device's lock) and the event-loop thread, which waits in epoll
//! (event-manager) on queue notifications (ioeventfds), device sockets, the exit
//! eventfd and a signalfd for SIGTERM/SIGINT, the control socket and the ready
//! signal ([`crate::api`]). Interrupts go out through irqfds, so neither side
//! needs the other to inject them.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemory, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{ControlServer, ReadySignal, Response, SnapshotReply, VmInfo};
use crate::arch::x86_64::state;
use crate::arch::x86_64::{self as arch, layout, mptable};
use crate::boot;
use crate::config::ValidConfig;
use crate::confine;
use crate::devices::legacy::{ConsoleWriter, EventFdTrigger, SerialConsole, I8042};
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{regs, MmioTransport, SnapshotTransport};
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{VirtioDevice, EXTRA_EVENT_BASE};
use crate::devices::{lock, Bus, DeviceError};
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::{create_guest_memory, restore_memory, save_memory, GuestMemoryMmap, Populated};
use crate::seccomp;
use crate::snapshot::{self, Identity, Snapshot};
use crate::vcpu::{self, Pause, Vcpu, VcpuError};
use crate::{Error, Result};

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Event-loop glue for one virtio device: queue eventfds go to `process_queue`,
/// everything else to the device's own handler.
struct VirtioSubscriber<D: VirtioDevice> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    queue_evts: Vec<EventFd>,
}

impl<D: VirtioDevice> MutEventSubscriber for VirtioSubscriber<D> {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!(error = ?e, queue = i, "registering a queue eventfd failed");
            }
        }
        lock(&self.transport).device_mut().init_events(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data < EXTRA_EVENT_BASE {
            if let Some(evt) = self.queue_evts.get(data as usize) {
                // Drain the counter; one pass handles every pending notification.
                let _ = evt.read();
                lock(&self.transport)
                    .device_mut()
                    .process_queue_event(data as usize, ops);
            }
        } else {
            lock(&self.transport)
                .device_mut()
                .process_event(events, ops);
        }
    }
}

/// Wakes the loop for the exit eventfd and for SIGTERM/SIGINT.
struct ExitSubscriber {
    exit: ExitSignal,
    signalfd: File,
}

impl MutEventSubscriber for ExitSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data) in [
            (self.exit.eventfd().as_raw_fd(), 0),
            (self.signalfd.as_raw_fd(), 1),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::error!(error = ?e, "registering the exit sources failed");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == 0 {
            let _ = self.exit.eventfd().read();
            return;
        }
        // struct signalfd_siginfo is 128 bytes; ssi_signo is its first u32.
        let mut buf = [0u8; 128];
        if self.signalfd.read_exact(&mut buf).is_ok() {
            let signo = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as i32;
            let name = if signo == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            self.exit.exit(ExitReason::Stopped(name.to_string()));
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (as virtiofsd does): a
/// shell's soft limit of 1024 would leave a share a few hundred files. Failure
/// only leaves the share a smaller budget.
pub(crate) fn raise_nofile() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own; results checked.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl) == 0
        }
    };
    if !raised {
        tracing::warn!(error = %std::io::Error::last_os_error(), "raising RLIMIT_NOFILE failed");
    }
}

/// Puts this thread, and every thread it starts later, in the Landlock jail
/// ([`confine`]): unlinking in the sockets' directories, writing a
/// snapshot, nothing else.
fn enter_jail(
    cfg: &crate::config::VmConfig,
    sockets: [&Option<std::path::PathBuf>; 2],
) -> Result<()> {
    let jail = confine::Jail {
        // The share is the file-system process's (fs_process), never this
        // one's: not even it stays reachable here.
        shares: Vec::new(),
        removable_in: socket_dirs(sockets),
        snapshot_dir: cfg.snapshot_to.clone(),
    };
    // A thread started before this one entered would run unconfined: there
    // must be none (the loaders and the seccomp compiler were joined).
    let threads = confine::thread_count();
    match jail.enter()? {
        confine::Confined::Fully => tracing::info!(?threads, "Landlock jail entered"),
        confine::Confined::Partly => tracing::info!(
            ?threads,
            "Landlock jail entered as far as this kernel's Landlock ABI goes"
        ),
        confine::Confined::Not => {
            tracing::warn!("this kernel has no Landlock: no file-system jail")
        }
    }
    Ok(())
}

/// The directories of husk-vmm's sockets (`.` for a bare name).
fn socket_dirs(sockets: [&Option<std::path::PathBuf>; 2]) -> Vec<std::path::PathBuf> {
    sockets
        .into_iter()
        .flatten()
        .filter_map(|p| {
            p.parent().map(|d| {
                if d.as_os_str().is_empty() {
                    ".".into()
                } else {
                    d.to_owned()
                }
            })
        })
        .collect()
}

/// Blocks SIGTERM and SIGINT in this thread (and every thread it spawns later)
/// and returns a signalfd that receives them, so a stop request is handled in
/// the event loop, not in a signal handler.
fn stop_signals_fd() -> Result<File> {
    // SAFETY: sigemptyset/sigaddset initialise a local sigset; pthread_sigmask and
    // signalfd take pointers to it for the duration of the call; results checked.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io_err("blocking SIGTERM")(std::io::Error::last_os_error()));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io_err("signalfd")(std::io::Error::last_os_error()));
        }
        Ok(File::from_raw_fd(fd))
    }
}

/// Hands guest memory to KVM, one slot per region.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| io_err("guest memory host address")(std::io::Error::other(e)))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by
        // `mem`, which the VMM keeps until the process exits, so KVM never sees
        // the mapping go away under a running guest.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The sockets husk-vmm made, removed when it is done with them.
#[derive(Default)]
struct SocketFiles(Vec<std::path::PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The event loops' type: subscribers shared with the buses, on any thread.
type EventLoop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

fn event_loop(what: &'static str) -> Result<EventLoop> {
    EventManager::new().map_err(|e| io_err(what)(std::io::Error::other(format!("{e:?}"))))
}

/// A virtio device placed on the MMIO bus.
struct Placed {
    addr: u64,
    irq: u32,
    transport: Arc<Mutex<dyn SnapshotTransport>>,
}

/// Puts a virtio device on the bus, with its irqfd and ioeventfds, and adds its
/// event-loop subscriber.
fn add_virtio<D: VirtioDevice + 'static>(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    em: &mut EventLoop,
    index: u32,
    device: D,
) -> Result<Placed> {
    let irq = layout::IRQ_VIRTIO_FIRST + index;
    if irq > layout::IRQ_MAX {
        return Err(DeviceError::NoIrq(format!("virtio device {index}")).into());
    }
    let addr = layout::virtio_mmio_addr(index);
    let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("irq eventfd"))?;
    vm.register_irqfd(&irq_evt, irq)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let transport =
        MmioTransport::new(device, mem.clone(), irq_evt).map_err(io_err("virtio transport"))?;
    let mut queue_evts = Vec::new();
    for (i, evt) in transport.queue_evts().iter().enumerate() {
        // QueueNotify writes carrying this queue's index complete in the kernel.
        vm.register_ioevent(
            evt,
            &IoEventAddress::Mmio(addr + regs::QUEUE_NOTIFY),
            i as u32,
        )
        .map_err(kvm_err("KVM_IOEVENTFD"))?;
        queue_evts.push(evt.try_clone().map_err(io_err("queue eventfd"))?);
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(addr, layout::VIRTIO_MMIO_SIZE, transport.clone())?;
    em.add_subscriber(Arc::new(Mutex::new(VirtioSubscriber {
        transport: transport.clone(),
        queue_evts,
    })));
    Ok(Placed {
        addr,
        irq,
        transport,
    })
}

/// What this VM's snapshot is taken from, or what a snapshot must have been
/// taken from to resume here ([`snapshot::Identity`]).
fn identity(config: &ValidConfig, cmdline: &linux_loader::cmdline::Cmdline) -> Result<Identity> {
    let cfg = &config.config;
    Ok(Identity {
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel: snapshot::file_stamp(&config.kernel)?,
        initramfs: cfg
            .initramfs
            .as_deref()
            .map(snapshot::file_stamp)
            .transpose()?,
        cmdline: cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .map_err(|e| Error::Restore(format!("command line: {e}")))?,
        guest_cid: cfg.vsock_socket.as_ref().map(|_| cfg.guest_cid),
        vcpus: config.vcpus,
        memory_mib: u32::try_from(cfg.memory_mib).unwrap_or(u32::MAX),
        host_cpu: snapshot::host_cpu(),
    })
}

/// How long the vCPUs have to leave KVM_RUN and save their state.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a snapshot reads, once the event loop has stopped for it.
struct TakeSnapshot<'a> {
    dir: &'a Path,
    identity: Identity,
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    pause: &'a Pause,
    /// Fresh anonymous RAM only (not a restored VM's).
    populated: Option<&'a Populated>,
    vcpu_threads: &'a [JoinHandle<()>],
    devices: &'a [Arc<Mutex<dyn SnapshotTransport>>],
}

/// Pauses the vCPUs, saves them, the VM and every device, and writes guest
/// memory then the state file to `dir`. The devices' locks are held from
/// their save to the end of the memory write: the virtio-fs and net threads
/// still run and must not write guest memory under the copy.
fn take_snapshot(t: TakeSnapshot) -> std::result::Result<(), String> {
    let vcpus = t.pause.collect(t.vcpu_threads, PAUSE_TIMEOUT)?;
    let guards: Vec<_> = t.devices.iter().map(|d| lock(d)).collect();
    let devices = guards.iter().map(|g| g.save_state()).collect();
    let vm = state::save_vm(t.vm).map_err(|e| e.to_string())?;
    let memory = t.dir.join(snapshot::MEMORY_FILE);
    save_memory(t.mem, &memory, t.populated).map_err(|e| format!("{}: {e}", memory.display()))?;
    drop(guards);
    let s = Snapshot {
        identity: t.identity,
        vm,
        vcpus,
        devices,
    };
    snapshot::write(&t.dir.join(snapshot::STATE_FILE), &s).map_err(|e| e.to_string())
}

/// Builds the VM from `config`, runs it, and returns why it stopped.
pub fn run(config: &ValidConfig) -> Result<ExitReason> {
    let cfg = &config.config;
    // Where the time before the first KVM_RUN goes (HUSK_VMM_LOG=debug).
    let t0 = std::time::Instant::now();
    let phase =
        |what: &str| tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "set-up: {what}");
    // First, so the inherited fds are ours before anything else runs.
    let ready_out = cfg.ready_fd.map(crate::api::ready::take_fd).transpose()?;
    let taps = cfg
        .net
        .iter()
        .map(|n| Tap::from_inherited(n.fd).map_err(DeviceError::from))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    // Compiling the filters is pure computation (about 1 ms on hardware, a
    // tenth of a second in the nested test host): it runs on a thread of its
    // own while this one sets up KVM and loads the kernel, and is joined
    // before the first thread that needs a filter starts.
    let snapshots = cfg.snapshot_to.is_some();
    if let Some(dir) = &cfg.snapshot_to {
        // Found missing now, not after the guest has run for a while.
        if !dir.is_dir() {
            return Err(io_err(format!("--snapshot-to {}", dir.display()))(
                std::io::Error::other("not a directory"),
            ));
        }
    }
    let compiling = if cfg.seccomp {
        seccomp::install_sigsys_handler()?;
        Some(
            std::thread::Builder::new()
                .name("seccomp-build".into())
                .spawn(move || seccomp::Filters::new(snapshots))
                .map_err(io_err("spawning the seccomp compiler thread"))?,
        )
    } else {
        None
    };
    let signalfd = stop_signals_fd()?;
    let exit = ExitSignal::new().map_err(io_err("exit eventfd"))?;

    let ram = match &cfg.restore_from {
        // Copy-on-write from the snapshot's file: nothing is read until the
        // guest touches it, and restores of one snapshot share its pages.
        Some(dir) => restore_memory(&dir.join(snapshot::MEMORY_FILE), cfg.memory_mib << 20)?,
        None => create_guest_memory(cfg.memory_mib << 20)?,
    };
    let mem = ram.memory.clone();
    // A cold boot's kernel and initramfs load into RAM on a thread of their
    // own from here, while KVM, the devices and the vCPUs are set up: the
    // loads (first touches of fresh memory) are the longest part of the
    // set-up, and need nothing of the VM. Joined before the boot parameters
    // are written and before any filter or the jail is in force.
    let loading = match &cfg.restore_from {
        Some(_) => None,
        None => {
            let (mem, kernel, initramfs) =
                (mem.clone(), config.kernel.clone(), cfg.initramfs.clone());
            Some(
                std::thread::Builder::new()
                    .name("boot-loader".into())
                    .spawn(move || boot::load(&mem, &kernel, initramfs.as_deref()))
                    .map_err(io_err("spawning the kernel loader thread"))?,
            )
        }
    };
    phase("guest memory mapped");

    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    for cap in [Cap::Irqchip, Cap::Ioeventfd, Cap::Irqfd, Cap::UserMemory] {
        if !kvm.check_extension(cap) {
            return Err(io_err(format!("KVM lacks {cap:?}"))(std::io::Error::other(
                "unsupported",
            )));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    arch::setup_vm(&vm)?;
    register_memory(&vm, &mem)?;
    phase("VM created");

    let mut em = event_loop("event manager")?;
    em.add_subscriber(Arc::new(Mutex::new(ExitSubscriber {
        exit: exit.clone(),
        signalfd,
    })));

    // Legacy devices on the port bus.
    let mut pio = Bus::new();
    let console_out: Box<dyn std::io::Write + Send> = match &cfg.serial_out {
        Some(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io_err(format!("opening console output {}", p.display())))?,
        ),
        None => Box::new(std::io::stderr()),
    };
    let com1_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("COM1 irq eventfd"))?;
    vm.register_irqfd(&com1_irq, layout::IRQ_COM1)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let serial = SerialConsole::new(
        EventFdTrigger(com1_irq),
        ConsoleWriter::new(console_out, Some(exit.clone())),
    );
    pio.insert(
        u64::from(layout::PORT_COM1),
        u64::from(layout::PORT_COM1_LEN),
        Arc::new(Mutex::new(serial)),
    )?;
    pio.insert(
        u64::from(layout::PORT_I8042),
        u64::from(layout::PORT_I8042_LEN),
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;

    // virtio devices on the MMIO bus, announced on the command line.
    let mut mmio = Bus::new();
    let mut placed = Vec::new();
    let rng = Rng::new().map_err(io_err("opening /dev/urandom"))?;
    placed.push(add_virtio(&vm, &mem, &mut mmio, &mut em, 0, rng)?);
    let mut vsock_socket = None;
    // Removed however run() ends, a failed set-up or restore included.
    let mut socket_files = SocketFiles::default();
    if let Some(path) = &cfg.vsock_socket {
        let vsock = Vsock::new(cfg.guest_cid, path)
            .map_err(io_err(format!("vsock socket {}", path.display())))?;
        vsock_socket = Some(path.clone());
        socket_files.0.push(path.clone());
        placed.push(add_virtio(&vm, &mem, &mut mmio, &mut em, 1, vsock)?);
    }
    // virtio-fs gets an event loop and a thread of its own: a slow disk
    // operation on the host then stalls only the share, not vsock (the
    // agent's API and every stdio stream) or the other devices.
    let mut fs_em = None;
    if let Some(dir) = &cfg.shared_dir {
        // Served by a process of its own (fs_process), so that this one
        // needs no file-system rights and can drop its user below. Started
        // now, as this process's user, before that drop.
        let client = crate::fs_process::spawn(cfg, dir)
            .map_err(|e| io_err("virtio-fs")(std::io::Error::other(e.to_string())))?;
        let fs = Fs::remote(&cfg.fs_tag, dir, client).map_err(DeviceError::from)?;
        let mut own = event_loop("virtio-fs event manager")?;
        placed.push(add_virtio(&vm, &mem, &mut mmio, &mut own, 2, fs)?);
        fs_em = Some(own);
    }
    // Each NIC gets an event loop and a thread of its own (`net0`, ..): its
    // frames never wait behind vsock or the share, nor on a vCPU.
    let mut net_ems = Vec::new();
    for (i, (nic, tap)) in cfg.net.iter().zip(taps).enumerate() {
        tracing::info!(tap = tap.name(), fd = nic.fd, "virtio-net: NIC {i}");
        let net = Net::new(nic, tap).map_err(io_err("virtio-net rate limiter timer"))?;
        let mut own = event_loop("virtio-net event manager")?;
        placed.push(add_virtio(
            &vm,
            &mem,
            &mut mmio,
            &mut own,
            3 + i as u32,
            net,
        )?);
        net_ems.push(own);
    }
    let (ready, vcpu_started) = ReadySignal::new(usize::from(config.vcpus), ready_out)?;
    em.add_subscriber(Arc::new(Mutex::new(ready)));
    let mut api_socket = None;
    // The connection that asked for a snapshot, answered once it is taken.
    let snapshot_reply: SnapshotReply = Arc::default();
    if let Some(path) = &cfg.api_socket {
        let info = VmInfo {
            vcpus: config.vcpus,
            memory_mib: cfg.memory_mib,
            pid: std::process::id(),
            vsock_socket: vsock_socket.as_ref().map(|p| p.display().to_string()),
            // Entered below, before the guest runs; a failure to enter it
            // ends husk-vmm before this is ever answered.
            jail: confine::describe(cfg.landlock),
        };
        let mut server = ControlServer::new(path, info, exit.clone())
            .map_err(io_err(format!("control socket {}", path.display())))?;
        if snapshots {
            server.take_snapshots(snapshot_reply.clone());
        }
        api_socket = Some(path.clone());
        socket_files.0.push(path.clone());
        em.add_subscriber(Arc::new(Mutex::new(server)));
    }
    let devices: Vec<(u64, u32)> = placed.iter().map(|p| (p.addr, p.irq)).collect();
    let cmdline = boot::build_cmdline(&cfg.base_cmdline(), &devices)?;
    tracing::info!(cmdline = %cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default());

    phase("devices ready");
    // What a snapshot of this VM is, or what one must be to resume here.
    let identity = if cfg.restore_from.is_some() || snapshots {
        Some(identity(config, &cmdline)?)
    } else {
        None
    };
    let restoring = match (&cfg.restore_from, &identity) {
        (Some(dir), Some(this)) => {
            let s = snapshot::read(&dir.join(snapshot::STATE_FILE), this)?;
            if s.devices.len() != placed.len() {
                return Err(Error::Restore(format!(
                    "the snapshot has {} virtio devices, this VM {}",
                    s.devices.len(),
                    placed.len()
                )));
            }
            phase("snapshot state read and checked");
            Some(s)
        }
        _ => None,
    };
    let entry = match loading {
        // Restoring: the kernel is already in the snapshot's memory, running.
        None => None,
        Some(loader) => {
            let loaded = loader
                .join()
                .map_err(|_| boot::BootError::LoaderPanicked)??;
            let entry = boot::finish(&mem, &loaded, &cmdline)?;
            mptable::setup(&mem, config.vcpus).map_err(arch::ArchError::from)?;
            phase("kernel and initramfs loaded");
            Some(entry)
        }
    };

    let supported = arch::supported_cpuid(&kvm)?;
    let filters = match compiling {
        Some(t) => Some(t.join().map_err(|_| {
            io_err("compiling the seccomp filters")(std::io::Error::other("the thread panicked"))
        })??),
        None => None,
    };
    phase("seccomp filters compiled");
    // Before the jail, which would refuse /proc later.
    let populated = match (snapshots, &cfg.restore_from) {
        // Without it a snapshot reads every page: slower, not wrong.
        (true, None) => Populated::open()
            .map_err(|e| tracing::warn!(error = %e, "/proc/self/pagemap: a snapshot will read all of guest RAM"))
            .ok(),
        _ => None,
    };
    if let Some(user) = cfg.user {
        // Everything that needed root is open (KVM, the taps, the sockets,
        // the console, the snapshot's files) and the file-system process,
        // which keeps the rights the share needs, is started: from here
        // this process, guest memory's holder, is an unprivileged user with
        // no capability, in a root of its own that holds only its sockets'
        // directories and the snapshot directory. Before any other thread
        // starts (a user namespace needs a single thread) and before
        // Landlock (which forbids mount changes).
        let mut keep: Vec<std::path::PathBuf> = socket_dirs([&vsock_socket, &api_socket]);
        keep.extend(cfg.snapshot_to.iter().cloned());
        let jail = confine::enter_mount_jail(user, &keep).map_err(io_err(format!(
            "becoming uid {} gid {} in a root of its own",
            user.uid, user.gid
        )))?;
        match jail {
            confine::MountJail::Entered => {
                tracing::info!(
                    uid = user.uid,
                    gid = user.gid,
                    ?keep,
                    "running as an unprivileged user in a root of its own"
                )
            }
            confine::MountJail::Unavailable => tracing::warn!(
                uid = user.uid,
                gid = user.gid,
                "running as an unprivileged user; no user namespaces here, so no root of its own"
            ),
            confine::MountJail::Failed(why) => tracing::warn!(
                uid = user.uid,
                gid = user.gid,
                %why,
                "running as an unprivileged user, without a root of its own"
            ),
        }
        // The files it still writes: the console and its log (each capped
        // by its own writer, the log shared with the file-system process),
        // and a template's state and memory.
        let mut fsize = crate::devices::legacy::serial::CONSOLE_LIMIT
            .max(cfg.log_limit_bytes.saturating_mul(2))
            .saturating_add(1 << 20);
        if cfg.snapshot_to.is_some() {
            fsize =
                fsize.max((cfg.memory_mib << 20).saturating_add(crate::snapshot::MAX_STATE_BYTES));
        }
        confine::limit_resources(fsize).map_err(io_err("setting resource limits"))?;
        phase("user dropped");
    }
    if cfg.landlock {
        // Everything is open now; every thread from here on (vCPUs, device
        // loops) inherits the jail from this one.
        enter_jail(cfg, [&vsock_socket, &api_socket])?;
        phase("Landlock jail entered");
    }
    let mmio = Arc::new(mmio);
    let pio = Arc::new(pio);
    if let Some(s) = &restoring {
        // The in-kernel PICs, IOAPIC, PIT and clock before the vCPUs, whose
        // LAPICs take interrupts from them.
        state::restore_vm(&vm, &s.vm).map_err(|e| Error::Restore(e.to_string()))?;
    }
    let mut vcpus = Vec::new();
    for index in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        match (&restoring, entry) {
            (Some(s), _) => {
                let saved = s.vcpus.get(usize::from(index)).ok_or_else(|| {
                    Error::Restore(format!("the snapshot has no state for vCPU {index}"))
                })?;
                state::restore_vcpu(&fd, saved)
                    .map_err(|e| Error::Restore(format!("vCPU {index}: {e}")))?;
            }
            (None, Some(entry)) => {
                arch::configure_vcpu(&kvm, &fd, &supported, index, config.vcpus, &mem, entry)?
            }
            (None, None) => {
                return Err(Error::Restore(
                    "neither a kernel entry nor a snapshot to resume".into(),
                ))
            }
        }
        vcpus.push(Vcpu {
            fd,
            index,
            mmio: mmio.clone(),
            pio: pio.clone(),
            exit: exit.clone(),
            pause: None,
        });
    }
    if let Some(s) = &restoring {
        // Last: activating a device may raise its interrupt (vsock's
        // transport reset), which must land in the restored LAPICs, not
        // be overwritten by them.
        for (p, saved) in placed.iter().zip(&s.devices) {
            lock(&p.transport)
                .restore_state(saved)
                .map_err(|e| Error::Restore(e.to_string()))?;
        }
        phase("state restored");
    }
    let pause = match (snapshots, vcpus.first()) {
        (true, Some(first)) => {
            // Which MSRs this host lets us read back, probed once now: the
            // probe is an ioctl per MSR, too slow for the moment of pausing.
            let msrs = state::saved_msr_indices(&kvm, &first.fd)
                .map_err(|e| io_err("probing the MSRs to save")(std::io::Error::other(e)))?;
            let p = Pause::new(vcpus.len(), msrs);
            for v in &mut vcpus {
                v.pause = Some(p.clone());
            }
            Some(p)
        }
        _ => None,
    };
    vcpu::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
    phase("vCPUs configured");
    let mut vcpu_threads = Vec::new();
    for vcpu in vcpus {
        let index = vcpu.index;
        let filter = filters.as_ref().map(|f| f.vcpu.clone());
        let exit = exit.clone();
        let started = vcpu_started.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Some(f) = filter {
                    if let Err(e) = seccomp::apply("vCPU", &f) {
                        exit.exit(ExitReason::Internal(e.to_string()));
                        return;
                    }
                }
                started.report();
                vcpu.run();
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        vcpu_threads.push(thread);
    }
    if let Some(mut fs_em) = fs_em {
        // Its own filter: a relay to the file-system process needs no file
        // system call at all.
        let filter = filters.as_ref().map(|f| f.fs_relay.clone());
        let exit = exit.clone();
        std::thread::Builder::new()
            .name("virtio-fs".into())
            .spawn(move || {
                if let Some(f) = filter {
                    if let Err(e) = seccomp::apply("virtio-fs", &f) {
                        exit.exit(ExitReason::Internal(e.to_string()));
                        return;
                    }
                }
                // Runs until the process ends with the main loop.
                loop {
                    if let Err(e) = fs_em.run() {
                        exit.exit(ExitReason::Internal(format!("virtio-fs event loop: {e:?}")));
                        return;
                    }
                }
            })
            .map_err(io_err("spawning the virtio-fs thread"))?;
    }
    for (i, mut net_em) in net_ems.into_iter().enumerate() {
        let filter = filters.as_ref().map(|f| f.net.clone());
        let exit = exit.clone();
        std::thread::Builder::new()
            .name(format!("net{i}"))
            .spawn(move || {
                if let Some(f) = filter {
                    if let Err(e) = seccomp::apply("virtio-net", &f) {
                        exit.exit(ExitReason::Internal(e.to_string()));
                        return;
                    }
                }
                loop {
                    if let Err(e) = net_em.run() {
                        exit.exit(ExitReason::Internal(format!(
                            "virtio-net event loop: {e:?}"
                        )));
                        return;
                    }
                }
            })
            .map_err(io_err("spawning a virtio-net thread"))?;
    }
    if let Some(f) = &filters {
        seccomp::apply("VMM", &f.vmm)?;
    }
    tracing::info!(
        vcpus = config.vcpus,
        memory_mib = cfg.memory_mib,
        ?entry,
        "guest started"
    );

    let mut reason = loop {
        if let Err(e) = em.run() {
            break ExitReason::Internal(format!("event loop: {e:?}"));
        }
        if let Some(r) = exit.reason() {
            break r;
        }
    };
    if let Some(reply) = lock(&snapshot_reply).take() {
        let result = match (&reason, &pause, &cfg.snapshot_to, identity) {
            (ExitReason::Snapshot, Some(pause), Some(dir), Some(identity)) => {
                let devices: Vec<_> = placed.iter().map(|p| p.transport.clone()).collect();
                let taken = Instant::now();
                take_snapshot(TakeSnapshot {
                    dir,
                    identity,
                    vm: &vm,
                    mem: &mem,
                    pause,
                    populated: populated.as_ref(),
                    vcpu_threads: &vcpu_threads,
                    devices: &devices,
                })
                .map(|()| taken.elapsed())
            }
            (ExitReason::Snapshot, ..) => Err("this VM takes no snapshots".to_string()),
            (other, ..) => Err(format!("the VM stopped before the snapshot: {other}")),
        };
        let answer = match &result {
            Ok(took) => {
                tracing::info!(?took, "snapshot taken");
                reason = ExitReason::Stopped(format!(
                    "snapshot taken to {}",
                    cfg.snapshot_to
                        .as_deref()
                        .unwrap_or(Path::new(""))
                        .display()
                ));
                Response::ok()
            }
            Err(e) => {
                tracing::error!(error = %e, "snapshot failed");
                if reason == ExitReason::Snapshot {
                    reason = ExitReason::Internal(format!("snapshot failed: {e}"));
                }
                Response::error(format!("snapshot failed: {e}"))
            }
        };
        crate::api::answer_late(reply, &answer);
    }
    drop(socket_files);
    // Keep the memory mapped (and KVM's view of it valid) until the process ends.
    std::mem::forget(ram);
    Ok(reason)
}
