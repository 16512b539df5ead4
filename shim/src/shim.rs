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
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::events::{self, Events};
use crate::mounts;
use crate::sandbox;
use crate::spec::{self, Role};
use crate::task::Service;

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
        Service::new(Events::new(publisher, &self.namespace), self.exit.clone())
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
    let grouping = match role_of(bundle) {
        Role::Member { sandbox_id } => sandbox_id,
        Role::Sandbox => opts.id.clone(),
    };
    let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
    if !socket_alive(&address).await {
        // A socket file nobody answers on is a dead shim's: take its place.
        let _ = std::fs::remove_file(socket_path(&address));
        spawn_daemon(opts, &address, bundle).await?;
    }
    std::fs::write(bundle.join("address"), &address)
        .with_context(|| format!("writing {}/address", bundle.display()))?;
    Ok(address)
}

/// Starts the serving daemon and waits until it listens (it closes its
/// stdout then).
async fn spawn_daemon(opts: &StartOpts, address: &str, bundle: &Path) -> Result<()> {
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

fn alive(pid: i32) -> bool {
    pid > 0 && kill(Pid::from_raw(pid), None).is_ok()
}

/// (husk-vmm pid, owning shim pid) from /run/husk/<id>/pid.
fn vm_pids(dir: &Path) -> Option<(i32, i32)> {
    let text = std::fs::read_to_string(dir.join("pid")).ok()?;
    let mut it = text.lines().map(|l| l.trim().parse::<i32>().unwrap_or(0));
    Some((it.next()?, it.next().unwrap_or(0)))
}

/// `delete`: idempotent cleanup for container `id`. In a pod whose shim
/// still runs only this container's share directory goes; when the shim is
/// gone, its VM, every mount in the share and /run/husk/<sandbox> go too.
async fn cleanup(id: &str, bundle: &Path) -> Result<()> {
    let sandbox_id = match role_of(bundle) {
        Role::Member { sandbox_id } => sandbox_id,
        Role::Sandbox => id.to_string(),
    };
    let dir = sandbox::runtime_dir(&sandbox_id);
    let pids = vm_pids(&dir);
    let shim_alive =
        pids.is_some_and(|(_, owner)| owner != std::process::id() as i32 && alive(owner));
    if shim_alive {
        let cdir = sandbox::container_dir(&dir, id);
        mounts::unmount_below(&cdir)?;
        let _ = std::fs::remove_dir_all(&cdir);
        tracing::info!(container = id, sandbox = %sandbox_id, "cleaned one container of a live pod");
        return Ok(());
    }
    if let Some((vmm, _)) = pids {
        if alive(vmm) {
            tracing::warn!(sandbox = %sandbox_id, vmm, "killing the VM of a dead shim");
            let _ = kill(Pid::from_raw(vmm), Signal::SIGKILL);
            for _ in 0..100 {
                if !alive(vmm) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // Mounts first: removing the directory must never walk into a rootfs.
    mounts::unmount_below(&dir)?;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
    }
    if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
        if !socket_alive(address.trim()).await {
            let _ = std::fs::remove_file(socket_path(address.trim()));
        }
    }
    tracing::info!(container = id, sandbox = %sandbox_id, "cleaned up after the shim");
    Ok(())
}
