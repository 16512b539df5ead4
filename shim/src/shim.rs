//! The shim binary's lifecycle actions (containerd runtime v2):
//! `start` finds or spawns the pod's shim daemon and prints its address;
//! `delete` cleans up after a shim that is gone; the daemon itself serves
//! the task API until Shutdown finds no container left.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::{ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use husk_runtime::container::{
    mounts,
    spec::{self, Role},
};
use husk_runtime::hypervisor::{HuskVmm, VmProcess};
use husk_runtime::layout::{PidFile, ProcessId, SandboxLayout};
use husk_runtime::sandbox::stale;

use crate::events::{self, Events};
use crate::task::{Preboot, Service};

/// Set for a daemon spawned for a sandbox container: boot its VM at once
/// (the value: the config file containerd's runtime options name, empty
/// for the default). See [`Service::preboot`].
const PREBOOT_ENV: &str = "HUSK_SHIM_PREBOOT";

pub struct HuskShim {
    id: String,
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for HuskShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        HuskShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        start(&opts, &self.bundle)
            .await
            .map_err(|e| Error::Other(format!("{e:#}")))
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        cleanup(&self.id, &self.bundle)
            .await
            .map_err(|e| Error::Other(format!("{e:#}")))?;
        Ok(DeleteResponse {
            pid: 0,
            // What runc's shim reports for a task it had to reap: SIGKILL.
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: events::timestamp(SystemTime::now()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        tracing::info!(id = %self.id, namespace = %self.namespace, pid = std::process::id(), "shim serving");
        let service = Service::new(Events::new(publisher, &self.namespace), self.exit.clone());
        if let Some(config) = std::env::var_os(PREBOOT_ENV) {
            let want = Preboot {
                id: self.id.clone(),
                config: (!config.is_empty()).then(|| PathBuf::from(config)),
            };
            service.preboot(want, self.bundle.clone()).await;
        }
        service
    }
}

/// The role of the container in `bundle` (its config.json's annotations);
/// a bundle without a readable spec is its own sandbox.
fn role_of(bundle: &Path) -> Role {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|v| spec::role(&spec::annotations(&v)))
        .unwrap_or(Role::Sandbox)
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

async fn socket_alive(address: &str) -> bool {
    tokio::net::UnixStream::connect(socket_path(address))
        .await
        .is_ok()
}

/// `start`: one shim per pod. A container of a pod whose shim runs gets
/// that shim's address; otherwise a daemon is spawned on a socket named
/// after the pod (or the container, for a plain `ctr run`).
async fn start(opts: &StartOpts, bundle: &Path) -> Result<String> {
    let (grouping, sandbox) = match role_of(bundle) {
        Role::Member { sandbox_id } => (sandbox_id, false),
        Role::Sandbox => (opts.id.clone(), true),
    };
    let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
    if !socket_alive(&address).await {
        // A socket file nobody answers on is a dead shim's: take its place.
        let _ = std::fs::remove_file(socket_path(&address));
        // Only a sandbox's new daemon boots ahead; only it needs the options.
        let preboot = if sandbox {
            Some(start_config().await)
        } else {
            None
        };
        spawn_daemon(opts, &address, bundle, preboot).await?;
    }
    std::fs::write(bundle.join("address"), &address)
        .with_context(|| format!("writing {}/address", bundle.display()))?;
    Ok(address)
}

/// The config file named by the runtime options containerd writes to
/// `start`'s stdin (the `Any` that Create carries too); empty for the
/// default. Bounded in size and time: stdin is containerd's pipe, or
/// /dev/null when there are no options.
async fn start_config() -> std::ffi::OsString {
    use containerd_shim_protos::protobuf::{well_known_types::any::Any, Message};
    use std::io::{IsTerminal, Read};
    // Run by hand: nothing is coming.
    if std::io::stdin().is_terminal() {
        return Default::default();
    }
    // A thread of its own, left behind if the read hangs: tokio's stdin
    // would hold up the runtime's shutdown instead.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut raw = Vec::new();
        let read = std::io::stdin().lock().take(1 << 20).read_to_end(&mut raw);
        let _ = tx.send(read.map(|_| raw));
    });
    let Ok(Ok(Ok(raw))) = tokio::time::timeout(Duration::from_secs(1), rx).await else {
        return Default::default();
    };
    Any::parse_from_bytes(&raw)
        .ok()
        .and_then(|any| crate::options::config_path_from_options(&any.type_url, &any.value))
        .map(PathBuf::into_os_string)
        .unwrap_or_default()
}

/// Starts the serving daemon and waits until it listens (it closes its
/// stdout then). `preboot`: boot the VM as it starts, with this config
/// file (empty: the default).
async fn spawn_daemon(
    opts: &StartOpts,
    address: &str,
    bundle: &Path,
    preboot: Option<std::ffi::OsString>,
) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let exe = std::env::current_exe().context("finding the shim binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.current_dir(bundle)
        .args([
            "-namespace",
            &opts.namespace,
            "-id",
            &opts.id,
            "-address",
            &opts.address,
        ])
        .args(["-socket", address])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // Its own process group: signals meant for containerd's group (a
        // Ctrl-C on a foreground containerd) must not reach the pod.
        .process_group(0);
    if opts.debug {
        cmd.arg("-debug");
    }
    match preboot {
        Some(config) => cmd.env(PREBOOT_ENV, config),
        None => cmd.env_remove(PREBOOT_ENV),
    };
    let mut child = cmd.spawn().context("spawning the shim daemon")?;
    if let Some(pid) = child.id() {
        adjust_oom_score(pid);
    }
    let mut out = child.stdout.take().context("daemon stdout")?;
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), out.read_to_end(&mut sink))
        .await
        .context("the shim daemon did not start listening within 30 s")?
        .context("reading the daemon's stdout")?;
    if let Ok(Some(status)) = child.try_wait() {
        if !status.success() {
            anyhow::bail!("the shim daemon exited: {status}");
        }
    }
    // The daemon lives on by itself; tokio must not kill it on drop.
    drop(child);
    Ok(())
}

/// The daemon is killed before containerd under memory pressure, never the
/// other way round (containerd's own rule for shims).
fn adjust_oom_score(pid: u32) {
    let parent = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(0);
    let _ = std::fs::write(
        format!("/proc/{pid}/oom_score_adj"),
        (parent + 1).min(1000).to_string(),
    );
}

/// `delete`: idempotent cleanup for container `id`. In a pod whose shim
/// still runs only this container's share directory goes; when the shim is
/// gone, its VM, every mount in the share and /run/husk/<sandbox> go too.
async fn cleanup(id: &str, bundle: &Path) -> Result<()> {
    let sandbox_id = match role_of(bundle) {
        Role::Member { sandbox_id } => sandbox_id,
        Role::Sandbox => id.to_string(),
    };
    let layout = SandboxLayout::new(&sandbox_id)?;
    let pids = PidFile::read(&layout.pid_file());
    let me = ProcessId::current();
    let shim_alive = pids.is_some_and(|p| Some(p.owner) != me && p.owner.is_alive());
    if shim_alive {
        let cdir = layout.container_dir(id);
        mounts::unmount_below(&cdir)?;
        let _ = std::fs::remove_dir_all(&cdir);
        tracing::info!(container = id, sandbox = %sandbox_id, "cleaned one container of a live pod");
        return Ok(());
    }
    // The VMM of a dead shim: found by its recorded identity, killed
    // through a pidfd (a recycled pid is never signalled).
    if let Some(vm) = HuskVmm::open(&layout) {
        tracing::warn!(sandbox = %sandbox_id, pid = vm.pid(), "killing the VM of a dead shim");
        vm.kill();
        let _ = tokio::time::timeout(Duration::from_secs(2), vm.wait()).await;
    }
    if !stale::remove(&layout) {
        anyhow::bail!("{}: mounts remain below it", layout.dir().display());
    }
    if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
        if !socket_alive(address.trim()).await {
            let _ = std::fs::remove_file(socket_path(address.trim()));
        }
    }
    tracing::info!(container = id, sandbox = %sandbox_id, "cleaned up after the shim");
    Ok(())
}
