//! The VM description: a JSON file, command-line flags, or both (flags win).
//!
//! ```json
//! { "kernel": "/usr/local/share/husk/vmlinux", "initramfs": "/usr/local/share/husk/initramfs",
//!   "vcpus": 2, "memory_mib": 256, "serial_out": "/run/husk/x/console.log",
//!   "vsock_socket": "/run/husk/x/vsock.sock", "api_socket": "/run/husk/x/api.sock" }
//! ```
//!
//! `log_limit_bytes` (`--log-limit-bytes`) bounds husk-vmm's own log, its
//! stderr (the runtime's `vmm.log`): whole lines up to that many bytes, then one
//! line saying the rest is dropped ([`crate::logging`]); 16 MiB when absent.
//! What is logged is chosen with `HUSK_VMM_LOG` (a tracing filter, `warn` when
//! unset).
//!
//! The ready fd (`--ready-fd`) is a flag only: an fd number means something only
//! to the process that inherited it, never in a file. The same holds for the
//! NICs (`--net fd=N,mac=..`, repeatable): their taps are inherited fds, so
//! `net` is never read from or written to JSON.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most vCPUs: the MP table must fit the last KiB of base memory.
pub const MAX_VCPUS: u8 = 32;
/// Guest memory bounds, in MiB.
pub const MIN_MEMORY_MIB: u64 = 32;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The guest's vsock context ID (2 is the host; 3 is the first guest CID).
pub const DEFAULT_GUEST_CID: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing config {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no kernel given (--kernel or \"kernel\" in the config)")]
    NoKernel,
    #[error("vcpus must be 1..={MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    #[error("memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, got {0}")]
    Memory(u64),
    #[error("guest CID must be at least 3, got {0}")]
    Cid(u64),
    #[error("vsock socket path {0} is too long for a Unix socket (with the _PORT suffix)")]
    SocketPath(String),
    #[error("control socket path {0} is too long for a Unix socket")]
    ApiSocketPath(String),
    #[error("ready fd must be 3 or more (not stdin, stdout or stderr), got {0}")]
    ReadyFd(i32),
    #[error("--net {spec:?}: {why}")]
    Net { spec: String, why: String },
    #[error("fd {0} is named twice (--net and --ready-fd fds must all differ)")]
    FdTwice(i32),
    #[error("at most {MAX_NICS} NICs, got {0}")]
    TooManyNics(usize),
    #[error("the user to run as must not be root (uid {uid}, gid {gid})")]
    RootUser { uid: u32, gid: u32 },
}

/// The most NICs one VM gets: each is a virtio-mmio device with an IRQ line of
/// its own, and rng, vsock and virtio-fs take three of the 19.
pub const MAX_NICS: usize = 16;

/// One guest NIC: `--net fd=N,mac=AA:BB:CC:DD:EE:FF[,mtu=M][,rx-bps=B][,tx-bps=B]`.
///
/// `fd` is a tap the runtime opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`
/// and let husk-vmm inherit; `rx-bps`/`tx-bps` turn on a token-bucket rate
/// limit for that direction (bytes per second, guest-relative: RX is what the
/// guest receives).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub fd: i32,
    pub mac: [u8; 6],
    pub mtu: Option<u16>,
    pub rx_bps: Option<u64>,
    pub tx_bps: Option<u64>,
}

/// The smallest MTU IPv4 allows (RFC 791).
pub const MIN_MTU: u16 = 68;

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::Net {
            spec: spec.to_string(),
            why,
        };
        let (mut fd, mut mac, mut mtu, mut rx_bps, mut tx_bps) = (None, None, None, None, None);
        for kv in spec.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("{kv:?} is not key=value")))?;
            let num = |what: &str| -> Result<u64, ConfigError> {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{what} {v:?} is not a number")))
            };
            let dup = |k: &str| bad(format!("{k} given twice"));
            match k {
                "fd" => {
                    let n = v
                        .parse::<i32>()
                        .map_err(|_| bad(format!("fd {v:?} is not a number")))?;
                    if n < 3 {
                        return Err(bad(format!(
                            "fd must be 3 or more (not stdin, stdout or stderr), got {n}"
                        )));
                    }
                    fd.replace(n).map_or(Ok(()), |_| Err(dup(k)))?;
                }
                "mac" => {
                    let m = parse_mac(v)
                        .ok_or_else(|| bad(format!("mac {v:?} is not AA:BB:CC:DD:EE:FF")))?;
                    if m[0] & 1 != 0 {
                        return Err(bad(format!("mac {v} is a multicast address")));
                    }
                    if m == [0; 6] {
                        return Err(bad("mac is all zeros".into()));
                    }
                    mac.replace(m).map_or(Ok(()), |_| Err(dup(k)))?;
                }
                "mtu" => {
                    let n = num("mtu")?;
                    if !(u64::from(MIN_MTU)..=65535).contains(&n) {
                        return Err(bad(format!("mtu must be {MIN_MTU}..=65535, got {n}")));
                    }
                    mtu.replace(n as u16).map_or(Ok(()), |_| Err(dup(k)))?;
                }
                "rx-bps" | "tx-bps" => {
                    let n = num(k)?;
                    if n == 0 {
                        return Err(bad(format!(
                            "{k} must be at least 1 (leave it out for no limit)"
                        )));
                    }
                    let slot = if k == "rx-bps" {
                        &mut rx_bps
                    } else {
                        &mut tx_bps
                    };
                    slot.replace(n).map_or(Ok(()), |_| Err(dup(k)))?;
                }
                _ => return Err(bad(format!("unknown key {k:?}"))),
            }
        }
        Ok(NetConfig {
            fd: fd.ok_or_else(|| bad("fd=N is required".into()))?,
            mac: mac.ok_or_else(|| bad("mac=AA:BB:CC:DD:EE:FF is required".into()))?,
            mtu,
            rx_bps,
            tx_bps,
        })
    }
}

fn default_vcpus() -> u64 {
    1
}
fn default_memory() -> u64 {
    128
}
fn default_cid() -> u64 {
    DEFAULT_GUEST_CID
}
fn default_true() -> bool {
    true
}
fn default_log_limit() -> u64 {
    crate::logging::DEFAULT_LOG_LIMIT
}

/// A VM as the shim (or a person) describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF vmlinux (PVH) or bzImage.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// The whole guest command line; the Husk defaults when absent. Device
    /// announcements are always appended.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Parameters appended after the base command line (`cmdline` or the
    /// defaults of [`crate::cmdline`]), before the device announcements: what a
    /// caller adds (the agent's options, a test's switches) without restating
    /// the machine's defaults.
    #[serde(default)]
    pub extra_cmdline: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u64,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Where the guest console goes; the VMM's stderr when absent.
    #[serde(default)]
    pub serial_out: Option<PathBuf>,
    /// The host side of vsock; no vsock device when absent.
    #[serde(default)]
    pub vsock_socket: Option<PathBuf>,
    #[serde(default = "default_cid")]
    pub guest_cid: u64,
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// Landlock jail once set up ([`crate::confine`]): the share and the
    /// sockets' directories only, no TCP.
    #[serde(default = "default_true")]
    pub landlock: bool,
    /// The control socket for the shim (see [`crate::api`]); none when absent.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// An inherited fd that gets one byte once the guest runs (`--ready-fd`).
    #[serde(skip)]
    pub ready_fd: Option<i32>,
    /// A host directory shared into the guest over virtio-fs; none when absent.
    #[serde(default)]
    pub shared_dir: Option<PathBuf>,
    /// The virtio-fs tag the guest mounts (`mount -t virtiofs <tag> <dir>`).
    #[serde(default = "default_fs_tag")]
    pub fs_tag: String,
    /// Bytes of husk-vmm's own log (stderr) before the rest is dropped: a
    /// guest that makes husk-vmm complain without end must not fill `/run`.
    #[serde(default = "default_log_limit")]
    pub log_limit_bytes: u64,
    /// The guest's NICs, from `--net` flags only (their taps are inherited fds).
    #[serde(skip)]
    pub net: Vec<NetConfig>,
    /// A directory (existing) where a `{"op":"snapshot"}` on the control
    /// socket writes the VM's snapshot (`state` and `memory`); without it the
    /// request is refused. Fixed at start, so the Landlock jail can allow
    /// that directory and no other.
    #[serde(default)]
    pub snapshot_to: Option<PathBuf>,
    /// A snapshot directory to resume instead of booting (`--restore-from`):
    /// its state must have been taken with this configuration's kernel,
    /// initramfs, command line, vCPUs and memory, on this CPU.
    #[serde(default)]
    pub restore_from: Option<PathBuf>,
    /// The user husk-vmm becomes once set up (`--uid`/`--gid`, both or
    /// neither): it then holds no capability, and only its file-system
    /// process (for a share) keeps the rights virtio-fs needs
    /// ([`crate::devices::virtio::fs::remote`]). Needs a root start.
    #[serde(default)]
    pub user: Option<User>,
}

/// An unprivileged uid and gid (neither 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// The tag of the sandbox share (architecture: one share per sandbox).
pub const DEFAULT_FS_TAG: &str = "husk-share";

fn default_fs_tag() -> String {
    DEFAULT_FS_TAG.to_string()
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: None,
            initramfs: None,
            cmdline: None,
            extra_cmdline: None,
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
            serial_out: None,
            vsock_socket: None,
            guest_cid: default_cid(),
            seccomp: true,
            landlock: true,
            api_socket: None,
            ready_fd: None,
            shared_dir: None,
            fs_tag: default_fs_tag(),
            log_limit_bytes: default_log_limit(),
            snapshot_to: None,
            restore_from: None,
            net: Vec::new(),
            user: None,
        }
    }
}

impl VmConfig {
    pub fn from_json_str(s: &str, origin: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(s).map_err(|source| ConfigError::Parse {
            path: origin.to_string(),
            source,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let s = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&s, &path.display().to_string())
    }

    /// The command line to boot with (before device announcements): `cmdline`
    /// or the defaults, then `extra_cmdline`.
    pub fn base_cmdline(&self) -> String {
        let base = self
            .cmdline
            .clone()
            .unwrap_or_else(crate::cmdline::default_cmdline);
        crate::cmdline::with_extra(&base, self.extra_cmdline.as_deref())
    }

    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<ValidConfig, ConfigError> {
        let kernel = self.kernel.clone().ok_or(ConfigError::NoKernel)?;
        if self.vcpus == 0 || self.vcpus > u64::from(MAX_VCPUS) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.guest_cid < 3 || self.guest_cid > u64::from(u32::MAX) {
            return Err(ConfigError::Cid(self.guest_cid));
        }
        if let Some(p) = &self.vsock_socket {
            // sun_path holds 108 bytes with the NUL; leave room for "_4294967295".
            if p.as_os_str().len() + 11 >= 108 {
                return Err(ConfigError::SocketPath(p.display().to_string()));
            }
        }
        if let Some(p) = &self.api_socket {
            // sun_path holds 108 bytes with the NUL.
            if p.as_os_str().len() >= 108 {
                return Err(ConfigError::ApiSocketPath(p.display().to_string()));
            }
        }
        if let Some(fd) = self.ready_fd {
            if fd < 3 {
                return Err(ConfigError::ReadyFd(fd));
            }
        }
        if let Some(u) = self.user {
            if u.uid == 0 || u.gid == 0 || u.uid == u32::MAX || u.gid == u32::MAX {
                return Err(ConfigError::RootUser {
                    uid: u.uid,
                    gid: u.gid,
                });
            }
        }
        if self.net.len() > MAX_NICS {
            return Err(ConfigError::TooManyNics(self.net.len()));
        }
        let mut fds: Vec<i32> = self.ready_fd.into_iter().collect();
        for n in &self.net {
            if n.fd < 3 {
                return Err(ConfigError::Net {
                    spec: format!("fd={}", n.fd),
                    why: "fd must be 3 or more".into(),
                });
            }
            if fds.contains(&n.fd) {
                return Err(ConfigError::FdTwice(n.fd));
            }
            fds.push(n.fd);
        }
        Ok(ValidConfig {
            kernel,
            vcpus: self.vcpus as u8,
            config: self.clone(),
        })
    }
}

/// A [`VmConfig`] that passed [`VmConfig::validate`].
#[derive(Clone, Debug)]
pub struct ValidConfig {
    pub kernel: PathBuf,
    pub vcpus: u8,
    pub config: VmConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_json_gets_defaults() {
        let c = VmConfig::from_json_str(r#"{"kernel": "/k"}"#, "test").unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 128);
        assert!(c.seccomp);
        assert_eq!(c.guest_cid, 3);
        assert_eq!(c.log_limit_bytes, 16 << 20);
        let v = c.validate().unwrap();
        assert_eq!(v.kernel, PathBuf::from("/k"));
        assert!(c.base_cmdline().contains("console=ttyS0"));
    }

    #[test]
    fn the_user_to_become_is_never_root() {
        for (uid, gid) in [(0, 5), (5, 0), (u32::MAX, 5)] {
            let c = VmConfig {
                kernel: Some("/k".into()),
                user: Some(User { uid, gid }),
                ..VmConfig::default()
            };
            assert!(
                matches!(c.validate(), Err(ConfigError::RootUser { .. })),
                "{uid}:{gid}"
            );
        }
        let c = VmConfig {
            kernel: Some("/k".into()),
            user: Some(User { uid: 5, gid: 5 }),
            ..VmConfig::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn full_json_round_trips() {
        let c = VmConfig {
            kernel: Some("/k".into()),
            initramfs: Some("/i".into()),
            cmdline: Some("console=ttyS0".into()),
            extra_cmdline: Some("husk.debug=1".into()),
            vcpus: 4,
            memory_mib: 2048,
            serial_out: Some("/tmp/console".into()),
            vsock_socket: Some("/tmp/v.sock".into()),
            guest_cid: 7,
            seccomp: false,
            landlock: false,
            api_socket: Some("/tmp/api.sock".into()),
            ready_fd: None,
            user: Some(User {
                uid: 1 << 30,
                gid: 1 << 30,
            }),
            shared_dir: Some("/run/husk/x/shared".into()),
            fs_tag: "other-tag".into(),
            log_limit_bytes: 4096,
            net: Vec::new(),
            snapshot_to: Some("/var/lib/husk/templates/t".into()),
            restore_from: Some("/var/lib/husk/templates/u".into()),
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(VmConfig::from_json_str(&s, "t").unwrap(), c);
        assert_eq!(c.base_cmdline(), "console=ttyS0 husk.debug=1");
    }

    #[test]
    fn extra_cmdline_follows_the_defaults() {
        let c =
            VmConfig::from_json_str(r#"{"kernel": "/k", "extra_cmdline": "a=1 b"}"#, "t").unwrap();
        assert_eq!(c.extra_cmdline.as_deref(), Some("a=1 b"));
        let line = c.base_cmdline();
        assert!(
            line.starts_with(&crate::cmdline::default_cmdline()),
            "{line}"
        );
        assert!(line.ends_with(" a=1 b"), "{line}");
        // Absent, it is None (older configs keep working).
        let c = VmConfig::from_json_str(r#"{"kernel": "/k"}"#, "t").unwrap();
        assert_eq!(c.extra_cmdline, None);
        assert_eq!(c.base_cmdline(), crate::cmdline::default_cmdline());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(matches!(
            VmConfig::default().validate(),
            Err(ConfigError::NoKernel)
        ));
        let base = VmConfig {
            kernel: Some("/k".into()),
            ..Default::default()
        };
        for (c, ok) in [
            (
                VmConfig {
                    vcpus: 0,
                    ..base.clone()
                },
                false,
            ),
            (
                VmConfig {
                    vcpus: 33,
                    ..base.clone()
                },
                false,
            ),
            (
                VmConfig {
                    vcpus: 32,
                    ..base.clone()
                },
                true,
            ),
            (
                VmConfig {
                    memory_mib: 16,
                    ..base.clone()
                },
                false,
            ),
            (
                VmConfig {
                    guest_cid: 2,
                    ..base.clone()
                },
                false,
            ),
            (
                VmConfig {
                    vsock_socket: Some("/x".repeat(60).into()),
                    ..base.clone()
                },
                false,
            ),
            (
                VmConfig {
                    api_socket: Some("/x".repeat(54).into()),
                    ..base.clone()
                },
                false,
            ),
            (
                VmConfig {
                    api_socket: Some("/x".repeat(53).into()),
                    ..base.clone()
                },
                true,
            ),
            (
                VmConfig {
                    ready_fd: Some(2),
                    ..base.clone()
                },
                false,
            ),
            (
                VmConfig {
                    ready_fd: Some(3),
                    ..base.clone()
                },
                true,
            ),
        ] {
            assert_eq!(c.validate().is_ok(), ok, "{c:?}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_json_are_errors() {
        assert!(VmConfig::from_json_str(r#"{"kernel": "/k", "vcpu": 2}"#, "t").is_err());
        assert!(VmConfig::from_json_str("{", "t").is_err());
        assert!(VmConfig::from_json_str(r#"{"vcpus": -1}"#, "t").is_err());
        // The ready fd is a flag, never a config field.
        assert!(VmConfig::from_json_str(r#"{"kernel": "/k", "ready_fd": 5}"#, "t").is_err());
        let c = VmConfig::from_json_str(r#"{"api_socket": "/run/a.sock"}"#, "t").unwrap();
        assert_eq!(c.api_socket, Some("/run/a.sock".into()));
        // NICs are flags, never config fields.
        assert!(VmConfig::from_json_str(r#"{"kernel": "/k", "net": []}"#, "t").is_err());
    }

    #[test]
    fn net_flags_parse_and_bad_ones_name_the_problem() {
        let n: NetConfig = "fd=5,mac=02:00:00:aa:BB:0c".parse().unwrap();
        assert_eq!(
            n,
            NetConfig {
                fd: 5,
                mac: [2, 0, 0, 0xaa, 0xbb, 0x0c],
                mtu: None,
                rx_bps: None,
                tx_bps: None
            }
        );
        let n: NetConfig = "mac=02:00:00:00:00:01,fd=9,mtu=9000,rx-bps=1000,tx-bps=2000"
            .parse()
            .unwrap();
        assert_eq!(
            (n.fd, n.mtu, n.rx_bps, n.tx_bps),
            (9, Some(9000), Some(1000), Some(2000))
        );
        for (spec, why) in [
            ("fd=2,mac=02:00:00:00:00:01", "3 or more"),
            ("fd=-1,mac=02:00:00:00:00:01", "3 or more"),
            ("fd=x,mac=02:00:00:00:00:01", "not a number"),
            ("mac=02:00:00:00:00:01", "fd=N is required"),
            ("fd=3", "mac=AA:BB:CC:DD:EE:FF is required"),
            ("fd=3,mac=01:00:5e:00:00:01", "multicast"),
            ("fd=3,mac=00:00:00:00:00:00", "all zeros"),
            ("fd=3,mac=02:00:00:00:00", "not AA:BB"),
            ("fd=3,mac=02:00:00:00:00:01:02", "not AA:BB"),
            ("fd=3,mac=2:00:00:00:00:001", "not AA:BB"),
            ("fd=3,mac=02:00:00:00:00:zz", "not AA:BB"),
            ("fd=3,mac=02:00:00:00:00:01,mtu=67", "68..=65535"),
            ("fd=3,mac=02:00:00:00:00:01,mtu=65536", "68..=65535"),
            ("fd=3,mac=02:00:00:00:00:01,rx-bps=0", "at least 1"),
            ("fd=3,mac=02:00:00:00:00:01,tx-bps=-5", "not a number"),
            ("fd=3,mac=02:00:00:00:00:01,fd=4", "twice"),
            ("fd=3,mac=02:00:00:00:00:01,speed=10", "unknown key"),
            ("fd=3,mac=02:00:00:00:00:01,", "not key=value"),
            ("", "not key=value"),
        ] {
            let e = spec.parse::<NetConfig>().unwrap_err().to_string();
            assert!(e.contains(why), "{spec:?}: {e}");
        }
    }

    #[test]
    fn nic_fds_must_differ_from_each_other_and_the_ready_fd() {
        let nic = |fd| NetConfig {
            fd,
            mac: [2, 0, 0, 0, 0, 1],
            mtu: None,
            rx_bps: None,
            tx_bps: None,
        };
        let base = VmConfig {
            kernel: Some("/k".into()),
            ..Default::default()
        };
        let ok = VmConfig {
            net: vec![nic(4), nic(5)],
            ready_fd: Some(3),
            ..base.clone()
        };
        assert!(ok.validate().is_ok());
        let twice = VmConfig {
            net: vec![nic(4), nic(4)],
            ..base.clone()
        };
        assert!(matches!(twice.validate(), Err(ConfigError::FdTwice(4))));
        let ready = VmConfig {
            net: vec![nic(3)],
            ready_fd: Some(3),
            ..base.clone()
        };
        assert!(matches!(ready.validate(), Err(ConfigError::FdTwice(3))));
        let many = VmConfig {
            net: (10..10 + MAX_NICS as i32 + 1).map(nic).collect(),
            ..base
        };
        assert!(matches!(many.validate(), Err(ConfigError::TooManyNics(_))));
    }
}
