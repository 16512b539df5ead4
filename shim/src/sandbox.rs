//! One pod's VM: booted for the sandbox container (or a plain `ctr run`
//! container), shared by the pod's containers, shut down when the last one
//! is deleted.
//!
//! Lifetime: husk-vmm is a child of the shim daemon, booted without
//! `detach`, so it gets PR_SET_PDEATHSIG(SIGKILL). The shim daemon is the
//! long-lived process of the pod (containerd's `start` invocation exits at
//! once, but it only spawns the daemon, which then boots VMs itself), so a
//! shim that is SIGKILLed or crashes takes its VM with it; what remains
//! (mounts, /run/husk/<id>) is removed by `containerd-shim-husk-v2 delete`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use husk_agent_client::agent::CreateSandboxRequest;
use husk_agent_client::Client;
use husk_tools::vm::{Vm, VmSpec};
use tokio::task::JoinHandle;

use crate::config::{self, Config};
use crate::events::{topics, Events, TaskOOM};
use crate::mounts;

/// virtio-fs tag of the share and where the agent mounts it in the guest.
pub const SHARE_TAG: &str = "husk-share";
pub const GUEST_SHARE: &str = "/run/husk/share";

pub struct Sandbox {
    pub id: String,
    /// /run/husk/<id>
    pub dir: PathBuf,
    pub client: Client,
    pub vmm_pid: u32,
    vm: tokio::sync::Mutex<Option<Vm>>,
    helpers: Vec<JoinHandle<()>>,
}

/// The VM size for a pod: config defaults, overridden by pod annotations.
pub fn vm_size(
    cfg: &Config,
    annotations: &std::collections::BTreeMap<String, String>,
) -> (u32, u32) {
    let cpus = annotations
        .get(config::ANNOTATION_CPUS)
        .and_then(|v| config::parse_cpus(v))
        .unwrap_or(cfg.vcpus);
    let mem = annotations
        .get(config::ANNOTATION_MEMORY)
        .and_then(|v| config::parse_memory_mib(v))
        .unwrap_or(cfg.memory_mib);
    (cpus, mem)
}

impl Sandbox {
    /// Boots the VM and creates the sandbox in the guest. On failure nothing
    /// is left: the VM is killed and its directory removed.
    pub async fn boot(
        id: &str,
        cfg: &Config,
        annotations: &std::collections::BTreeMap<String, String>,
        hostname: &str,
        events: Events,
    ) -> Result<Sandbox> {
        let (vcpus, memory_mib) = vm_size(cfg, annotations);
        let spec = VmSpec {
            kernel: cfg.kernel.clone(),
            initramfs: cfg.initramfs.clone(),
            vcpus,
            memory_mib,
            boot_timeout: Duration::from_secs(cfg.boot_timeout_secs),
            detach: false,
            id: Some(id.to_string()),
            share: true,
            vmm: cfg.vmm.clone(),
            ..VmSpec::default()
        };
        let started = std::time::Instant::now();
        let vm = Vm::boot(&spec).await.context("booting the sandbox VM")?;
        tracing::info!(
            sandbox = id,
            vcpus,
            memory_mib,
            ms = started.elapsed().as_millis() as u64,
            "VM ready"
        );
        let client = vm.client.clone();
        let dir = vm.dir.clone();
        let vmm_pid = vm.vmm_pid.as_raw() as u32;
        if let Err(e) = client
            .create_sandbox(CreateSandboxRequest {
                sandbox_id: id.to_string(),
                hostname: hostname.to_string(),
                shared_fs_tag: SHARE_TAG.into(),
                shared_mount_point: GUEST_SHARE.into(),
                ..Default::default()
            })
            .await
        {
            drop(vm);
            return Err(anyhow::Error::from(e).context("CreateSandbox"));
        }
        let helpers = vec![
            tokio::spawn(forward_vmm_log(dir.join("vmm.log"), id.to_string())),
            tokio::spawn(watch_oom(client.clone(), events)),
        ];
        Ok(Sandbox {
            id: id.to_string(),
            dir,
            client,
            vmm_pid,
            vm: tokio::sync::Mutex::new(Some(vm)),
            helpers,
        })
    }

    /// The share on the host.
    pub fn share(&self) -> PathBuf {
        Vm::shared_dir(&self.dir)
    }

    /// Unmounts everything in the share, shuts the guest down (kills
    /// husk-vmm if it does not stop) and removes /run/husk/<id>.
    pub async fn shutdown(&self) {
        for h in &self.helpers {
            h.abort();
        }
        let Some(vm) = self.vm.lock().await.take() else {
            return;
        };
        // Before the VM goes: husk_tools removes the directory recursively,
        // which must never walk into a container's rootfs.
        if let Err(e) = mounts::unmount_below(&self.dir) {
            tracing::warn!(sandbox = %self.id, error = %e, "unmounting the share");
        }
        match vm.shutdown(Duration::from_secs(10)).await {
            Ok(s) => tracing::info!(sandbox = %self.id, status = %s, "VM stopped"),
            Err(e) => tracing::warn!(sandbox = %self.id, error = %e, "VM shutdown"),
        }
        let _ = mounts::unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Forwards husk-vmm's stderr (its log file) into ours, tagged `vmm`.
async fn forward_vmm_log(path: PathBuf, vm: String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return;
    };
    let mut lines = BufReader::new(file).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => tracing::info!(target: "vmm", vm = %vm, "{line}"),
            // At the end of what was written so far: look again shortly.
            Ok(None) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(_) => return,
        }
    }
}

/// Relays the agent's OOM notices as TaskOOM events until the VM goes or
/// the agent says it has no such call.
async fn watch_oom(client: Client, events: Events) {
    loop {
        match client.oom_event().await {
            Ok(container_id) => {
                tracing::warn!(container = %container_id, "OOM kill in the guest");
                events
                    .publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(TaskOOM {
                            container_id,
                            ..Default::default()
                        }),
                    )
                    .await;
            }
            Err(husk_agent_client::ClientError::Rpc { code, message, .. }) => {
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

/// The runtime directory of a sandbox.
pub fn runtime_dir(sandbox_id: &str) -> PathBuf {
    husk_tools::vm::runtime_root().join(sandbox_id)
}

/// A container's directory in a sandbox's share.
pub fn container_dir(sandbox_dir: &Path, container_id: &str) -> PathBuf {
    Vm::shared_dir(sandbox_dir).join(container_id)
}
