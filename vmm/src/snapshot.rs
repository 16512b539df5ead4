//! The snapshot state file: what KVM held for the VM and its vCPUs
//! ([`crate::arch::x86_64::state`]) and what the snapshot was taken from,
//! checked as a whole before anything of it is used (issue #14).
//!
//! Layout: the magic `HUSKSNAP`, the format version (u32, little endian),
//! the body's length (u64), the body's SHA-256, then the body (JSON). A
//! restore reads the file whole (bounded by [`MAX_STATE_BYTES`]), checks the
//! magic, version, length and checksum, then that the snapshot's
//! [`Identity`] is this VM's: a snapshot from another husk-vmm, kernel,
//! command line, machine shape or CPU is refused by name, never half
//! restored. The state file holds no guest memory (that is a file of its
//! own, mapped copy-on-write), so it stays small.

use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::arch::x86_64::state::{VcpuState, VmState};
use crate::devices::virtio::mmio::TransportSnapshot;

/// The files of a snapshot directory: the state, and guest RAM (sparse,
/// mapped copy-on-write by every restore). The memory file is written first
/// and the state file last, so a directory with a state file is whole.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

const MAGIC: &[u8; 8] = b"HUSKSNAP";
/// Bumped whenever the body's form changes: an older or newer file is
/// refused, not guessed at.
pub const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// A state file is a few hundred KiB for a few vCPUs; anything past this is
/// not one of ours.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a husk-vmm snapshot")]
    NotASnapshot(String),
    #[error("{path}: snapshot format {found}, this husk-vmm reads format {FORMAT_VERSION}")]
    Version { path: String, found: u32 },
    #[error("{path}: truncated ({have} bytes of {want})")]
    Truncated { path: String, have: u64, want: u64 },
    #[error("{0}: checksum mismatch (the file is corrupt)")]
    Checksum(String),
    #[error("{path}: unreadable state: {problem}")]
    Body { path: String, problem: String },
    #[error("the snapshot was taken with {field} {snapshot:?}; this VM has {this:?}")]
    Mismatch {
        field: &'static str,
        snapshot: String,
        this: String,
    },
}

/// What a snapshot can only be restored into: the same husk-vmm, guest
/// kernel and initramfs files, command line, machine shape and host CPU
/// (the vCPUs' CPUID and MSRs are this CPU's).
///
/// The kernel and initramfs are named by [`file_stamp`], not by a digest of
/// their content: a restore must not read 20 MB to check a kernel it never
/// loads (in the nested test host that was over a second of each restore).
/// A stamp changes with any change to the file (its ctime cannot be set
/// back), so a rebuilt kernel is never resumed from an older snapshot; the
/// runtime keys its templates by content on top (issue #14).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub vmm_version: String,
    pub kernel: String,
    pub initramfs: Option<String>,
    pub cmdline: String,
    /// The guest's vsock CID, when it has vsock: a guest reads it once at
    /// probe and again only after a transport reset, which it handles in
    /// its own time; until then it answers from the old CID, and the host
    /// side drops those answers. With hybrid vsock a CID is private to one
    /// VM, so clones keep their template's.
    pub guest_cid: Option<u64>,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub host_cpu: String,
}

impl Identity {
    /// The first field in which `self` (the snapshot's) differs from `this`.
    pub fn check(&self, this: &Identity) -> Result<(), SnapshotError> {
        let fields: [(&'static str, String, String); 8] = [
            (
                "husk-vmm version",
                self.vmm_version.clone(),
                this.vmm_version.clone(),
            ),
            ("kernel", self.kernel.clone(), this.kernel.clone()),
            (
                "initramfs",
                format!("{:?}", self.initramfs),
                format!("{:?}", this.initramfs),
            ),
            ("command line", self.cmdline.clone(), this.cmdline.clone()),
            (
                "guest CID",
                format!("{:?}", self.guest_cid),
                format!("{:?}", this.guest_cid),
            ),
            ("vCPUs", self.vcpus.to_string(), this.vcpus.to_string()),
            (
                "memory (MiB)",
                self.memory_mib.to_string(),
                this.memory_mib.to_string(),
            ),
            ("host CPU", self.host_cpu.clone(), this.host_cpu.clone()),
        ];
        match fields.into_iter().find(|(_, a, b)| a != b) {
            Some((field, snapshot, this)) => Err(SnapshotError::Mismatch {
                field,
                snapshot,
                this,
            }),
            None => Ok(()),
        }
    }
}

/// The host CPU as the snapshot's identity names it: vendor, family,
/// model, stepping and model name from /proc/cpuinfo's first processor.
pub fn host_cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    ["vendor_id", "cpu family", "model", "stepping", "model name"]
        .map(field)
        .join("/")
}

/// A file as [`Identity`] names the kernel and initramfs: the file it is
/// (device, inode) and its version (size, modification and change times
/// in nanoseconds), from one `stat`.
pub fn file_stamp(path: &Path) -> Result<String, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(io_err(path))?;
    Ok(format!(
        "dev={} ino={} size={} mtime={}.{:09} ctime={}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A VM's state at the moment it was paused.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub identity: Identity,
    pub vm: VmState,
    /// In vCPU index order.
    pub vcpus: Vec<VcpuState>,
    /// The virtio devices' transports, in bus order (as the command line
    /// announces them).
    pub devices: Vec<TransportSnapshot>,
}

/// Writes `s` to `path` whole: to a temporary file beside it, synced, then
/// renamed over, so a reader never sees half a snapshot.
pub fn write(path: &Path, s: &Snapshot) -> Result<(), SnapshotError> {
    let body = serde_json::to_vec(s).map_err(|e| SnapshotError::Body {
        path: path.display().to_string(),
        problem: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&out).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads and checks the snapshot at `path` for a VM whose identity is
/// `this`. Every check passes before the state is returned.
pub fn read(path: &Path, this: &Identity) -> Result<Snapshot, SnapshotError> {
    let name = path.display().to_string();
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut bytes = Vec::new();
    f.take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot(name));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: name,
            found: version,
        });
    }
    let want = u64_at(12);
    let have = (bytes.len() - HEADER_LEN) as u64;
    if want > MAX_STATE_BYTES || have > MAX_STATE_BYTES {
        return Err(SnapshotError::NotASnapshot(name));
    }
    if have != want {
        return Err(SnapshotError::Truncated {
            path: name,
            have,
            want,
        });
    }
    let body = &bytes[HEADER_LEN..];
    if Sha256::digest(body).as_slice() != &bytes[20..HEADER_LEN] {
        return Err(SnapshotError::Checksum(name));
    }
    let s: Snapshot = serde_json::from_slice(body).map_err(|e| SnapshotError::Body {
        path: name,
        problem: e.to_string(),
    })?;
    s.identity.check(this)?;
    if s.vcpus.len() != usize::from(s.identity.vcpus) {
        return Err(SnapshotError::Body {
            path: path.display().to_string(),
            problem: format!(
                "{} vCPU states for {} vCPUs",
                s.vcpus.len(),
                s.identity.vcpus
            ),
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::state::{save_vcpu, save_vm, saved_msr_indices};

    fn identity() -> Identity {
        Identity {
            vmm_version: "0.1.0".into(),
            kernel: "dev=1 ino=2 size=3 mtime=4.000000000 ctime=5.000000000".into(),
            initramfs: Some("dev=1 ino=3 size=3 mtime=4.000000000 ctime=5.000000000".into()),
            cmdline: "console=ttyS0".into(),
            guest_cid: Some(3),
            vcpus: 1,
            memory_mib: 256,
            host_cpu: host_cpu(),
        }
    }

    /// A snapshot of a real (idle, just set up) VM, written to a file.
    fn snapshot_file(dir: &Path) -> std::path::PathBuf {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm is needed for this test");
        let vm = kvm.create_vm().unwrap();
        crate::arch::x86_64::setup_vm(&vm).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_cpuid2(&crate::arch::x86_64::supported_cpuid(&kvm).unwrap())
            .unwrap();
        let msrs = saved_msr_indices(&kvm, &vcpu).unwrap();
        let s = Snapshot {
            identity: identity(),
            vm: save_vm(&vm).unwrap(),
            vcpus: vec![save_vcpu(&vcpu, &msrs).unwrap()],
            devices: Vec::new(),
        };
        let path = dir.join("state");
        write(&path, &s).unwrap();
        path
    }

    #[test]
    fn a_snapshot_reads_back_for_the_same_vm_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = snapshot_file(dir.path());
        let s = read(&path, &identity()).unwrap();
        assert_eq!(s.vcpus.len(), 1);
        assert!(!dir.path().join("state.tmp").exists());

        for (edit, field) in [
            (
                Box::new(|i: &mut Identity| {
                    i.kernel = "dev=1 ino=2 size=4 mtime=4.000000000 ctime=6.000000000".into()
                }) as Box<dyn Fn(&mut Identity)>,
                "kernel",
            ),
            (Box::new(|i: &mut Identity| i.vcpus = 2), "vCPUs"),
            (
                Box::new(|i: &mut Identity| i.guest_cid = Some(4)),
                "guest CID",
            ),
            (
                Box::new(|i: &mut Identity| i.memory_mib = 512),
                "memory (MiB)",
            ),
            (
                Box::new(|i: &mut Identity| i.vmm_version = "0.2.0".into()),
                "husk-vmm version",
            ),
            (
                Box::new(|i: &mut Identity| i.host_cpu = "other".into()),
                "host CPU",
            ),
            (
                Box::new(|i: &mut Identity| i.cmdline.push_str(" quiet")),
                "command line",
            ),
        ] {
            let mut this = identity();
            edit(&mut this);
            match read(&path, &this) {
                Err(SnapshotError::Mismatch { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn corrupt_truncated_and_foreign_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = snapshot_file(dir.path());
        let good = std::fs::read(&path).unwrap();
        let try_bytes = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read(&path, &identity()).unwrap_err()
        };

        let mut flipped = good.clone();
        let last = flipped.len() - 10;
        flipped[last] ^= 1;
        assert!(matches!(try_bytes(&flipped), SnapshotError::Checksum(_)));

        let e = try_bytes(&good[..good.len() - 100]);
        assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");

        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(try_bytes(&newer), SnapshotError::Version { .. }));

        assert!(matches!(
            try_bytes(b"\x7fELF...."),
            SnapshotError::NotASnapshot(_)
        ));
        assert!(matches!(try_bytes(&[]), SnapshotError::NotASnapshot(_)));

        // A length past the bound is not allocated for or trusted.
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(try_bytes(&huge), SnapshotError::NotASnapshot(_)));

        // A body that checks out but says too few vCPUs.
        let body: serde_json::Value = serde_json::from_slice(&good[HEADER_LEN..]).unwrap();
        let mut body = body;
        body["identity"]["vcpus"] = 2.into();
        let mut two = identity();
        two.vcpus = 2;
        let body = serde_json::to_vec(&body).unwrap();
        let mut out = good[..12].to_vec();
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&body));
        out.extend_from_slice(&body);
        std::fs::write(&path, &out).unwrap();
        let e = read(&path, &two).unwrap_err();
        assert!(e.to_string().contains("1 vCPU states for 2 vCPUs"), "{e}");
    }

    #[test]
    fn the_host_cpu_is_named() {
        let cpu = host_cpu();
        assert_eq!(cpu.split('/').count(), 5, "{cpu}");
        assert!(!cpu.starts_with('/'), "no vendor in {cpu}");
    }
}
