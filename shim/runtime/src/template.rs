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
//! removed, the sandbox boots cold, and the next one builds it again. A
//! clone that ran but did not come up boots cold too, and its template
//! goes after [`CLONE_FAILURES`] of those in a row.
//! A clone is told the time and given fresh entropy through its agent
//! (`Restored`) before anything else.
//!
//! A pod's NICs are part of the shape (their number and MTUs: the guest
//! reads both at probe), not their network: a template's VM gets taps in a
//! network namespace of its own ([`tap::scratch`]) and the MACs
//! [`template_mac`] names; a clone gets the pod's taps, and the agent finds
//! each NIC by its template MAC and gives it the pod's
//! (`Interface.template_mac`).
//!
//! Each template records what it was made from (`template.json`); one whose
//! husk-vmm, kernel or initramfs has changed since can never be used again
//! and is removed when the next template is built ([`Templates::prune`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use serde::{Deserialize, Serialize};

use crate::container::NoEvents;
use crate::hypervisor::{Hypervisor, NetDevice, VmSpec};
use crate::network::tap;
use crate::sandbox::{Sandbox, SandboxSpec};
use crate::{Error, Result};

/// Where templates live unless `HUSK_TEMPLATE_DIR` says otherwise.
pub fn templates_root() -> PathBuf {
    std::env::var_os("HUSK_TEMPLATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(crate::config::DEFAULT_STORAGE_ROOT).join("templates"))
}

/// Gives a built template directory and its files back to root, the
/// directory closed to everyone else.
fn reclaim(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Closed first: nothing of husk-vmm's user changes it from here.
    std::os::unix::fs::lchown(dir, Some(0), Some(0))
        .map_err(Error::io("handing back to root", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io("setting the mode of", dir))?;
    // husk-vmm wrote it as a user that owned it: only its two regular
    // files are taken, never a link or anything else it might have left
    // (the meta file written next must not land on a planted link).
    for entry in std::fs::read_dir(dir).map_err(Error::io("listing", dir))? {
        let entry = entry.map_err(Error::io("listing", dir))?;
        let path = entry.path();
        let regular = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
        let name = entry.file_name();
        if !regular
            || (name != husk_vmm::snapshot::STATE_FILE && name != husk_vmm::snapshot::MEMORY_FILE)
        {
            return Err(Error::Hypervisor(format!(
                "the template's VM left {} behind: not a snapshot file",
                path.display()
            )));
        }
        std::os::unix::fs::lchown(&path, Some(0), Some(0))
            .map_err(Error::io("handing back to root", &path))?;
    }
    Ok(())
}

/// The most templates kept: one per shape, and a cluster whose pods ask
/// for many sizes would otherwise leave one (tens of MB of disk) per size.
/// Past it, the least recently used go when the next is built.
pub const MAX_TEMPLATES: usize = 16;

/// Clones in a row that ran but did not come up before their template goes.
pub const CLONE_FAILURES: u32 = 3;

/// Where a template counts them.
const FAILURES_FILE: &str = "failures";

/// How long a template's husk-vmm has to write its snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The name of a template's description file.
pub const META_FILE: &str = "template.json";

/// The MAC of a template's NIC `index` ("husk" in a locally administered
/// unicast address): what a clone's agent looks for to give it the pod's.
pub fn template_mac(index: usize) -> String {
    format!("02:68:75:73:6b:{:02x}", index & 0xff)
}

/// What a template was made from: its key's parts, for `husk template ls`
/// and to find templates no build can use again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub key: String,
    /// husk-vmm, kernel, initramfs: path and [`file_stamp`] each.
    ///
    /// [`file_stamp`]: husk_vmm::snapshot::file_stamp
    pub files: Vec<(PathBuf, String)>,
    pub extra_cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub share: bool,
    /// Each NIC's MTU.
    pub nics: Vec<u32>,
    /// Seconds since the epoch.
    pub created: u64,
}

impl Meta {
    /// `spec`'s, or why it has none (a file missing).
    pub fn of(spec: &VmSpec) -> std::result::Result<Meta, String> {
        let vmm = spec
            .vmm
            .clone()
            .unwrap_or_else(crate::hypervisor::vmm_binary);
        // Files as husk-vmm's snapshot identity names them (device, inode,
        // size, mtime, ctime): a rebuilt kernel is a new key.
        let files = [vmm, spec.kernel.clone(), spec.initramfs.clone()]
            .into_iter()
            .map(|p| {
                let s = husk_vmm::snapshot::file_stamp(&p).map_err(|e| e.to_string())?;
                Ok((p, s))
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        let mut m = Meta {
            key: String::new(),
            files,
            extra_cmdline: spec.extra_cmdline.clone().unwrap_or_default(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            share: spec.has_share(),
            nics: spec.nics.iter().map(|n| n.mtu).collect(),
            created: 0,
        };
        let mut h = Sha256::new();
        for (_, stamp) in &m.files {
            h.update(stamp.as_bytes());
            h.update([0]);
        }
        h.update(m.extra_cmdline.as_bytes());
        h.update([0]);
        h.update(
            format!(
                "vcpus={} memory={} share={} nics={:?}",
                m.vcpus, m.memory_mib, m.share, m.nics
            )
            .as_bytes(),
        );
        m.key = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(m)
    }

    /// Whether a file it was made from has changed or gone: no VM will
    /// ever have its key again.
    pub fn is_stale(&self) -> bool {
        self.files
            .iter()
            .any(|(p, stamp)| husk_vmm::snapshot::file_stamp(p).ok().as_ref() != Some(stamp))
    }
}

/// The key of the template `spec` would resume, or why it has none.
pub fn key(spec: &VmSpec) -> std::result::Result<String, String> {
    Meta::of(spec).map(|m| m.key)
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
        let meta = Meta::of(spec)?;
        let dir = self.dir(&meta.key);
        if dir.join(husk_vmm::snapshot::STATE_FILE).exists() {
            // Its last use, for the eviction past MAX_TEMPLATES.
            let _ = std::fs::File::options()
                .write(true)
                .open(dir.join(META_FILE))
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok(dir);
        }
        self.build(meta.clone(), spec, hypervisor)
            .await
            .map_err(|e| format!("building template {}: {e}", &meta.key[..12]))?;
        Ok(dir)
    }

    /// Builds the template for `spec` again, in place of the one there.
    pub async fn rebuild(&self, spec: &VmSpec, hypervisor: &dyn Hypervisor) -> Result<Meta> {
        let meta = Meta::of(spec).map_err(Error::FailedPrecondition)?;
        self.remove(&meta.key)?;
        self.build(meta.clone(), spec, hypervisor).await?;
        Ok(meta)
    }

    /// The templates here, each with whether it is stale.
    pub fn list(&self) -> Vec<(Meta, bool)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<(Meta, bool)> = entries
            .flatten()
            .filter_map(|e| {
                let text = std::fs::read(e.path().join(META_FILE)).ok()?;
                let m: Meta = serde_json::from_slice(&text).ok()?;
                (m.key == e.file_name().to_string_lossy()).then(|| {
                    let stale = m.is_stale();
                    (m, stale)
                })
            })
            .collect();
        out.sort_by_key(|(m, _)| std::cmp::Reverse(m.created));
        out
    }

    /// Removes template `key` (a full key or a unique prefix of at least
    /// 4 characters); `Ok(false)`: there was none.
    pub fn remove(&self, key: &str) -> Result<bool> {
        if key.len() < 4 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidArgument(format!(
                "{key:?} is not a template key (4 or more hex digits)"
            )));
        }
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(false);
        };
        let hits: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(key))
            .map(|e| e.path())
            .collect();
        match hits.as_slice() {
            [] => Ok(false),
            [one] => {
                std::fs::remove_dir_all(one).map_err(Error::io("removing", one))?;
                Ok(true)
            }
            _ => Err(Error::InvalidArgument(format!(
                "{key:?} names {} templates",
                hits.len()
            ))),
        }
    }

    /// Removes what no VM can use again: templates made from files that
    /// have changed since, and builds their builder left (older than an
    /// hour: a build takes seconds). Returns how many went.
    pub fn prune(&self) -> usize {
        self.prune_to(usize::MAX)
    }

    /// [`Templates::prune`], then the least recently used templates until
    /// at most `keep` are left.
    fn prune_to(&self, keep: usize) -> usize {
        let mut gone = 0;
        let mut live = Vec::new();
        for (m, stale) in self.list() {
            if stale {
                if std::fs::remove_dir_all(self.dir(&m.key)).is_ok() {
                    tracing::info!(template = &m.key[..12], "removed a stale template");
                    gone += 1;
                }
            } else {
                let used = std::fs::metadata(self.dir(&m.key).join(META_FILE))
                    .and_then(|md| md.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                live.push((used, m.key));
            }
        }
        live.sort();
        let excess = live.len().saturating_sub(keep);
        for (_, key) in live.into_iter().take(excess) {
            if std::fs::remove_dir_all(self.dir(&key)).is_ok() {
                tracing::info!(
                    template = &key[..12],
                    "removed the least recently used template"
                );
                gone += 1;
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return gone;
        };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600));
            if e.file_name().to_string_lossy().starts_with(".build-")
                && old
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                gone += 1;
            }
        }
        gone
    }

    /// Removes template `dir` (one husk-vmm refused): the next use builds it
    /// again.
    pub fn discard(&self, dir: &Path) {
        if dir.parent() == Some(self.root.as_path()) {
            tracing::warn!(template = %dir.display(), "removing a template that did not restore");
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// A clone of template `dir` ran but did not come up. After
    /// [`CLONE_FAILURES`] in a row the template goes (one whose clones
    /// never come up would otherwise cost every sandbox a restore and a
    /// cold boot).
    pub fn clone_failed(&self, dir: &Path) {
        let file = dir.join(FAILURES_FILE);
        let n = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(0)
            + 1;
        if n >= CLONE_FAILURES {
            self.discard(dir);
        } else if dir.parent() == Some(self.root.as_path()) {
            let _ = std::fs::write(&file, n.to_string());
        }
    }

    /// A clone of template `dir` came up: its failures in a row are over.
    pub fn clone_ran(&self, dir: &Path) {
        let file = dir.join(FAILURES_FILE);
        if file.exists() {
            let _ = std::fs::remove_file(file);
        }
    }

    async fn build(
        &self,
        mut meta: Meta,
        spec: &VmSpec,
        hypervisor: &dyn Hypervisor,
    ) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        // Passable, not listable: the template VM's husk-vmm, an
        // unprivileged user of its own, writes its snapshot into its
        // `.build-*` directory (its own until built, root's after).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.root)
            .map_err(Error::io("creating", &self.root))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o711))
                .map_err(Error::io("setting the mode of", &self.root))?;
            // Its parent (husk's storage root, whose image store keeps its
            // own directories 0700) passable too.
            if let Some(parent) = self.root.parent().filter(|p| *p != Path::new("/")) {
                let meta = std::fs::metadata(parent).map_err(Error::io("reading", parent))?;
                let mode = meta.permissions().mode();
                if mode & 0o001 == 0 {
                    std::fs::set_permissions(
                        parent,
                        std::fs::Permissions::from_mode(mode & 0o7777 | 0o001),
                    )
                    .map_err(Error::io("setting the mode of", parent))?;
                }
            }
        }
        // Room for this one.
        self.prune_to(MAX_TEMPLATES - 1);
        let key = meta.key.clone();
        let suffix = crate::layout::random_id();
        let building = self
            .root
            .join(format!(".build-{}-{}", &key[..12], &suffix[..8]));
        std::fs::create_dir(&building).map_err(Error::io("creating", &building))?;
        meta.created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut r = self.build_in(&building, &key, spec, hypervisor).await;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if r.is_ok() && unsafe { libc::geteuid() } == 0 {
            // Root's again, and only root's: the VM that wrote it (as a
            // user of its own) is gone, and a template holds a guest's memory.
            r = reclaim(&building);
        }
        if r.is_ok() {
            let path = building.join(META_FILE);
            r = serde_json::to_vec_pretty(&meta)
                .map_err(std::io::Error::other)
                .and_then(|text| std::fs::write(&path, text))
                .map_err(Error::io("writing", &path));
        }
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&building);
            return r;
        }
        // First rename wins; a template another sandbox built meanwhile
        // is as good as ours.
        if let Err(e) = std::fs::rename(&building, self.dir(&key)) {
            let _ = std::fs::remove_dir_all(&building);
            if !self.dir(&key).join(husk_vmm::snapshot::STATE_FILE).exists() {
                return Err(Error::io("renaming into place", self.dir(&key))(e));
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
        // NICs like the pod's, on taps no network reaches.
        let scratch = if spec.nics.is_empty() {
            None
        } else {
            Some(
                tap::scratch(spec.nics.len())
                    .await
                    .map_err(|e| Error::Hypervisor(format!("the template's taps: {e}")))?,
            )
        };
        let nics = match &scratch {
            None => Vec::new(),
            Some(s) => s
                .taps
                .iter()
                .zip(&spec.nics)
                .enumerate()
                .map(|(i, (t, pod))| -> Result<NetDevice> {
                    Ok(NetDevice {
                        tap: Arc::new(
                            t.try_clone()
                                .map_err(Error::io("duplicating", "a template tap"))?,
                        ),
                        mac: template_mac(i),
                        mtu: pod.mtu,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let vm = VmSpec {
            // The key's shape, nothing of a pod's.
            share: spec.has_share(),
            binds: Vec::new(),
            overlays: Vec::new(),
            nics,
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

    /// A spec whose husk-vmm, kernel and initramfs are files in a temporary
    /// directory of their own.
    fn fixture() -> (tempfile::TempDir, VmSpec) {
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
        (dir, spec)
    }

    #[test]
    fn the_key_follows_the_shape_and_the_files() {
        let (dir, spec) = fixture();
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
                kernel: {
                    let p = dir.path().join("vmlinux2");
                    std::fs::write(&p, "vmlinux2").unwrap();
                    p
                },
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

    fn nic(mtu: u32) -> NetDevice {
        let f = std::fs::File::open("/dev/null").unwrap();
        NetDevice {
            tap: Arc::new(f.into()),
            mac: "02:00:00:00:00:09".into(),
            mtu,
        }
    }

    #[test]
    fn nics_are_part_of_the_shape_by_number_and_mtu_not_by_mac() {
        let (_dir, spec) = fixture();
        let none = key(&spec).unwrap();
        let one = key(&VmSpec {
            nics: vec![nic(1500)],
            ..spec.clone()
        })
        .unwrap();
        let mut other_mac = nic(1500);
        other_mac.mac = "0a:00:00:00:00:01".into();
        assert_eq!(
            one,
            key(&VmSpec {
                nics: vec![other_mac],
                ..spec.clone()
            })
            .unwrap()
        );
        for other in [vec![nic(1450)], vec![nic(1500), nic(1500)]] {
            let k = key(&VmSpec {
                nics: other,
                ..spec.clone()
            })
            .unwrap();
            assert_ne!(k, one);
            assert_ne!(k, none);
        }
        assert_ne!(one, none);
        // Template MACs are distinct per NIC and locally administered.
        assert_ne!(template_mac(0), template_mac(1));
        assert!(template_mac(0).starts_with("02:"));
    }

    #[test]
    fn templates_are_listed_removed_by_prefix_and_pruned_when_stale() {
        let (dir, spec) = fixture();
        let t = Templates::new(dir.path().join("templates"));
        assert!(t.list().is_empty());
        assert_eq!(t.prune(), 0);
        let place = |m: &Meta| {
            let d = t.dir(&m.key);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(META_FILE), serde_json::to_vec(m).unwrap()).unwrap();
        };
        let a = Meta::of(&spec).unwrap();
        let b = Meta::of(&VmSpec {
            vcpus: 2,
            ..spec.clone()
        })
        .unwrap();
        place(&a);
        place(&b);
        // A directory under another template's name is not listed.
        let mut forged = a.clone();
        forged.key = "f".repeat(64);
        std::fs::create_dir_all(t.dir(&b.key[..10])).unwrap();
        std::fs::write(
            t.dir(&b.key[..10]).join(META_FILE),
            serde_json::to_vec(&forged).unwrap(),
        )
        .unwrap();
        let listed = t.list();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(listed.iter().all(|(_, stale)| !stale));
        // Keys: hex, 4 digits or more, unique.
        assert!(t.remove("../x").is_err());
        assert!(t.remove("ab").is_err());
        assert!(!t.remove("0000000000").unwrap() || a.key.starts_with("0000000000"));
        std::fs::remove_dir_all(t.dir(&b.key[..10])).unwrap();
        assert!(t.remove(&b.key[..8]).unwrap());
        assert_eq!(t.list().len(), 1);
        // A rebuilt kernel: the template can never be resumed; prune removes it.
        assert_eq!(t.prune(), 0);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&spec.kernel, "rebuilt").unwrap();
        assert!(t.list()[0].1, "not stale after its kernel changed");
        assert_eq!(t.prune(), 1);
        assert!(t.list().is_empty());
        assert!(!t.dir(&a.key).exists());
    }

    #[test]
    fn a_template_goes_after_clones_fail_in_a_row_not_after_one() {
        let root = tempfile::tempdir().unwrap();
        let t = Templates::new(root.path());
        let dir = t.dir(&"ab".repeat(32));
        std::fs::create_dir_all(&dir).unwrap();
        t.clone_failed(&dir);
        t.clone_failed(&dir);
        assert!(dir.exists());
        // One that came up starts the count again.
        t.clone_ran(&dir);
        t.clone_failed(&dir);
        t.clone_failed(&dir);
        assert!(dir.exists());
        t.clone_failed(&dir);
        assert!(!dir.exists());
        // Nothing outside the root is touched.
        let outside = tempfile::tempdir().unwrap();
        for _ in 0..CLONE_FAILURES {
            t.clone_failed(outside.path());
        }
        assert!(outside.path().exists());
    }

    #[test]
    fn past_the_most_templates_the_least_recently_used_go() {
        let (dir, spec) = fixture();
        let t = Templates::new(dir.path().join("templates"));
        let base = std::time::SystemTime::now() - Duration::from_secs(1000);
        let mut keys = Vec::new();
        for i in 0..4u32 {
            let m = Meta::of(&VmSpec {
                memory_mib: 256 + i,
                ..spec.clone()
            })
            .unwrap();
            let d = t.dir(&m.key);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(META_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
            // Used in the order 2, 0, 3, 1 (oldest first).
            let used = base + Duration::from_secs([10, 30, 0, 20][i as usize]);
            std::fs::File::options()
                .write(true)
                .open(d.join(META_FILE))
                .unwrap()
                .set_modified(used)
                .unwrap();
            keys.push(m.key);
        }
        assert_eq!(t.prune_to(2), 2);
        let left: Vec<String> = t.list().into_iter().map(|(m, _)| m.key).collect();
        assert_eq!(left.len(), 2);
        assert!(
            left.contains(&keys[1]) && left.contains(&keys[3]),
            "{left:?}"
        );
        assert_eq!(t.prune_to(2), 0);
    }
}
