//! The shim v2 task service: containerd's Task API translated to
//! husk-runtime's sandbox and containers. Nothing is decided here that the
//! runtime decides; no lock is held across a VM boot or an agent call.
//!
//! One shim serves one pod: the sandbox container (or a plain `ctr run`
//! container) boots the VM, the pod's other containers join it, and the VM
//! goes when the last container is deleted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use husk_runtime::config::Config;
use husk_runtime::container::mounts::{HostMount, ShareMount};
use husk_runtime::container::spec::{self, Role};
use husk_runtime::layout::in_share;
use husk_runtime::{
    Container, ContainerConfig, Error, Exit, HuskVmm, Sandbox, SandboxSpec, State, StdioConfig,
    INIT,
};

use crate::events::{self, topics, Events};

/// The task service. Clones share everything.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    events: Events,
    exit: Arc<ExitSignal>,
    /// The pod's sandbox once booted; looked up, never held across a call.
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    /// Serialises the boot of the sandbox (and its teardown) among
    /// creates only: State, Kill, Wait and the rest never take it.
    booting: Arc<tokio::sync::Mutex<()>>,
    /// The sandbox in `sandbox` was booted ahead of containerd's Create
    /// ([`Service::preboot`]) and no Create has claimed it yet.
    preboot: Mutex<Option<Preboot>>,
}

/// What a VM booted ahead of Create was booted for: the container and the
/// config file (`None`: the default one) its `start` was given.
#[derive(Debug, Clone, PartialEq)]
pub struct Preboot {
    pub id: String,
    pub config: Option<PathBuf>,
}

/// How long a VM booted ahead waits for its Create before it is stopped
/// (containerd sends Create right after `start`; a Create that comes later
/// still gets a VM, booted then).
const PREBOOT_CLAIM_WITHIN: Duration = Duration::from_secs(60);

/// Every runtime error becomes its ttrpc status here, by its own code.
fn rpc_error(e: Error) -> ttrpc::Error {
    let code = e.code();
    if code == ttrpc::Code::INTERNAL || code == ttrpc::Code::UNAVAILABLE {
        tracing::warn!(error = %e, "task call failed");
    }
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

/// The runtime's events, published to containerd.
struct Publisher(Events);

#[async_trait]
impl husk_runtime::Events for Publisher {
    async fn process_exited(&self, container_id: &str, exec_id: &str, pid: u32, exit: Exit) {
        self.0
            .publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(events::TaskExit {
                    container_id: container_id.to_string(),
                    id: if exec_id == INIT {
                        container_id
                    } else {
                        exec_id
                    }
                    .to_string(),
                    pid,
                    exit_status: exit.status,
                    exited_at: events::timestamp(exit.at),
                    ..Default::default()
                }),
            )
            .await;
    }

    async fn oom(&self, container_id: &str) {
        self.0
            .publish(
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(events::TaskOOM {
                    container_id: container_id.to_string(),
                    ..Default::default()
                }),
            )
            .await;
    }
}

/// containerd's view of a state.
fn status(state: State) -> Status {
    match state {
        State::Creating | State::Created => Status::CREATED,
        State::Starting | State::Running => Status::RUNNING,
        State::Paused => Status::PAUSED,
        State::Stopped(_) | State::Deleting(_) => Status::STOPPED,
    }
}

/// What `create` reads from the bundle.
struct Bundle {
    oci: serde_json::Value,
    annotations: std::collections::BTreeMap<String, String>,
    hostname: String,
    root_path: PathBuf,
}

fn read_bundle(id: &str, bundle: &Path) -> Result<Bundle, Error> {
    let path = bundle.join("config.json");
    let raw = std::fs::read(&path).map_err(Error::io("reading", &path))?;
    let oci: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let annotations = spec::annotations(&oci);
    let hostname = oci
        .get("hostname")
        .and_then(|h| h.as_str())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| id.chars().take(12).collect());
    let root_path = bundle.join(
        oci.get("root")
            .and_then(|r| r.get("path"))
            .and_then(|p| p.as_str())
            .unwrap_or("rootfs"),
    );
    Ok(Bundle {
        oci,
        annotations,
        hostname,
        root_path,
    })
}

/// The VM a sandbox container's bundle and the config ask for.
fn sandbox_spec(cfg: &Config, b: &Bundle) -> Result<SandboxSpec, Error> {
    Ok(SandboxSpec {
        vm: husk_runtime::VmSpec {
            share: true,
            ..cfg.vm_spec(&b.annotations)?
        },
        hostname: Some(b.hostname.clone()),
        forward_vmm_log: true,
        netns: spec::network_namespace(&b.oci),
        sysctls: spec::net_sysctls(&b.oci),
        cgroup: b
            .oci
            .pointer("/linux/cgroupsPath")
            .and_then(serde_json::Value::as_str)
            .and_then(husk_runtime::sandbox::cgroup::cgroupfs_path),
        // The pod's cgroup is the kubelet's to limit.
        cgroup_limits: None,
        template: cfg.template,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Service {
    pub fn new(events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                events,
                exit,
                sandbox: Mutex::new(None),
                booting: Arc::new(tokio::sync::Mutex::new(())),
                preboot: Mutex::new(None),
            }),
        }
    }

    /// Boots the sandbox's VM now, while containerd is still connecting and
    /// sending Create, which then finds it ready instead of waiting for the
    /// boot (or a template's restore). Called as the daemon starts for a
    /// sandbox container, with what `start` was given. Create takes this VM
    /// only when it is for the same container and config file; one that
    /// does not fit is stopped and a new one booted. A failed early boot
    /// is only logged: Create boots again and reports what fails.
    pub async fn preboot(&self, want: Preboot, bundle: PathBuf) {
        // Taken before this returns, so that no Create can boot a second VM
        // in between.
        let guard = self.inner.booting.clone().lock_owned().await;
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let booted = this.boot_ahead(&want, &bundle).await;
            match booted {
                Ok(sb) => {
                    tracing::info!(
                        sandbox = %want.id,
                        ms = started.elapsed().as_millis() as u64,
                        "VM booted ahead of Create"
                    );
                    *lock(&this.inner.preboot) = Some(want.clone());
                    this.set_current(Some(sb));
                    drop(guard);
                    tokio::time::sleep(PREBOOT_CLAIM_WITHIN).await;
                    this.stop_unclaimed(&want).await;
                }
                Err(e) => {
                    tracing::info!(sandbox = %want.id, error = %e, "no early boot: Create boots the VM");
                }
            }
        });
    }

    async fn boot_ahead(&self, want: &Preboot, bundle: &Path) -> Result<Arc<Sandbox>, Error> {
        let b = read_bundle(&want.id, bundle)?;
        if !matches!(spec::role(&b.annotations), Role::Sandbox) {
            return Err(Error::InvalidArgument("not a sandbox container".into()));
        }
        let cfg = Config::load(want.config.as_deref())?;
        cfg.check_annotations(&b.annotations)?;
        let spec = sandbox_spec(&cfg, &b)?;
        let events: Arc<dyn husk_runtime::Events> = Arc::new(Publisher(self.inner.events.clone()));
        Ok(Arc::new(
            Sandbox::boot(&want.id, &spec, &HuskVmm, events).await?,
        ))
    }

    /// Stops a VM booted ahead that no Create claimed.
    async fn stop_unclaimed(&self, want: &Preboot) {
        let _boot = self.inner.booting.lock().await;
        let claimed = {
            let mut p = lock(&self.inner.preboot);
            if p.as_ref() == Some(want) {
                *p = None;
                false
            } else {
                true
            }
        };
        if claimed {
            return;
        }
        if let Some(sb) = self.current().filter(|sb| sb.container_count() == 0) {
            tracing::warn!(sandbox = %want.id, "no Create came for the VM booted ahead: stopping it");
            self.set_current(None);
            sb.shutdown().await;
        }
    }

    async fn publish(
        &self,
        topic: &str,
        ev: Box<dyn containerd_shim_protos::protobuf::MessageDyn>,
    ) {
        self.inner.events.publish(topic, ev).await;
    }

    fn current(&self) -> Option<Arc<Sandbox>> {
        self.inner
            .sandbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_current(&self, sb: Option<Arc<Sandbox>>) {
        *self.inner.sandbox.lock().unwrap_or_else(|e| e.into_inner()) = sb;
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.current()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
            .and_then(|sb| sb.container(id))
            .map_err(rpc_error)
    }

    /// The pod's sandbox, booted for a sandbox container; whether this call
    /// booted it (or took the one booted ahead for it).
    async fn sandbox_for(
        &self,
        id: &str,
        role: &Role,
        cfg: &Config,
        cfg_path: Option<&Path>,
        b: &Bundle,
    ) -> Result<(Arc<Sandbox>, bool), Error> {
        let _boot = self.inner.booting.lock().await;
        let ahead = lock(&self.inner.preboot).take();
        if let Some(ahead) = ahead {
            let fits = matches!(role, Role::Sandbox)
                && ahead.id == id
                && ahead.config.as_deref() == cfg_path;
            match self.current() {
                Some(sb) if fits => return Ok((sb, true)),
                Some(sb) => {
                    tracing::warn!(sandbox = %ahead.id, container = id, "the VM booted ahead does not fit this Create: stopping it");
                    self.set_current(None);
                    sb.shutdown().await;
                }
                None => {}
            }
        }
        if let Some(sb) = self.current() {
            return match role {
                Role::Member { sandbox_id } if *sandbox_id == sb.id() => Ok((sb, false)),
                Role::Member { sandbox_id } => Err(Error::InvalidArgument(format!(
                    "container {id} belongs to sandbox {sandbox_id}, this shim serves {}",
                    sb.id()
                ))),
                Role::Sandbox => Err(Error::InvalidArgument(format!(
                    "this shim already serves sandbox {}; {id} is another",
                    sb.id()
                ))),
            };
        }
        // A member whose sandbox this shim has not seen (containerd grouped
        // it here by its sandbox id) gets a VM under that id.
        let vm_id = match role {
            Role::Member { sandbox_id } => sandbox_id.as_str(),
            Role::Sandbox => id,
        };
        let spec = sandbox_spec(cfg, b)?;
        let events: Arc<dyn husk_runtime::Events> = Arc::new(Publisher(self.inner.events.clone()));
        let sb = Arc::new(Sandbox::boot(vm_id, &spec, &HuskVmm, events).await?);
        self.set_current(Some(sb.clone()));
        Ok((sb, true))
    }

    async fn create_inner(&self, req: &api::CreateTaskRequest) -> Result<u32, Error> {
        let id = req.id.as_str();
        if !req.checkpoint.is_empty() {
            return Err(Error::Unsupported("restoring from a checkpoint".into()));
        }
        let b = read_bundle(id, Path::new(&req.bundle))?;
        let role = spec::role(&b.annotations);
        let cfg_path = req
            .options
            .as_ref()
            .and_then(|o| crate::options::config_path_from_options(&o.type_url, &o.value));
        let cfg = Config::load(cfg_path.as_deref())?;
        // Every container's, not only the sandbox's: io.husk.vsock is one.
        cfg.check_annotations(&b.annotations)?;
        let guest = spec::for_guest(b.oci.clone(), id)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut share_mounts = Vec::new();
        if req.rootfs.is_empty() {
            // `ctr run --rootfs DIR`: the spec names a host directory.
            share_mounts.push(ShareMount::Bind {
                source: b.root_path.clone(),
                target: in_share::rootfs(id),
                readonly: false,
            });
        } else {
            for m in &req.rootfs {
                share_mounts.push(ShareMount::Host {
                    mount: HostMount {
                        kind: m.type_.clone(),
                        source: m.source.clone(),
                        options: m.options.clone(),
                    },
                    target: in_share::rootfs(id),
                });
            }
        }
        for v in &guest.volumes {
            share_mounts.push(ShareMount::Bind {
                source: v.source.clone(),
                target: v.target.clone(),
                readonly: v.readonly,
            });
        }
        let config = ContainerConfig {
            id: id.to_string(),
            spec: guest.spec,
            share_mounts,
            stdio: StdioConfig::fifos(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            rootfs_overlay: false,
            bundle: req.bundle.clone(),
        };
        let (sb, booted) = self
            .sandbox_for(id, &role, &cfg, cfg_path.as_deref(), &b)
            .await?;
        match sb.create_container(config).await {
            Ok(c) => Ok(c.pid()),
            Err(e) => {
                if booted {
                    // The VM was for this container alone: it goes with it.
                    let _boot = self.inner.booting.lock().await;
                    if sb.container_count() == 0 {
                        self.set_current(None);
                        sb.shutdown().await;
                    }
                }
                Err(e)
            }
        }
    }

    /// Deletes a container; the VM goes after the last one.
    async fn delete_container(&self, id: &str) -> TtrpcResult<api::DeleteResponse> {
        let sb = self
            .current()
            .ok_or_else(|| rpc_error(Error::NotFound(format!("container {id}"))))?;
        let pid = sb.vmm_pid();
        let exit = sb.delete_container(id).await.map_err(rpc_error)?;
        {
            let _boot = self.inner.booting.lock().await;
            if sb.container_count() == 0 && self.current().is_some_and(|c| Arc::ptr_eq(&c, &sb)) {
                self.set_current(None);
                sb.shutdown().await;
            }
        }
        let (exit_status, at) = exit.map_or((0, SystemTime::now()), |e| (e.status, e.at));
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(events::TaskDelete {
                container_id: id.to_string(),
                id: id.to_string(),
                pid,
                exit_status,
                exited_at: events::timestamp(at),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::DeleteResponse {
            pid,
            exit_status,
            exited_at: events::timestamp(at),
            ..Default::default()
        })
    }
}

/// cgroup v2 figures from the guest, in containerd's metrics message.
fn metrics(s: &husk_agent_client::agent::StatsContainerResponse) -> v2::Metrics {
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            usage: s.memory_current,
            usage_limit: s.memory_limit,
            anon: s.memory_anon,
            file: s.memory_file,
            ..Default::default()
        }),
        memory_events: MessageField::some(v2::MemoryEvents {
            oom_kill: s.memory_oom_kill,
            ..Default::default()
        }),
        io: MessageField::some(v2::IOStat {
            usage: vec![v2::IOEntry {
                rbytes: s.io_read_bytes,
                wbytes: s.io_write_bytes,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::info!(container = %req.id, bundle = %req.bundle, terminal = req.terminal, "create");
        let pid = self.create_inner(&req).await.map_err(rpc_error)?;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(events::TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(events::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        tracing::info!(container = id, exec = exec_id, "start");
        let c = self.container(id)?;
        c.start(exec_id).await.map_err(rpc_error)?;
        let pid = c.pid();
        if exec_id == INIT {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(events::TaskStart {
                    container_id: id.to_string(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(events::TaskExecStarted {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        tracing::info!(container = id, exec = exec_id, "delete");
        if exec_id == INIT {
            return self.delete_container(id).await;
        }
        let c = self.container(id)?;
        let exit = c.delete_exec(exec_id).await.map_err(rpc_error)?;
        let (exit_status, at) = exit.map_or((0, SystemTime::now()), |e| (e.status, e.at));
        Ok(api::DeleteResponse {
            pid: c.pid(),
            exit_status,
            exited_at: events::timestamp(at),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = self.container(&req.id)?.pids().await.map_err(rpc_error)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.container(&req.id)?.pause().await.map_err(rpc_error)?;
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(events::TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.container(&req.id)?.resume().await.map_err(rpc_error)?;
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(events::TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(rpc_error(Error::Unsupported(
            "checkpoint (a micro-VM's containers cannot be checkpointed with CRIU from the host)"
                .into(),
        )))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        tracing::info!(
            container = id,
            exec = exec_id,
            signal = req.signal,
            all = req.all,
            "kill"
        );
        self.container(id)?
            .kill(exec_id, req.signal, req.all)
            .await
            .map_err(rpc_error)?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        tracing::info!(
            container = id,
            exec = exec_id,
            terminal = req.terminal,
            "exec"
        );
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        self.container(id)?
            .add_exec(
                exec_id,
                spec,
                StdioConfig::fifos(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            )
            .map_err(rpc_error)?;
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(events::TaskExecAdded {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.container(&req.id)?
            .resize(&req.exec_id, req.height, req.width)
            .await
            .map_err(rpc_error)?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.container(&req.id)?
                .close_stdin(&req.exec_id)
                .await
                .map_err(rpc_error)?;
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        // containerd sends linux.resources as JSON inside the Any.
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        self.container(&req.id)?
            .update(resources)
            .await
            .map_err(rpc_error)?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let p = self
            .container(&req.id)?
            .process(&req.exec_id)
            .map_err(rpc_error)?;
        let exit = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: events::timestamp(exit.at),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let s = self.container(&req.id)?.stats().await.map_err(rpc_error)?;
        let value = metrics(&s)
            .write_to_bytes()
            .map_err(|e| rpc_error(Error::InvalidArgument(format!("encoding metrics: {e}"))))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: "io.containerd.cgroups.v2.Metrics".into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id).map_err(rpc_error)?;
        let mut state = p.state();
        // An exec of a paused container is paused too.
        if matches!(state, State::Running) && matches!(c.state(), State::Paused) {
            state = State::Paused;
        }
        let exit = state.exit();
        let io = p.stdio();
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: c.bundle().to_string(),
            pid: c.pid(),
            status: status(state).into(),
            stdin: io.stdin.path_string(),
            stdout: io.stdout.path_string(),
            stderr: io.stderr.path_string(),
            terminal: io.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map_or(MessageField::none(), |e| events::timestamp(e.at)),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.container(&req.id).map(|c| c.pid()).unwrap_or_default();
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let _boot = self.inner.booting.lock().await;
        if let Some(sb) = self.current() {
            if sb.container_count() > 0 {
                tracing::debug!(left = sb.container_count(), "shutdown: containers remain");
                return Ok(api::Empty::new());
            }
            self.set_current(None);
            sb.shutdown().await;
        }
        tracing::info!("no container left; exiting");
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_errors_keep_their_codes_for_containerd() {
        for (e, code) in [
            (Error::NotFound("c".into()), ttrpc::Code::NOT_FOUND),
            (
                Error::FailedPrecondition("running".into()),
                ttrpc::Code::FAILED_PRECONDITION,
            ),
            (Error::Unsupported("x".into()), ttrpc::Code::UNIMPLEMENTED),
        ] {
            match rpc_error(e) {
                ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), code),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn states_map_to_containerds() {
        assert_eq!(status(State::Creating), Status::CREATED);
        assert_eq!(status(State::Starting), Status::RUNNING);
        assert_eq!(status(State::Paused), Status::PAUSED);
        assert_eq!(status(State::Stopped(Exit::now(0))), Status::STOPPED);
    }
}
