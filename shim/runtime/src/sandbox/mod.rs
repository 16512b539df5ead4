//! One VM per pod: its directory, the VM process, the agent, the guest
//! log, OOM watching, its containers, and teardown.
//!
//! [`Sandbox::boot`] leaves nothing behind when it fails: the VM is killed
//! and its directory removed before the error returns. [`Sandbox::shutdown`]
//! unmounts the share before the directory goes, so a removal can never walk
//! into a container's rootfs.

pub mod cgroup;
pub mod logs;
pub mod stale;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_agent_client::agent::{CreateContainerRequest, CreateSandboxRequest, Network};
use husk_agent_client::{Client, ClientError, ConnectOptions};
use tokio::task::JoinHandle;

use crate::agent::Agent;
use crate::container::{self, lock, Container, ContainerConfig, Events, Exit, State};
use crate::error::{Error, Result};
use crate::hypervisor::{HuskVmm, Hypervisor, VmExit, VmProcess, VmSpec};
use crate::layout::{self, SandboxLayout, GUEST_SHARE, SHARE_TAG};
use crate::network::PodNetwork;
use crate::template::Templates;

/// What a sandbox is.
#[derive(Debug, Clone, Default)]
pub struct SandboxSpec {
    pub vm: VmSpec,
    /// The pod's hostname; `None`: a bare VM, no sandbox created in the
    /// guest (`husk vm boot`, benchmarks, agent tests).
    pub hostname: Option<String>,
    /// Forward husk-vmm's own log into ours (the shim; the CLI leaves it
    /// in `vmm.log`).
    pub forward_vmm_log: bool,
    /// The pod's network namespace (CRI's `/var/run/netns/cni-*`): its
    /// links are carried into the VM ([`PodNetwork`]). `None`: only `lo`.
    pub netns: Option<PathBuf>,
    /// The pod's `net.*` sysctls, set in the guest.
    pub sysctls: HashMap<String, String>,
    /// The pod's host cgroup (cgroupfs path): this process joins it before
    /// the VM starts, so husk-vmm is born in it ([`cgroup::HostCgroup`]).
    pub cgroup: Option<PathBuf>,
    /// Limits set on `cgroup` before joining it (a cgroup of the runtime's
    /// own; a pod's is the kubelet's to limit).
    pub cgroup_limits: Option<cgroup::Limits>,
    /// Resume the VM from a template of its shape ([`crate::template`]),
    /// built first if there is none, instead of booting it; a template that
    /// cannot be built or does not restore: a cold boot (the log says why).
    pub template: bool,
}

pub struct Sandbox {
    layout: SandboxLayout,
    vm: Arc<dyn VmProcess>,
    agent: Arc<dyn Agent>,
    /// The concrete client of a real VM, for callers that need RPCs the
    /// runtime does not wrap (guest details, tests).
    client: Option<Client>,
    events: Arc<dyn Events>,
    /// Shared with the OOM watcher, which checks a guest's notice against it.
    containers: Arc<Mutex<HashMap<String, Arc<Container>>>>,
    helpers: Vec<JoinHandle<()>>,
    _guest_log: Option<logs::GuestLog>,
    /// Removes the directory when the sandbox goes (not for detached VMs).
    owns_dir: AtomicBool,
    /// Told by a container whose guest ignored a SIGKILL.
    distrust: Arc<tokio::sync::Notify>,
    /// Set once the host ends the VM for that: its end is then asked for.
    distrusted: Arc<AtomicBool>,
    /// Where the VM's launch mounted images' overlays in husk-vmm's own
    /// namespace (relative to the share).
    vm_overlays: Vec<PathBuf>,
    /// The pod's NICs, detached at shutdown (taken then: never held
    /// across the netlink calls).
    network: Mutex<Option<PodNetwork>>,
    /// The pod's host cgroup, left at shutdown once the VM has ended.
    cgroup: Mutex<Option<cgroup::HostCgroup>>,
    /// The template the VM was resumed from; `None`: it booted.
    from_template: Option<PathBuf>,
    /// Whether an unasked end of the VM is still to be told: set when this
    /// process booted the VM (a CLI command that opened one has no say),
    /// cleared by whichever tells it first, the helper or the shutdown.
    end_untold: Arc<AtomicBool>,
}

/// Stops the VM once a container says its guest ignores kills: what the
/// guest answers no longer matters, the host ends it (and with it every
/// process, each then reported killed: WaitProcess fails). It holds the VM
/// weakly, so that the sandbox's drop still drops (and kills) the VM at once.
async fn stop_on_distrust(
    vm: std::sync::Weak<dyn VmProcess>,
    distrust: Arc<tokio::sync::Notify>,
    distrusted: Arc<AtomicBool>,
    id: String,
) {
    distrust.notified().await;
    let Some(vm) = vm.upgrade() else { return };
    distrusted.store(true, Ordering::SeqCst);
    tracing::error!(sandbox = %id, "stopping the VM of a guest that ignores kills");
    let exit = vm.stop(Duration::ZERO).await;
    tracing::info!(sandbox = %id, %exit, "VM stopped");
}

/// How often [`report_unasked_exit`] looks at the VM. It holds the VM weakly
/// (as [`stop_on_distrust`] does), so it polls instead of waiting on it.
const EXIT_POLL: Duration = Duration::from_secs(1);

/// Warns, with the VMM's and the console's last lines, when the VM ends
/// without the host asking: a guest that powered off, reset or crashed, or
/// a VMM that died. Polls while the sandbox lives; [`Sandbox::shutdown`]
/// aborts it and reports an end it finds already there itself.
async fn report_unasked_exit(
    vm: std::sync::Weak<dyn VmProcess>,
    layout: SandboxLayout,
    distrusted: Arc<AtomicBool>,
    end_untold: Arc<AtomicBool>,
) {
    let exit = loop {
        tokio::time::sleep(EXIT_POLL).await;
        let Some(vm) = vm.upgrade() else { return };
        if let Some(exit) = vm.exited() {
            break exit;
        }
    };
    // Ended by the host (stop_on_distrust said so), or told already.
    if distrusted.load(Ordering::SeqCst) || !end_untold.swap(false, Ordering::SeqCst) {
        return;
    }
    warn_unasked_exit(&layout, &exit);
}

/// Both files go with the sandbox's directory, so this is the only record
/// of why. The console is the guest's text: `file_tail` defangs it and
/// every line is indented under the host's own line, so it cannot pass for
/// one.
fn warn_unasked_exit(layout: &SandboxLayout, exit: &VmExit) {
    let indent = |text: String| {
        text.lines()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    tracing::warn!(
        sandbox = %layout.id(),
        %exit,
        "the VM ended unasked; husk-vmm's last lines:\n{}\nthe console's last lines:\n{}",
        indent(husk_agent_client::client::file_tail(&layout.vmm_log(), 20)),
        indent(console_excerpt(
            &husk_agent_client::client::file_tail(&layout.console_log(), 80),
            15
        )),
    );
}

/// The guest kernel's words for why it died; a panic's backtrace fills the
/// last lines of the console, so such a line is kept when it lies above.
const DYING_WORDS: &[&str] = &["Kernel panic - not syncing", "BUG: ", "Oops: "];

/// The last `n` lines of the console text `tail`, after the first line in it
/// where the guest kernel said why it died, when that line lies above them.
fn console_excerpt(tail: &str, n: usize) -> String {
    let lines: Vec<&str> = tail.lines().collect();
    let from = lines.len().saturating_sub(n);
    let last = lines[from..].join("\n");
    match lines[..from]
        .iter()
        .find(|l| DYING_WORDS.iter().any(|w| l.contains(w)))
    {
        Some(why) => format!("{why}\n...\n{last}"),
        None => last,
    }
}

/// Removes a directory unless disarmed (a failed boot).
struct DirGuard(Option<PathBuf>);

impl DirGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            // Mounts first: removing must never walk into a bound tree.
            let _ = container::mounts::unmount_below(&d);
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Sandbox {
    /// Boots the VM of sandbox `id` with `hypervisor`, waits for its agent,
    /// creates the sandbox in the guest (unless `spec.hostname` is `None`),
    /// with the pod's network when `spec.netns` names one.
    pub async fn boot(
        id: &str,
        spec: &SandboxSpec,
        hypervisor: &dyn Hypervisor,
        events: Arc<dyn Events>,
    ) -> Result<Sandbox> {
        layout::check_id("sandbox", id)?;
        let network = match &spec.netns {
            Some(ns) => Some(PodNetwork::attach(ns).await?),
            None => None,
        };
        // Before the cgroup is joined: a template's VM is nobody's pod.
        let template = if spec.template {
            let shape = VmSpec {
                nics: network
                    .as_ref()
                    .map(PodNetwork::devices)
                    .unwrap_or_else(|| spec.vm.nics.clone()),
                ..spec.vm.clone()
            };
            match Templates::default().get_or_build(&shape, hypervisor).await {
                Ok(dir) => Some(dir),
                Err(why) => {
                    tracing::warn!(sandbox = id, %why, "no template: booting cold");
                    None
                }
            }
        } else {
            None
        };
        let mut cg = match &spec.cgroup {
            Some(p) => match cgroup::HostCgroup::join(p, spec.cgroup_limits) {
                Ok(c) => Some(c),
                Err(e) => {
                    if let Some(n) = network {
                        n.detach().await;
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        let mut booted = Self::boot_vm(
            id,
            spec,
            network.as_ref(),
            hypervisor,
            events.clone(),
            template.as_deref(),
        )
        .await;
        match (&booted, &template) {
            (Err(e), Some(dir)) => {
                // Refused by husk-vmm before the guest ran (stale, corrupt,
                // gone): the template goes. A clone that ran and did not come
                // up (its guest crashed, its agent did not answer) says less
                // about the template: it goes after a few such in a row.
                // Either way this sandbox boots cold.
                let refused = matches!(e, Error::Hypervisor(_));
                if refused || matches!(e, Error::VmGone(_) | Error::Agent { .. }) {
                    tracing::warn!(sandbox = id, error = %e, "restoring the template failed: booting cold");
                    if refused {
                        Templates::default().discard(dir);
                    } else {
                        Templates::default().clone_failed(dir);
                    }
                    booted =
                        Self::boot_vm(id, spec, network.as_ref(), hypervisor, events, None).await;
                }
            }
            (Ok(_), Some(dir)) => Templates::default().clone_ran(dir),
            _ => {}
        }
        match booted {
            Ok(sb) => {
                *lock(&sb.network) = network;
                *lock(&sb.cgroup) = cg;
                Ok(sb)
            }
            Err(e) => {
                if let Some(n) = network {
                    n.detach().await;
                }
                if let Some(c) = cg.as_mut() {
                    c.leave();
                }
                Err(e)
            }
        }
    }

    async fn boot_vm(
        id: &str,
        spec: &SandboxSpec,
        network: Option<&PodNetwork>,
        hypervisor: &dyn Hypervisor,
        events: Arc<dyn Events>,
        template: Option<&Path>,
    ) -> Result<Sandbox> {
        let layout = SandboxLayout::new(id)?;
        let root = layout::runtime_root();
        std::fs::create_dir_all(&root).map_err(Error::io("creating", &root))?;
        if layout.dir().exists() {
            // What a killed owner left is not a reason to refuse the id.
            stale::reap(&root);
        }
        match std::fs::create_dir(layout.dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(format!("sandbox {id}")))
            }
            Err(e) => return Err(Error::io("creating", layout.dir())(e)),
        }
        let guard = DirGuard(Some(layout.dir().to_path_buf()));
        // Listen for the guest's log before it boots, so no line is lost.
        let guest_log =
            logs::GuestLog::start(&layout.vsock_socket(), &layout.guest_log(), id).map_err(
                Error::io("listening for the guest log at", layout.vsock_socket()),
            )?;
        let started = std::time::Instant::now();
        let vm_spec = VmSpec {
            nics: network
                .map(PodNetwork::devices)
                .unwrap_or_else(|| spec.vm.nics.clone()),
            restore_from: template.map(Path::to_path_buf),
            ..spec.vm.clone()
        };
        let vm = hypervisor.launch(&vm_spec, &layout).await?;
        let mut opts = ConnectOptions::new(layout.vsock_socket());
        opts.boot_timeout = spec.vm.boot_timeout;
        opts.console_log = Some(layout.console_log());
        let client = tokio::select! {
            c = Client::connect(opts) => match c {
                Ok(c) => c,
                Err(e) => {
                    // Gone (and reaped) before the error returns.
                    vm.stop(Duration::ZERO).await;
                    return Err(Error::agent("connecting to the agent")(e));
                }
            },
            // The VMM's log says why it ended; the console's last lines say
            // how far the guest got (a reset without a panic prints nothing else).
            exit = vm.wait() => return Err(Error::VmGone(format!(
                "husk-vmm exited ({exit}) before the agent answered:\n{}\nlast console lines:\n{}",
                husk_agent_client::client::file_tail(&layout.vmm_log(), 20),
                husk_agent_client::client::file_tail(&layout.console_log(), 15)
            ))),
        };
        if template.is_some() {
            // A clone: the time and fresh entropy before anything else.
            let seeded = match crate::template::clone_seed() {
                Ok((now, entropy)) => client
                    .restored(now, entropy)
                    .await
                    .map_err(Error::agent("Restored")),
                Err(e) => Err(e),
            };
            if let Err(e) = seeded {
                vm.stop(Duration::ZERO).await;
                return Err(e);
            }
        }
        tracing::info!(
            sandbox = id,
            vcpus = spec.vm.vcpus,
            memory_mib = spec.vm.memory_mib,
            ms = started.elapsed().as_millis() as u64,
            from_template = template.is_some(),
            "VM ready"
        );
        let detach = spec.vm.detach;
        let mut sb = Sandbox::from_parts(layout, vm, Arc::new(client.clone()), events);
        sb.client = Some(client);
        sb._guest_log = Some(guest_log);
        sb.vm_overlays = spec.vm.overlays.iter().map(|o| o.target.clone()).collect();
        sb.from_template = template.map(Path::to_path_buf);
        if let Some(hostname) = &spec.hostname {
            let mut guest_net = network.map(PodNetwork::guest_network);
            if let (Some(net), Some(_)) = (guest_net.as_mut(), template) {
                // The clone's NICs have the template's MACs until the
                // agent gives them the pod's.
                for (i, nic) in net.interfaces.iter_mut().enumerate() {
                    nic.template_mac = crate::template::template_mac(i);
                }
            }
            if let Err(e) = sb.create_in_guest(hostname, guest_net, &spec.sysctls).await {
                // Kept before the directory goes: how far the guest got, and
                // whether husk-vmm saw anything (a clone that stops answering
                // here is retried cold, and this is all that is left of it).
                tracing::warn!(
                    sandbox = id,
                    error = %e,
                    "the guest did not set the sandbox up; husk-vmm's last lines:\n{}\nthe console's last lines:\n{}",
                    husk_agent_client::client::file_tail(&sb.layout.vmm_log(), 20),
                    husk_agent_client::client::file_tail(&sb.layout.console_log(), 15)
                );
                sb.shutdown().await;
                return Err(e);
            }
            // The agent hands each OOM notice to one caller: the sandbox's
            // watcher. A bare VM leaves them to whoever asks.
            let oom = tokio::spawn(sb.oom_watcher());
            sb.helpers.push(oom);
        }
        // Only the process that booted the VM reports its end (a CLI
        // command that opened a running one has no say in it).
        sb.report_unasked_end();
        if spec.forward_vmm_log {
            sb.helpers.push(tokio::spawn(logs::forward_vmm_log(
                sb.layout.vmm_log(),
                id.to_string(),
            )));
        }
        if detach {
            sb.release();
        }
        guard.disarm();
        Ok(sb)
    }

    /// Says why the VM ended, with its last lines, should it end without
    /// the host asking: from a helper while the sandbox lives, or from
    /// [`Sandbox::shutdown`] when the end came first.
    pub(crate) fn report_unasked_end(&mut self) {
        self.end_untold.store(true, Ordering::SeqCst);
        self.helpers.push(tokio::spawn(report_unasked_exit(
            Arc::downgrade(&self.vm),
            self.layout.clone(),
            self.distrusted.clone(),
            self.end_untold.clone(),
        )));
    }

    /// Whether the report [`Sandbox::report_unasked_end`] owes has been
    /// made (tests).
    #[cfg(test)]
    pub(crate) fn end_told(&self) -> bool {
        !self.end_untold.load(Ordering::SeqCst)
    }

    /// Relays the agent's OOM notices for this sandbox's containers.
    pub(crate) fn oom_watcher(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        watch_oom(
            self.agent.clone(),
            self.events.clone(),
            self.containers.clone(),
        )
    }

    /// A sandbox of parts: a VM and its agent (the fakes in tests, or a VM
    /// another process started: [`Sandbox::open`]).
    pub fn from_parts(
        layout: SandboxLayout,
        vm: Box<dyn VmProcess>,
        agent: Arc<dyn Agent>,
        events: Arc<dyn Events>,
    ) -> Sandbox {
        let vm: Arc<dyn VmProcess> = Arc::from(vm);
        let distrust = Arc::new(tokio::sync::Notify::new());
        let distrusted = Arc::new(AtomicBool::new(false));
        let stopper = tokio::spawn(stop_on_distrust(
            Arc::downgrade(&vm),
            distrust.clone(),
            distrusted.clone(),
            layout.id().to_string(),
        ));
        Sandbox {
            layout,
            vm,
            agent,
            client: None,
            events,
            containers: Arc::new(Mutex::new(HashMap::new())),
            helpers: vec![stopper],
            _guest_log: None,
            owns_dir: AtomicBool::new(true),
            distrust,
            distrusted,
            vm_overlays: Vec::new(),
            network: Mutex::new(None),
            cgroup: Mutex::new(None),
            from_template: None,
            end_untold: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The running sandbox `id` another process booted (`husk run -d`), if
    /// its VM still runs. Its directory stays when this value goes.
    pub async fn open(id: &str, events: Arc<dyn Events>) -> Result<Sandbox> {
        stale::reap(&layout::runtime_root());
        let layout = SandboxLayout::new(id)?;
        let vm = HuskVmm::open(&layout).ok_or_else(|| Error::NotFound(format!("sandbox {id}")))?;
        let opts = ConnectOptions {
            boot_timeout: Duration::from_secs(5),
            ..ConnectOptions::new(layout.vsock_socket())
        };
        let client = Client::connect(opts)
            .await
            .map_err(Error::agent("reaching the agent"))?;
        let mut sb = Sandbox::from_parts(layout, Box::new(vm), Arc::new(client.clone()), events);
        sb.client = Some(client);
        sb.release();
        Ok(sb)
    }

    async fn create_in_guest(
        &self,
        hostname: &str,
        network: Option<Network>,
        sysctls: &HashMap<String, String>,
    ) -> Result<()> {
        self.agent
            .create_sandbox(CreateSandboxRequest {
                sandbox_id: self.layout.id().to_string(),
                hostname: hostname.to_string(),
                shared_fs_tag: SHARE_TAG.into(),
                shared_mount_point: GUEST_SHARE.into(),
                network: network.into(),
                sysctls: sysctls.clone(),
                ..Default::default()
            })
            .await
            .map_err(Error::agent("CreateSandbox"))
    }

    pub fn id(&self) -> &str {
        self.layout.id()
    }
    pub fn layout(&self) -> &SandboxLayout {
        &self.layout
    }
    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid()
    }
    /// The template the VM was resumed from; `None` when it booted.
    pub fn from_template(&self) -> Option<&Path> {
        self.from_template.as_deref()
    }
    pub fn agent(&self) -> &Arc<dyn Agent> {
        &self.agent
    }
    /// The agent client of a real VM.
    pub fn client(&self) -> Option<&Client> {
        self.client.as_ref()
    }
    /// How the VM ended, once it has.
    pub fn vm_exited(&self) -> Option<VmExit> {
        self.vm.exited()
    }

    /// Leaves the VM running and its directory in place when this value
    /// goes (detached VMs; a VM another process owns).
    pub fn release(&self) {
        self.vm.release();
        self.owns_dir.store(false, Ordering::SeqCst);
    }

    /// Takes the VM and its directory back (`husk rm`, `husk vm stop` of a
    /// VM another process started): [`Sandbox::shutdown`] then removes it.
    pub fn own(&self) {
        self.owns_dir.store(true, Ordering::SeqCst);
    }

    /// The container `id`.
    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    pub fn container_count(&self) -> usize {
        lock(&self.containers).len()
    }

    /// A container another process created in this (opened) sandbox, as
    /// running: for execs into it.
    pub fn adopt_container(&self, id: &str) -> Arc<Container> {
        let cfg = ContainerConfig {
            id: id.to_string(),
            spec: serde_json::Value::Null,
            share_mounts: Vec::new(),
            stdio: Default::default(),
            rootfs_overlay: false,
            bundle: String::new(),
        };
        let c = Arc::new(Container::new(
            &cfg,
            self.layout.container_dir(id),
            self.vm.pid(),
            self.agent.clone(),
            self.events.clone(),
            State::Running,
            self.distrust.clone(),
        ));
        lock(&self.containers).insert(id.to_string(), c.clone());
        c
    }

    /// Makes a container: its mounts in the share, the container in the
    /// guest, its stdio attached. On failure nothing of it is left.
    pub async fn create_container(&self, cfg: ContainerConfig) -> Result<Arc<Container>> {
        layout::check_id("container", &cfg.id)?;
        if let Some(exit) = self.vm.exited() {
            return Err(Error::VmGone(format!("husk-vmm ended ({exit})")));
        }
        let dir = self.layout.container_dir(&cfg.id);
        let c = Arc::new(Container::new(
            &cfg,
            dir.clone(),
            self.vm.pid(),
            self.agent.clone(),
            self.events.clone(),
            State::Creating,
            self.distrust.clone(),
        ));
        // The id is taken from here on: a second create of it is refused
        // while this one runs, without a lock held across the calls below.
        {
            let mut map = lock(&self.containers);
            if map.contains_key(&cfg.id) {
                return Err(Error::AlreadyExists(format!("container {}", cfg.id)));
            }
            map.insert(cfg.id.clone(), c.clone());
        }
        match self.make_container(&cfg, &c).await {
            Ok(()) => {
                lock(&c.init().state).created(&format!("container {}", cfg.id))?;
                Ok(c)
            }
            Err(e) => {
                lock(&self.containers).remove(&cfg.id);
                if let Err(me) = container::mounts::unmount_below(&dir) {
                    tracing::warn!(container = %cfg.id, error = %me, "unmounting after a failed create");
                }
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    async fn make_container(&self, cfg: &ContainerConfig, c: &Container) -> Result<()> {
        let mounts = self.layout.mounts();
        for m in &cfg.share_mounts {
            m.make(&mounts)?;
        }
        let spec = serde_json::to_vec(&cfg.spec)
            .map_err(|e| Error::InvalidArgument(format!("the container's spec: {e}")))?;
        self.agent
            .create_container(CreateContainerRequest {
                container_id: cfg.id.clone(),
                oci_spec: spec,
                stdin: !cfg.stdio.stdin.is_none(),
                rootfs_overlay: cfg.rootfs_overlay,
                ..Default::default()
            })
            .await
            .map_err(Error::agent("CreateContainer"))?;
        if cfg.spec["root"]["readonly"].as_bool() == Some(true) {
            // A rootfs mounted here, in the host's namespace (containerd's),
            // or an image's overlay the VM's launch mounted in husk-vmm's
            // own (the CLI's; its `--rootfs` is a read-only bind already).
            let rootfs = layout::in_share::rootfs(&cfg.id);
            let root_path = cfg.spec["root"]["path"].as_str().map(PathBuf::from);
            if cfg.share_mounts.iter().any(|m| m.target() == rootfs) {
                let (share, id) = (self.layout.share(), cfg.id.clone());
                c.seal_rootfs_at_start(Box::new(move || {
                    Ok(container::mounts::make_rootfs_readonly(&share, &id)?)
                }));
            } else if let Some(p) = root_path.filter(|p| self.vm_overlays.contains(p)) {
                // Weakly, as the sandbox's other helpers hold it: a
                // container never started must not keep the VM alive.
                let (vm, target) = (Arc::downgrade(&self.vm), self.layout.share().join(p));
                c.seal_rootfs_at_start(Box::new(move || {
                    let vm = vm
                        .upgrade()
                        .ok_or_else(|| Error::FailedPrecondition("the VM has gone".into()))?;
                    vm.make_readonly(&target).map_err(Error::io(
                        "making read-only in husk-vmm's namespace",
                        target,
                    ))
                }));
            }
        }
        if let Err(e) = c.attach_init().await {
            let _ = self.agent.remove_container(&cfg.id).await;
            return Err(e);
        }
        Ok(())
    }

    /// Removes a container that never started or has ended: in the guest,
    /// its mounts and directory in the share, and here. Its exit, if it ran.
    pub async fn delete_container(&self, id: &str) -> Result<Option<Exit>> {
        let c = self.container(id)?;
        let exit = lock(&c.init().state).begin_delete(&format!("container {id}"))?;
        if let Err(e) = self.agent.remove_container(id).await {
            // Gone already, or the VM is: nothing left in the guest either way.
            tracing::info!(container = id, error = %e, "RemoveContainer");
        }
        c.close_all_stdin();
        if let Err(e) = container::mounts::unmount_below(c.dir()) {
            tracing::warn!(container = id, error = %e, "unmounting");
        }
        let _ = std::fs::remove_dir_all(c.dir());
        lock(&self.containers).remove(id);
        Ok(exit)
    }

    /// Stops the guest (the agent's Shutdown, which answers once its
    /// processes have ended and it has synced; then the VMM's control
    /// socket, then SIGKILL), unmounts the share and removes the directory.
    pub async fn shutdown(&self) -> VmExit {
        for h in &self.helpers {
            h.abort();
        }
        // Before the VM goes: the directory is removed recursively, which
        // must never walk into a container's rootfs.
        if let Err(e) = container::mounts::unmount_below(self.layout.dir()) {
            tracing::warn!(sandbox = %self.id(), error = %e, "unmounting the share");
        }
        // Whether the VM had ended before the host asked: the helper that
        // says why was just aborted, so this says it instead (its files go
        // with the directory below). Often the first sign of such an end is
        // every container's WaitProcess failing, and the shutdown that
        // follows beats the helper's next poll.
        let (exit, unasked) = match self.vm.exited() {
            Some(exit) => (exit, true),
            None => {
                match self.agent.shutdown(Duration::from_secs(2)).await {
                    // Every guest process has ended and the guest has synced:
                    // nothing is lost by ending the VM now rather than
                    // waiting out the guest kernel's power-off (hundreds of
                    // ms nested, and the agent's own wind-down).
                    Ok(()) => (self.vm.stop(Duration::from_secs(2)).await, false),
                    Err(e) => {
                        // An agent that powered off before its answer left
                        // loses the connection: fine when the VM then ends.
                        // Any other failure (the VMM's socket gone, a refusal)
                        // followed by an end was not the host's doing.
                        let transport = matches!(e, ClientError::Transport { .. });
                        if !transport {
                            tracing::warn!(sandbox = %self.id(), error = %e, "the agent refused Shutdown");
                        }
                        match tokio::time::timeout(Duration::from_secs(10), self.vm.wait()).await {
                            Ok(exit) => (exit, !transport),
                            Err(_) => (self.vm.stop(Duration::from_secs(2)).await, false),
                        }
                    }
                }
            }
        };
        if unasked
            && !self.distrusted.load(Ordering::SeqCst)
            && self.end_untold.swap(false, Ordering::SeqCst)
        {
            warn_unasked_exit(&self.layout, &exit);
        }
        tracing::info!(sandbox = %self.id(), %exit, "VM stopped");
        let network = lock(&self.network).take();
        if let Some(n) = network {
            n.detach().await;
        }
        let cgroup = lock(&self.cgroup).take();
        if let Some(mut c) = cgroup {
            c.leave();
        }
        if self.owns_dir.load(Ordering::SeqCst) {
            let _ = container::mounts::unmount_below(self.layout.dir());
            let _ = std::fs::remove_dir_all(self.layout.dir());
        }
        exit
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for h in &self.helpers {
            h.abort();
        }
        // The VM handle kills an owned VM as it drops; the directory goes
        // with it (mounts first).
        if self.owns_dir.load(Ordering::SeqCst) && self.layout.dir().exists() {
            let _ = container::mounts::unmount_below(self.layout.dir());
            let _ = std::fs::remove_dir_all(self.layout.dir());
        }
    }
}

/// Relays the agent's OOM notices until the VM goes or the agent says it
/// has no such call.
///
/// A notice naming a container this sandbox does not have (the guest
/// chooses the id) is logged, never published: a pod must not raise
/// TaskOOM for another pod's container.
async fn watch_oom(
    agent: Arc<dyn Agent>,
    events: Arc<dyn Events>,
    containers: Arc<Mutex<HashMap<String, Arc<Container>>>>,
) {
    loop {
        match agent.oom_event().await {
            Ok(container_id) => {
                if !lock(&containers).contains_key(&container_id) {
                    tracing::warn!(
                        container = %container_id.escape_debug().to_string().chars().take(80).collect::<String>(),
                        "the guest reported an OOM kill of a container this pod does not have; ignored"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                tracing::warn!(container = %container_id, "OOM kill in the guest");
                events.oom(&container_id).await;
            }
            Err(ClientError::Rpc { code, message, .. }) => {
                tracing::info!(?code, %message, "no OOM notices from this agent");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "OOM watch");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::console_excerpt;

    #[test]
    fn a_panic_line_above_the_last_lines_is_kept() {
        let mut console = vec!["booted", "Kernel panic - not syncing: Out of memory"];
        let trace: Vec<String> = (0..20)
            .map(|i| format!(" ? 0xffffffff8111{i:04x}"))
            .collect();
        console.extend(trace.iter().map(String::as_str));
        let text = console.join("\n");
        let e = console_excerpt(&text, 3);
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines[0], "Kernel panic - not syncing: Out of memory");
        assert_eq!(lines[1], "...");
        assert_eq!(&lines[2..], &trace[17..]);
    }

    #[test]
    fn without_dying_words_it_is_the_last_lines() {
        assert_eq!(console_excerpt("a\nb\nc\nd", 2), "c\nd");
        assert_eq!(console_excerpt("a\nb", 5), "a\nb");
        assert_eq!(console_excerpt("", 5), "");
        // Within the last lines it is not repeated.
        assert_eq!(
            console_excerpt("x\nKernel panic - not syncing: y\nz", 2),
            "Kernel panic - not syncing: y\nz"
        );
    }
}
