//! VM templates (issue #14): a VM booted once to its agent and snapshotted,
//! which later sandboxes of the same shape resume instead of booting.
//!
//! A template is kept per key: a SHA-256 over what the snapshot can only be
//! resumed with (husk-vmm's binary, the kernel and initramfs files, as
//! [`file_stamp`] names them, the extra command line, vCPUs, memory, whether
//! the VM has a share), in `<storage root>/templates/<key>/` (`state` and
//! `memory`, husk-vmm's files). A template is built on first use: a VM with
//! the key's shape and nothing of a pod (no binds, no NICs) boots, its agent
//! answers, husk-vmm writes the snapshot into a directory of its own, which
//! is renamed into place; a sandbox that finds it meanwhile builds nothing.
//! Concurrent first uses each build and the first rename wins: no lock is
//! held across a VM boot.
//!
//! husk-vmm verifies a template on every restore (its state file's
//! checksum and identity, the memory file's size); one it refuses is
//! removed, the sandbox boots cold, and the next one builds it again.
//! A clone is told the time and given fresh entropy through its agent
//! (`Restored`) before anything else.
//!
//! Not templated (a cold boot, said in the log): VMs with NICs (the guest
//! reads its NIC's MAC at probe; a template per pod network is not built
//! yet).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::container::NoEvents;
use crate::hypervisor::{Hypervisor, VmSpec};
use crate::sandbox::{Sandbox, SandboxSpec};
use crate::{Error, Result};

/// Where templates live unless `HUSK_TEMPLATE_DIR` says otherwise.
pub fn templates_root() -> PathBuf {
    std::env::var_os("HUSK_TEMPLATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(crate::config::DEFAULT_STORAGE_ROOT).join("templates"))
}

/// How long a template's husk-vmm has to write its snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The key of the template `spec` would resume, or why it has none.
pub fn key(spec: &VmSpec) -> std::result::Result<String, String> {
    if !spec.nics.is_empty() {
        return Err("the VM has NICs".into());
    }
    let vmm = spec
        .vmm
        .clone()
        .unwrap_or_else(crate::hypervisor::vmm_binary);
    let shared = spec.has_share();
    // Files as husk-vmm's snapshot identity names them (device, inode,
    // size, mtime, ctime): a rebuilt kernel is a new key.
    let stamp = |p: &Path| husk_vmm::snapshot::file_stamp(p).map_err(|e| e.to_string());
    let mut h = Sha256::new();
    for part in [
        stamp(&vmm)?,
        stamp(&spec.kernel)?,
        stamp(&spec.initramfs)?,
        spec.extra_cmdline.clone().unwrap_or_default(),
        format!(
            "vcpus={} memory={} share={shared}",
            spec.vcpus, spec.memory_mib
        ),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The templates under one root.
#[derive(Debug, Clone)]
pub struct Templates {
    root: PathBuf,
}

impl Default for Templates {
    fn default() -> Self {
        Templates {
            root: templates_root(),
        }
    }
}

impl Templates {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Templates { root: root.into() }
    }

    /// The directory of template `key` (there or not).
    pub fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The template for `spec`, built first if there is none.
    pub async fn get_or_build(
        &self,
        spec: &VmSpec,
        hypervisor: &dyn Hypervisor,
    ) -> std::result::Result<PathBuf, String> {
        let key = key(spec)?;
        let dir = self.dir(&key);
        if dir.join(husk_vmm::snapshot::STATE_FILE).exists() {
            return Ok(dir);
        }
        self.build(&key, spec, hypervisor)
            .await
            .map_err(|e| format!("building template {}: {e}", &key[..12]))?;
        Ok(dir)
    }

    /// Removes template `dir` (one husk-vmm refused): the next use builds it
    /// again.
    pub fn discard(&self, dir: &Path) {
        if dir.parent() == Some(self.root.as_path()) {
            tracing::warn!(template = %dir.display(), "removing a template that did not restore");
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    async fn build(&self, key: &str, spec: &VmSpec, hypervisor: &dyn Hypervisor) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(Error::io("creating", &self.root))?;
        let suffix = crate::layout::random_id();
        let building = self
            .root
            .join(format!(".build-{}-{}", &key[..12], &suffix[..8]));
        std::fs::create_dir(&building).map_err(Error::io("creating", &building))?;
        let r = self.build_in(&building, key, spec, hypervisor).await;
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&building);
            return r;
        }
        // First rename wins; a template another sandbox built meanwhile
        // is as good as ours.
        if let Err(e) = std::fs::rename(&building, self.dir(key)) {
            let _ = std::fs::remove_dir_all(&building);
            if !self.dir(key).join(husk_vmm::snapshot::STATE_FILE).exists() {
                return Err(Error::io("renaming into place", self.dir(key))(e));
            }
        }
        Ok(())
    }

    async fn build_in(
        &self,
        building: &Path,
        key: &str,
        spec: &VmSpec,
        hypervisor: &dyn Hypervisor,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let vm = VmSpec {
            // The key's shape, nothing of a pod's.
            share: spec.has_share(),
            binds: Vec::new(),
            overlays: Vec::new(),
            nics: Vec::new(),
            detach: false,
            snapshot_to: Some(building.to_path_buf()),
            restore_from: None,
            ..spec.clone()
        };
        let id = format!(
            "template-{}-{}",
            &key[..12],
            &crate::layout::random_id()[..8]
        );
        let sb = Box::pin(Sandbox::boot(
            &id,
            &SandboxSpec {
                vm,
                hostname: None,
                forward_vmm_log: false,
                template: false,
                ..Default::default()
            },
            hypervisor,
            Arc::new(NoEvents),
        ))
        .await?;
        let api = sb.layout().api_socket();
        let taken = crate::hypervisor::control_snapshot(&api, SNAPSHOT_TIMEOUT)
            .await
            .map_err(|e| Error::Hypervisor(format!("snapshot: {e}")));
        // The VM ends by itself after a snapshot; this reaps it and
        // removes its directory either way.
        sb.shutdown().await;
        taken?;
        tracing::info!(
            template = &key[..12],
            ms = started.elapsed().as_millis() as u64,
            "template built"
        );
        Ok(())
    }
}

/// What a clone is given before anything else (see the agent's `restored`
/// module): the host's wall clock and 64 bytes of its entropy.
pub fn clone_seed() -> Result<(u64, Vec<u8>)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut entropy = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(Error::io("reading", "/dev/urandom"))?;
    Ok((now, entropy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_follows_the_shape_and_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, n).unwrap();
            p
        };
        let spec = VmSpec {
            kernel: file("vmlinux"),
            initramfs: file("initramfs"),
            vmm: Some(file("husk-vmm")),
            ..VmSpec::default()
        };
        let k = key(&spec).unwrap();
        assert_eq!(k, key(&spec).unwrap());
        assert_eq!(k.len(), 64);
        for other in [
            VmSpec {
                memory_mib: 512,
                ..spec.clone()
            },
            VmSpec {
                vcpus: 2,
                ..spec.clone()
            },
            VmSpec {
                share: true,
                ..spec.clone()
            },
            VmSpec {
                extra_cmdline: Some("husk.debug=1".into()),
                ..spec.clone()
            },
            VmSpec {
                kernel: file("vmlinux2"),
                ..spec.clone()
            },
        ] {
            assert_ne!(key(&other).unwrap(), k);
        }
        // Binds only say the VM has a share; which binds is the pod's.
        let with_share = key(&VmSpec {
            share: true,
            ..spec.clone()
        })
        .unwrap();
        let with_binds = key(&VmSpec {
            binds: vec![crate::hypervisor::Bind {
                source: "/x".into(),
                target: "rootfs".into(),
                readonly: true,
            }],
            ..spec.clone()
        })
        .unwrap();
        assert_eq!(with_share, with_binds);
        // A rewritten kernel is another key.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&spec.kernel, "rebuilt").unwrap();
        assert_ne!(key(&spec).unwrap(), k);
        // A missing file has no key.
        assert!(key(&VmSpec {
            initramfs: dir.path().join("missing"),
            ..spec.clone()
        })
        .is_err());
    }
}
