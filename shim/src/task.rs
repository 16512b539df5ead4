//! The shim v2 task service: containerd's Task API on top of the agent's.
//!
//! One shim serves one pod: the sandbox container (or a plain `ctr run`
//! container) boots the VM, the pod's other containers join it, and the VM
//! goes when the last container is deleted. Containers and their processes
//! are kept here; the guest is asked for everything it alone knows (pids,
//! stats, exit statuses).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use husk_agent_client::ClientError;
use tokio::sync::{watch, Mutex};

use crate::config::{self, Config};
use crate::events::{self, topics, Events};
use crate::io::{Relays, Stdio};
use crate::mounts::{self, HostMount};
use crate::sandbox::{self, Sandbox};
use crate::spec::{self, Role};

/// How long an exited process's output may take to reach the FIFOs.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Exit {
    status: u32,
    at: SystemTime,
}

struct Process {
    stdio: Stdio,
    /// An exec's OCI `process` (JSON); None for the init process.
    exec_spec: Option<Vec<u8>>,
    status: Status,
    exit: watch::Sender<Option<Exit>>,
    relays: Relays,
}

impl Process {
    fn new(stdio: Stdio, exec_spec: Option<Vec<u8>>) -> Self {
        Self {
            stdio,
            exec_spec,
            status: Status::CREATED,
            exit: watch::channel(None).0,
            relays: Relays::default(),
        }
    }
    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

struct Container {
    bundle: String,
    sandbox: Arc<Sandbox>,
    /// <share>/<id>: rootfs and volumes, unmounted on delete.
    dir: PathBuf,
    /// "" is the init process.
    processes: HashMap<String, Process>,
    paused: bool,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    sandbox: Option<Arc<Sandbox>>,
}

/// The task service. Clones share everything.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    events: Events,
    exit: Arc<ExitSignal>,
    state: Mutex<State>,
}

fn status(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}
fn not_found(what: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("{what}: not found"))
}
fn internal(e: anyhow::Error) -> ttrpc::Error {
    tracing::warn!(error = %format!("{e:#}"), "task call failed");
    status(Code::INTERNAL, format!("{e:#}"))
}
/// An agent refusal keeps its code (NOT_FOUND stays NOT_FOUND for containerd).
fn agent(call: &str, e: ClientError) -> ttrpc::Error {
    match e {
        ClientError::Rpc { code, message, .. } => status(code, format!("{call}: {message}")),
        other => internal(anyhow::Error::from(other).context(call.to_string())),
    }
}

fn exec_key(exec_id: &str) -> &str {
    exec_id
}

impl Service {
    pub fn new(events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                events,
                exit,
                state: Mutex::new(State::default()),
            }),
        }
    }

    async fn publish(
        &self,
        topic: &str,
        ev: Box<dyn containerd_shim_protos::protobuf::MessageDyn>,
    ) {
        self.inner.events.publish(topic, ev).await;
    }

    /// The pod's VM, booting it for a sandbox container.
    async fn sandbox_for(
        &self,
        state: &mut State,
        id: &str,
        role: &Role,
        cfg: &Config,
        annotations: &std::collections::BTreeMap<String, String>,
        hostname: &str,
    ) -> Result<(Arc<Sandbox>, bool)> {
        if let Some(sb) = &state.sandbox {
            if let Role::Member { sandbox_id } = role {
                if *sandbox_id != sb.id {
                    anyhow::bail!(
                        "container {id} belongs to sandbox {sandbox_id}, this shim serves {}",
                        sb.id
                    );
                }
                return Ok((sb.clone(), false));
            }
            anyhow::bail!(
                "this shim already serves sandbox {}; {id} is another",
                sb.id
            );
        }
        // A member whose sandbox this shim has not seen (containerd grouped
        // it here by its sandbox id) gets a VM under that id.
        let vm_id = match role {
            Role::Member { sandbox_id } => sandbox_id.as_str(),
            Role::Sandbox => id,
        };
        let sb = Arc::new(
            Sandbox::boot(vm_id, cfg, annotations, hostname, self.inner.events.clone()).await?,
        );
        state.sandbox = Some(sb.clone());
        Ok((sb, true))
    }

    async fn create_inner(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        let id = req.id.as_str();
        if !req.checkpoint.is_empty() {
            anyhow::bail!("restoring from a checkpoint is not supported by husk");
        }
        let bundle = PathBuf::from(&req.bundle);
        let raw = std::fs::read(bundle.join("config.json"))
            .with_context(|| format!("reading {}/config.json", bundle.display()))?;
        let oci: serde_json::Value = serde_json::from_slice(&raw).context("config.json")?;
        let annotations = spec::annotations(&oci);
        let role = spec::role(&annotations);
        let cfg_path = req
            .options
            .as_ref()
            .and_then(|o| config::config_path_from_options(&o.type_url, &o.value));
        let cfg = Config::load(cfg_path.as_deref())?;
        let hostname = oci
            .get("hostname")
            .and_then(|h| h.as_str())
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| id.chars().take(12).collect());
        let root_path = oci
            .get("root")
            .and_then(|r| r.get("path"))
            .and_then(|p| p.as_str())
            .unwrap_or("rootfs")
            .to_string();

        let mut state = self.inner.state.lock().await;
        if state.containers.contains_key(id) {
            anyhow::bail!("container {id} exists already");
        }
        let (sb, booted) = self
            .sandbox_for(&mut state, id, &role, &cfg, &annotations, &hostname)
            .await?;
        let dir = sandbox::container_dir(&sb.dir, id);
        let made = self
            .prepare_and_create(&sb, id, &dir, req, oci, &bundle, &root_path)
            .await;
        let relays = match made {
            Ok(r) => r,
            Err(e) => {
                let _ = mounts::unmount_below(&dir);
                let _ = std::fs::remove_dir_all(&dir);
                if booted {
                    sb.shutdown().await;
                    state.sandbox = None;
                }
                return Err(e);
            }
        };
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut init = Process::new(stdio, None);
        init.relays = relays;
        let mut processes = HashMap::new();
        processes.insert(String::new(), init);
        state.containers.insert(
            id.to_string(),
            Container {
                bundle: req.bundle.clone(),
                sandbox: sb.clone(),
                dir,
                processes,
                paused: false,
            },
        );
        Ok(sb.vmm_pid)
    }

    /// Mounts the rootfs and volumes into the share, creates the container
    /// in the guest and attaches its stdio.
    #[allow(clippy::too_many_arguments)]
    async fn prepare_and_create(
        &self,
        sb: &Sandbox,
        id: &str,
        dir: &Path,
        req: &api::CreateTaskRequest,
        oci: serde_json::Value,
        bundle: &Path,
        root_path: &str,
    ) -> Result<Relays> {
        let rootfs = sb.share().join(spec::rootfs_in_share(id));
        if req.rootfs.is_empty() {
            // `ctr run --rootfs DIR`: the spec names a host directory.
            let host_root = bundle.join(root_path);
            mounts::bind(&host_root, &rootfs, false)?;
        } else {
            for m in &req.rootfs {
                let hm = HostMount {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                };
                mounts::mount_one(&hm, &rootfs)?;
            }
        }
        let guest = spec::for_guest(oci, id)?;
        for v in &guest.volumes {
            mounts::bind(&v.source, &sb.share().join(&v.target), v.readonly)?;
        }
        tracing::debug!(container = id, dir = %dir.display(), "rootfs and volumes in the share");
        sb.client
            .create_container(id, serde_json::to_vec(&guest.spec)?, !req.stdin.is_empty())
            .await
            .context("CreateContainer")?;
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        match Relays::attach(&sb.client, id, "", &stdio).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let _ = sb.client.remove_container(id).await;
                Err(e)
            }
        }
    }

    /// Waits for a started process, then records and publishes its exit.
    fn watch_exit(&self, sb: Arc<Sandbox>, id: String, exec_id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let code = match sb.client.wait_process(&id, &exec_id).await {
                Ok(c) => c.max(0) as u32,
                Err(e) => {
                    // The VM or the agent went away: the process is gone with it.
                    tracing::warn!(container = %id, exec = %exec_id, error = %e, "WaitProcess failed; reporting SIGKILL");
                    128 + libc::SIGKILL as u32
                }
            };
            this.record_exit(&id, &exec_id, code).await;
        });
    }

    async fn record_exit(&self, id: &str, exec_id: &str, code: u32) {
        let outputs = {
            let mut state = self.inner.state.lock().await;
            let Some(p) = state
                .containers
                .get_mut(id)
                .and_then(|c| c.processes.get_mut(exec_id))
            else {
                return;
            };
            p.relays.take_outputs()
        };
        crate::io::drain(outputs, DRAIN_LIMIT).await;
        let exit = Exit {
            status: code,
            at: SystemTime::now(),
        };
        let pid = {
            let mut state = self.inner.state.lock().await;
            let Some(c) = state.containers.get_mut(id) else {
                return;
            };
            let pid = c.sandbox.vmm_pid;
            let Some(p) = c.processes.get_mut(exec_id) else {
                return;
            };
            if p.exited().is_some() {
                return;
            }
            p.status = Status::STOPPED;
            p.relays.close_stdin();
            p.exit.send_replace(Some(exit));
            pid
        };
        tracing::info!(
            container = id,
            exec = exec_id,
            status = code,
            "process exited"
        );
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(events::TaskExit {
                container_id: id.to_string(),
                id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
                pid,
                exit_status: code,
                exited_at: events::timestamp(exit.at),
                ..Default::default()
            }),
        )
        .await;
    }

    /// Removes a container everywhere: guest, share, our table; shuts the
    /// VM down after the last one.
    async fn delete_container(&self, id: &str) -> TtrpcResult<api::DeleteResponse> {
        let mut state = self.inner.state.lock().await;
        let c = state
            .containers
            .get(id)
            .ok_or_else(|| not_found(format!("container {id}")))?;
        let init = c
            .processes
            .get("")
            .expect("a container has its init process");
        if matches!(init.status, Status::RUNNING) || c.paused {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {id} is running; kill it first"),
            ));
        }
        let mut c = state.containers.remove(id).expect("looked up above");
        let exit = c.processes.get("").and_then(|p| p.exited());
        if let Err(e) = c.sandbox.client.remove_container(id).await {
            // Gone already, or the VM is: nothing left in the guest either way.
            tracing::info!(container = id, error = %e, "RemoveContainer");
        }
        for p in c.processes.values_mut() {
            p.relays.close_stdin();
        }
        if let Err(e) = mounts::unmount_below(&c.dir) {
            tracing::warn!(container = id, error = %e, "unmounting");
        }
        let _ = std::fs::remove_dir_all(&c.dir);
        let pid = c.sandbox.vmm_pid;
        if state.containers.is_empty() {
            if let Some(sb) = state.sandbox.take() {
                sb.shutdown().await;
            }
        }
        drop(state);
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

    async fn client_of(&self, id: &str) -> TtrpcResult<(Arc<Sandbox>, u32)> {
        let state = self.inner.state.lock().await;
        let c = state
            .containers
            .get(id)
            .ok_or_else(|| not_found(format!("container {id}")))?;
        Ok((c.sandbox.clone(), c.sandbox.vmm_pid))
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
        let pid = self.create_inner(&req).await.map_err(internal)?;
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
        let (sb, pid) = self.client_of(id).await?;
        if exec_id.is_empty() {
            {
                let state = self.inner.state.lock().await;
                let p = &state.containers[id].processes[""];
                if !matches!(p.status, Status::CREATED) {
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("container {id} was started already"),
                    ));
                }
            }
            sb.client
                .start_container(id)
                .await
                .map_err(|e| agent("StartContainer", e))?;
        } else {
            let (stdio, spec) = {
                let state = self.inner.state.lock().await;
                let p = state.containers[id]
                    .processes
                    .get(exec_id)
                    .ok_or_else(|| not_found(format!("exec {exec_id} in {id}")))?;
                if !matches!(p.status, Status::CREATED) {
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("exec {exec_id} was started already"),
                    ));
                }
                (p.stdio.clone(), p.exec_spec.clone().unwrap_or_default())
            };
            let relays = Relays::attach(&sb.client, id, exec_id, &stdio)
                .await
                .map_err(internal)?;
            sb.client
                .exec_process(id, exec_id, spec, !stdio.stdin.is_empty())
                .await
                .map_err(|e| agent("ExecProcess", e))?;
            let mut state = self.inner.state.lock().await;
            if let Some(p) = state
                .containers
                .get_mut(id)
                .and_then(|c| c.processes.get_mut(exec_id))
            {
                p.relays = relays;
            }
        }
        {
            let mut state = self.inner.state.lock().await;
            if let Some(p) = state
                .containers
                .get_mut(id)
                .and_then(|c| c.processes.get_mut(exec_key(exec_id)))
            {
                p.status = Status::RUNNING;
            }
        }
        self.watch_exit(sb, id.to_string(), exec_id.to_string());
        if exec_id.is_empty() {
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
        if exec_id.is_empty() {
            return self.delete_container(id).await;
        }
        let mut state = self.inner.state.lock().await;
        let c = state
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found(format!("container {id}")))?;
        let pid = c.sandbox.vmm_pid;
        let p = c
            .processes
            .get(exec_id)
            .ok_or_else(|| not_found(format!("exec {exec_id} in {id}")))?;
        if matches!(p.status, Status::RUNNING) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("exec {exec_id} is running"),
            ));
        }
        let exit = p.exited();
        let started = !matches!(p.status, Status::CREATED);
        c.processes.remove(exec_id);
        let sandbox = c.sandbox.clone();
        drop(state);
        if started {
            // The agent keeps an ended exec until told: free its id there.
            if let Err(e) = sandbox.client.remove_process(id, exec_id).await {
                tracing::info!(container = id, exec = exec_id, error = %e, "RemoveProcess");
            }
        }
        let (exit_status, at) = exit.map_or((0, SystemTime::now()), |e| (e.status, e.at));
        Ok(api::DeleteResponse {
            pid,
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
        let (sb, _) = self.client_of(&req.id).await?;
        let pids = sb
            .client
            .list_processes(&req.id)
            .await
            .map_err(|e| agent("ListProcesses", e))?;
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
        let (sb, _) = self.client_of(&req.id).await?;
        sb.client
            .pause(&req.id)
            .await
            .map_err(|e| agent("PauseContainer", e))?;
        if let Some(c) = self.inner.state.lock().await.containers.get_mut(&req.id) {
            c.paused = true;
        }
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
        let (sb, _) = self.client_of(&req.id).await?;
        sb.client
            .resume(&req.id)
            .await
            .map_err(|e| agent("ResumeContainer", e))?;
        if let Some(c) = self.inner.state.lock().await.containers.get_mut(&req.id) {
            c.paused = false;
        }
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
        Err(status(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by husk: a micro-VM's containers cannot be checkpointed with CRIU from the host",
        ))
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
        let (sb, targets, never_started) = {
            let state = self.inner.state.lock().await;
            let c = state
                .containers
                .get(id)
                .ok_or_else(|| not_found(format!("container {id}")))?;
            let p = c
                .processes
                .get(exec_id)
                .ok_or_else(|| not_found(format!("process {exec_id} in {id}")))?;
            if p.exited().is_some() {
                return Err(not_found(format!(
                    "process {id}/{exec_id} already finished"
                )));
            }
            let mut targets = vec![exec_id.to_string()];
            if req.all && exec_id.is_empty() {
                targets.extend(
                    c.processes
                        .iter()
                        .filter(|(k, p)| !k.is_empty() && matches!(p.status, Status::RUNNING))
                        .map(|(k, _)| k.clone()),
                );
            }
            (
                c.sandbox.clone(),
                targets,
                matches!(p.status, Status::CREATED),
            )
        };
        if never_started {
            // Nothing runs yet: the "process" ends here, as runc's would.
            self.record_exit(id, exec_id, 128 + req.signal).await;
            return Ok(api::Empty::new());
        }
        for t in targets {
            if let Err(e) = sb.client.signal_process(id, &t, req.signal as i32).await {
                if t == exec_id {
                    return Err(agent("SignalProcess", e));
                }
            }
        }
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
        if exec_id.is_empty() || exec_id == "-" {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "an exec needs an id other than \"\" and \"-\"",
            ));
        }
        {
            let mut state = self.inner.state.lock().await;
            let c = state
                .containers
                .get_mut(id)
                .ok_or_else(|| not_found(format!("container {id}")))?;
            if c.processes.contains_key(exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {exec_id} exists in {id}"),
                ));
            }
            let spec = req
                .spec
                .as_ref()
                .map(|a| a.value.clone())
                .unwrap_or_default();
            let stdio = Stdio {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            c.processes
                .insert(exec_id.to_string(), Process::new(stdio, Some(spec)));
        }
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
        let (sb, _) = self.client_of(&req.id).await?;
        sb.client
            .tty_resize(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(|e| agent("TtyWinResize", e))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        let sb = {
            let mut state = self.inner.state.lock().await;
            let c = state
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            if let Some(p) = c.processes.get_mut(&req.exec_id) {
                p.relays.close_stdin();
            }
            c.sandbox.clone()
        };
        if let Err(e) = sb.client.close_stdin(&req.id, &req.exec_id).await {
            tracing::debug!(error = %e, "CloseStdin");
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let (sb, _) = self.client_of(&req.id).await?;
        // containerd sends linux.resources as JSON inside the Any.
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        sb.client
            .update(&req.id, resources)
            .await
            .map_err(|e| agent("UpdateContainer", e))?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let state = self.inner.state.lock().await;
            let c = state
                .containers
                .get(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            c.processes
                .get(&req.exec_id)
                .ok_or_else(|| not_found(format!("process {}/{}", req.id, req.exec_id)))?
                .exit
                .subscribe()
        };
        let exit = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(not_found(format!(
                    "process {}/{} went away",
                    req.id, req.exec_id
                )));
            }
        };
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
        let (sb, _) = self.client_of(&req.id).await?;
        let s = sb
            .client
            .stats(&req.id)
            .await
            .map_err(|e| agent("StatsContainer", e))?;
        let m = metrics(&s);
        let value = m.write_to_bytes().map_err(|e| internal(e.into()))?;
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
        let state = self.inner.state.lock().await;
        let c = state
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found(format!("container {}", req.id)))?;
        let p = c
            .processes
            .get(&req.exec_id)
            .ok_or_else(|| not_found(format!("process {}/{}", req.id, req.exec_id)))?;
        let st = match (p.status, c.paused) {
            (Status::RUNNING, true) => Status::PAUSED,
            (s, _) => s,
        };
        let exit = p.exited();
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: c.bundle.clone(),
            pid: c.sandbox.vmm_pid,
            status: st.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
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
        let state = self.inner.state.lock().await;
        let task_pid = state
            .containers
            .get(&req.id)
            .map(|c| c.sandbox.vmm_pid)
            .unwrap_or_default();
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
        let mut state = self.inner.state.lock().await;
        if !state.containers.is_empty() {
            tracing::debug!(left = state.containers.len(), "shutdown: containers remain");
            return Ok(api::Empty::new());
        }
        if let Some(sb) = state.sandbox.take() {
            sb.shutdown().await;
        }
        tracing::info!("no container left; exiting");
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}
