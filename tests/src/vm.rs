//! A bare VM for the agent and VMM scenarios: husk-runtime's sandbox
//! booted without a sandbox in the guest, with its agent client at hand
//! for raw calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use husk_agent_client::Client;
use husk_runtime::hypervisor::VmExit;
use husk_runtime::layout::{self, SandboxLayout};
use husk_runtime::{HuskVmm, NoEvents, Sandbox, SandboxSpec};

pub use husk_runtime::hypervisor::{vmm_binary, Bind};
pub use husk_runtime::layout::runtime_root;
pub use husk_runtime::VmSpec;

pub struct Vm {
    pub id: String,
    pub dir: PathBuf,
    pub client: Client,
    /// The template the VM was resumed from; `None` when it booted.
    pub from_template: Option<PathBuf>,
    /// `None` once shut down.
    sandbox: Option<Sandbox>,
}

impl Vm {
    pub async fn boot(spec: &VmSpec) -> Result<Vm> {
        Self::boot_from(spec, false).await
    }

    /// Boots, or with `template` resumes from the template of `spec`'s
    /// shape (built first if there is none; see husk_runtime::template).
    pub async fn boot_from(spec: &VmSpec, template: bool) -> Result<Vm> {
        let id = layout::random_id();
        let sandbox = Sandbox::boot(
            &id,
            &SandboxSpec {
                vm: spec.clone(),
                hostname: None,
                forward_vmm_log: false,
                template,
                ..Default::default()
            },
            &HuskVmm,
            Arc::new(NoEvents),
        )
        .await?;
        let client = sandbox.client().context("no agent client")?.clone();
        Ok(Vm {
            from_template: sandbox.from_template().map(Path::to_path_buf),
            dir: sandbox.layout().dir().to_path_buf(),
            id,
            client,
            sandbox: Some(sandbox),
        })
    }

    pub fn vsock_socket(dir: &Path) -> PathBuf {
        dir.join(
            SandboxLayout::under(Path::new("/"), "x")
                .expect("a valid id")
                .vsock_socket()
                .file_name()
                .expect("a file name"),
        )
    }

    pub fn vmm_pid(&self) -> u32 {
        self.sandbox.as_ref().map_or(0, Sandbox::vmm_pid)
    }

    /// Shuts the VM down within `limit`; how husk-vmm ended.
    pub async fn shutdown(mut self, limit: std::time::Duration) -> Result<VmExit> {
        let sandbox = self.sandbox.take().context("already shut down")?;
        tokio::time::timeout(limit, sandbox.shutdown())
            .await
            .with_context(|| format!("the VM did not stop within {limit:?}"))
    }
}

impl Drop for Vm {
    /// husk-vmm logs only warnings and errors by default: whatever it
    /// logged is shown before its directory goes with the sandbox, so that
    /// a scenario that fails mid-way says what the VMM saw.
    fn drop(&mut self) {
        let log = self.dir.join("vmm.log");
        if let Ok(text) = std::fs::read_to_string(&log) {
            if !text.trim().is_empty() {
                eprintln!("vmm.log of VM {}:\n{}", self.id, text.trim_end());
            }
        }
    }
}
