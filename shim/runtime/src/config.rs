//! Husk's configuration: `/etc/husk/config.toml` (the shim may be pointed at
//! another file by containerd's runtime options), one file for the shim and
//! the CLI. Every key is optional; a missing file
//! means all defaults (a fresh install works without one), a file that does
//! not parse is an error (a typo must not silently boot a different VM).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::hypervisor::VmSpec;

/// Where the configuration lives unless the runtime options say otherwise.
pub const DEFAULT_PATH: &str = "/etc/husk/config.toml";

/// Where the CLI keeps images unless `storage_root` says otherwise.
pub const DEFAULT_STORAGE_ROOT: &str = "/var/lib/husk";

/// Names another config file for the CLI (tests, a second store).
pub const ENV_CONFIG: &str = "HUSK_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// The keys of `config.toml`. Defaults are documented in `docs/shim.md`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct Config {
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// The guest initramfs (husk-agent as /init).
    pub initramfs: PathBuf,
    /// vCPUs of a sandbox's VM unless the pod's `io.husk.cpus` says otherwise.
    pub vcpus: u32,
    /// Guest memory (MiB) unless the pod's `io.husk.memory` says otherwise.
    pub memory_mib: u32,
    /// husk-vmm; empty: `$HUSK_VMM`, beside the shim binary, then PATH.
    pub vmm: Option<PathBuf>,
    /// A tracing filter (`info`, `debug`, `husk=debug,guest=info`).
    pub log_level: String,
    /// The guest agent's tracing filter (`husk.log=` on the guest kernel's
    /// command line); none: the agent's own default (`info`). A VM resumed
    /// from a template has its template's, so templates are kept apart by it.
    pub guest_log_level: Option<String>,
    /// Seconds to wait for the agent after starting husk-vmm.
    pub boot_timeout_secs: u64,
    /// Whether pods may set `io.husk.*` annotations at all (Kata's
    /// `enable_annotations`); when false, one is an error.
    pub allow_annotations: bool,
    /// Ceilings on what the annotations may ask for: a pod over one is
    /// refused, never silently clamped.
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// The CLI's image store and its containers' writable layers (the shim's
    /// images are containerd's).
    pub storage_root: PathBuf,
    /// Registries (`host[:port]`) the CLI pulls from over plain HTTP;
    /// loopback registries always are.
    pub insecure_registries: Vec<String>,
    /// Mirrors the CLI tries, in order, before a registry itself
    /// (`"docker.io" = ["mirror.example:5000"]`, as containerd's and
    /// docker's `registry-mirrors`); the image keeps its own name.
    pub registry_mirrors: BTreeMap<String, Vec<String>>,
    /// A per-NIC rate limit of what a pod's guest receives and sends, in
    /// bytes per second (husk-vmm's token buckets); none when absent.
    pub net_rx_bytes_per_sec: Option<u64>,
    pub net_tx_bytes_per_sec: Option<u64>,
    /// Resume sandboxes' VMs from templates ([`crate::template`]) instead of
    /// booting each (on by default; `false` boots every VM cold).
    pub template: bool,
}

impl Default for Config {
    /// The VM's defaults are [`VmSpec::default`]'s (one place).
    fn default() -> Self {
        let vm = VmSpec::default();
        Self {
            kernel: vm.kernel,
            initramfs: vm.initramfs,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            vmm: None,
            log_level: "info".into(),
            guest_log_level: None,
            boot_timeout_secs: vm.boot_timeout.as_secs(),
            allow_annotations: true,
            max_vcpus: 16,
            max_memory_mib: 16384,
            storage_root: PathBuf::from(DEFAULT_STORAGE_ROOT),
            insecure_registries: Vec::new(),
            registry_mirrors: BTreeMap::new(),
            net_rx_bytes_per_sec: None,
            net_tx_bytes_per_sec: None,
            template: true,
        }
    }
}

impl Config {
    /// The CLI's config: `$HUSK_CONFIG` if set, else the default path.
    pub fn load_cli() -> Result<Config, ConfigError> {
        let named = std::env::var_os(ENV_CONFIG).map(PathBuf::from);
        Self::load(named.as_deref())
    }

    /// Loads `path`; a missing file at the default path gives the defaults,
    /// a missing file that was asked for by name is an error.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, named) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => {
                return Ok(Config::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path, source },
            ConfigError::Invalid { problem, .. } => ConfigError::Invalid { path, problem },
            other => other,
        })
    }

    /// Parses the text of a config file.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        let bad = |problem: &str| ConfigError::Invalid {
            path: PathBuf::new(),
            problem: problem.into(),
        };
        if c.vcpus == 0 || c.vcpus > 64 {
            return Err(bad("vcpus must be 1..=64"));
        }
        if c.memory_mib < 64 {
            return Err(bad("memory_mib must be at least 64"));
        }
        if c.boot_timeout_secs == 0 {
            return Err(bad("boot_timeout_secs must be positive"));
        }
        if c.max_vcpus < c.vcpus || c.max_vcpus > 64 {
            return Err(bad("max_vcpus must be vcpus..=64"));
        }
        if c.max_memory_mib < c.memory_mib {
            return Err(bad("max_memory_mib must be at least memory_mib"));
        }
        // Its paths go into overlayfs mount options, where these separate.
        if !c.storage_root.is_absolute()
            || c.storage_root
                .to_str()
                .is_none_or(|s| s.contains([':', ',', '\\']))
        {
            return Err(bad(
                "storage_root must be an absolute path without ':' ',' or '\\'",
            ));
        }
        // One kernel command-line word; the filter syntax needs no more.
        if let Some(f) = &c.guest_log_level {
            if f.is_empty()
                || !f
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "_-=,:.".contains(ch))
            {
                return Err(bad(
                    "guest_log_level is a tracing filter of letters, digits and _ - = , : .",
                ));
            }
        }
        for (registry, mirrors) in &c.registry_mirrors {
            let host = |h: &str| !h.is_empty() && !h.contains(['/', ' ', '@']);
            if !host(registry) || !mirrors.iter().all(|m| host(m)) {
                return Err(bad(
                    "registry_mirrors maps a registry host[:port] to mirror hosts (no scheme or path)",
                ));
            }
        }
        Ok(c)
    }
}

impl Config {
    /// Refuses `io.husk.*` annotations when the config allows none.
    pub fn check_annotations(
        &self,
        annotations: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), crate::Error> {
        if self.allow_annotations {
            return Ok(());
        }
        match annotations.iter().find(|(k, _)| k.starts_with(ANNOTATION_PREFIX)) {
            Some((k, v)) => Err(crate::Error::InvalidArgument(format!(
                "annotation {k}={v:?}: io.husk.* annotations are off (allow_annotations = false in the config)"
            ))),
            None => Ok(()),
        }
    }

    /// The VM of a pod: these defaults, sized by the pod's annotations
    /// (`io.husk.cpus`, `io.husk.memory`) where they say so. An annotation
    /// that cannot be read, is over its ceiling, or is there although the
    /// config allows none is an error naming it: a pod never runs with less
    /// isolation or other sizing than it asked for without being told.
    pub fn vm_spec(
        &self,
        annotations: &std::collections::BTreeMap<String, String>,
    ) -> Result<VmSpec, crate::Error> {
        self.check_annotations(annotations)?;
        let vcpus = sized(
            annotations,
            (ANNOTATION_CPUS, "a whole number of vCPUs, 1-64"),
            parse_cpus,
            (self.vcpus, self.max_vcpus, "max_vcpus"),
        )?;
        let memory_mib = sized(
            annotations,
            (
                ANNOTATION_MEMORY,
                "MiB, or a quantity such as 512Mi or 2Gi, at least 64 MiB",
            ),
            parse_memory_mib,
            (self.memory_mib, self.max_memory_mib, "max_memory_mib"),
        )?;
        let (vcpus, memory_mib) = self.with_pod_resources(annotations, vcpus, memory_mib)?;
        Ok(VmSpec {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            vcpus,
            memory_mib,
            net_rate: (
                self.net_rx_bytes_per_sec.filter(|b| *b > 0),
                self.net_tx_bytes_per_sec.filter(|b| *b > 0),
            ),
            boot_timeout: std::time::Duration::from_secs(self.boot_timeout_secs),
            vmm: self.vmm.clone(),
            extra_cmdline: self
                .guest_log_level
                .as_ref()
                .map(|f| format!("husk.log={f}")),
            ..VmSpec::default()
        })
    }
}

impl Config {
    /// The pod's own resources on top of the VM's defaults, as Kata sizes
    /// its VMs: CRI (containerd 1.7 on; 1.6 passes none) annotates the
    /// sandbox with the sum of its containers' CPU quota and period and
    /// memory limit. A pod that named its size with `io.husk.*` keeps it.
    fn with_pod_resources(
        &self,
        a: &std::collections::BTreeMap<String, String>,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<(u32, u32), crate::Error> {
        let num = |k: &str| a.get(k).and_then(|v| v.trim().parse::<u64>().ok());
        let refuse =
            |what: String| crate::Error::InvalidArgument(format!("the pod's resources: {what}"));
        let mut out = (vcpus, memory_mib);
        if !a.contains_key(ANNOTATION_CPUS) {
            if let (Some(q), Some(p)) = (num(CRI_CPU_QUOTA), num(CRI_CPU_PERIOD)) {
                if q > 0 && p > 0 {
                    let extra = u32::try_from(q.div_ceil(p)).unwrap_or(u32::MAX);
                    out.0 = vcpus.saturating_add(extra);
                    if out.0 > self.max_vcpus {
                        return Err(refuse(format!(
                            "{} vCPUs (quota {q}/{p} on {vcpus}) over max_vcpus = {}",
                            out.0, self.max_vcpus
                        )));
                    }
                }
            }
        }
        if !a.contains_key(ANNOTATION_MEMORY) {
            if let Some(bytes) = num(CRI_MEMORY).filter(|b| *b > 0) {
                let extra = u32::try_from(bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX);
                out.1 = memory_mib.saturating_add(extra);
                if out.1 > self.max_memory_mib {
                    return Err(refuse(format!(
                        "{} MiB ({extra} MiB on {memory_mib}) over max_memory_mib = {}",
                        out.1, self.max_memory_mib
                    )));
                }
            }
        }
        Ok(out)
    }
}

/// CRI's pod-level resources on the sandbox (containerd 1.7 and later).
pub const CRI_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const CRI_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The value of annotation `key` (read by `parse`, which `form` describes)
/// if the pod set it, else `default`; over `max` (the config key `max_key`)
/// or unreadable is an error naming the annotation.
fn sized(
    annotations: &std::collections::BTreeMap<String, String>,
    (key, form): (&str, &str),
    parse: fn(&str) -> Option<u32>,
    (default, max, max_key): (u32, u32, &str),
) -> Result<u32, crate::Error> {
    let Some(v) = annotations.get(key) else {
        return Ok(default);
    };
    let refuse =
        |why: String| crate::Error::InvalidArgument(format!("annotation {key}={v:?}: {why}"));
    match parse(v) {
        Some(n) if n <= max => Ok(n),
        Some(_) => Err(refuse(format!("over {max_key} = {max}"))),
        None => Err(refuse(form.into())),
    }
}

/// What every Husk annotation starts with.
pub const ANNOTATION_PREFIX: &str = "io.husk.";
/// Pod annotations that size the sandbox's VM.
pub const ANNOTATION_CPUS: &str = "io.husk.cpus";
pub const ANNOTATION_MEMORY: &str = "io.husk.memory";

/// Parses `io.husk.cpus`: a whole number of vCPUs, 1..=64.
pub fn parse_cpus(v: &str) -> Option<u32> {
    v.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=64).contains(n))
}

/// Parses `io.husk.memory` into MiB: a bare number is MiB; `Mi`/`M`, `Gi`/`G`
/// suffixes as Kubernetes writes quantities. At least 64 MiB.
pub fn parse_memory_mib(v: &str) -> Option<u32> {
    let v = v.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix("Gi").or_else(|| v.strip_suffix('G')) {
        (n, 1024)
    } else if let Some(n) = v.strip_suffix("Mi").or_else(|| v.strip_suffix('M')) {
        (n, 1)
    } else {
        (v, 1)
    };
    num.trim()
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&m| m >= 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_rate_limits_reach_the_vm_spec() {
        let c: Config =
            toml::from_str("net_rx_bytes_per_sec = 1000000\nnet_tx_bytes_per_sec = 0").unwrap();
        let spec = c.vm_spec(&Default::default()).unwrap();
        assert_eq!(spec.net_rate, (Some(1_000_000), None));
    }

    #[test]
    fn a_pods_cri_resources_add_to_the_vm_defaults() {
        let c = Config::default();
        let a = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let spec = c
            .vm_spec(&a(&[
                (CRI_CPU_QUOTA, "150000"),
                (CRI_CPU_PERIOD, "100000"),
                (CRI_MEMORY, "268435456"),
            ]))
            .unwrap();
        assert_eq!(spec.vcpus, c.vcpus + 2);
        assert_eq!(spec.memory_mib, c.memory_mib + 256);
        // io.husk.* wins.
        let spec = c
            .vm_spec(&a(&[(CRI_MEMORY, "268435456"), (ANNOTATION_MEMORY, "512")]))
            .unwrap();
        assert_eq!(spec.memory_mib, 512);
        let too_big = c.vm_spec(&a(&[
            (CRI_CPU_QUOTA, "100000000"),
            (CRI_CPU_PERIOD, "100000"),
        ]));
        assert!(too_big.unwrap_err().to_string().contains("max_vcpus"));
    }

    #[test]
    fn the_guest_log_level_reaches_the_kernel_command_line_as_one_word() {
        let c = Config::parse("guest_log_level = \"husk_agent=debug,info\"").unwrap();
        let spec = c.vm_spec(&Default::default()).unwrap();
        assert_eq!(
            spec.extra_cmdline.as_deref(),
            Some("husk.log=husk_agent=debug,info")
        );
        assert_eq!(
            Config::default()
                .vm_spec(&Default::default())
                .unwrap()
                .extra_cmdline,
            None
        );
        for bad in ["", "debug init=/bin/sh", "info\\n", "a\\\"b"] {
            let text = format!("guest_log_level = \"{bad}\"");
            assert!(Config::parse(&text).is_err(), "{text}");
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn every_key_is_read() {
        let c = Config::parse(
            r#"
kernel = "/k"
initramfs = "/i"
vcpus = 2
memory_mib = 512
vmm = "/usr/bin/husk-vmm"
log_level = "debug"
boot_timeout_secs = 5
"#,
        )
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.initramfs, PathBuf::from("/i"));
        assert_eq!((c.vcpus, c.memory_mib, c.boot_timeout_secs), (2, 512, 5));
        assert_eq!(c.vmm, Some(PathBuf::from("/usr/bin/husk-vmm")));
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::parse("vcpu = 2").is_err());
        assert!(Config::parse("vcpus = 0").is_err());
        assert!(Config::parse("memory_mib = 10").is_err());
        assert!(Config::parse("vcpus = \"two\"").is_err());
        assert!(Config::parse("[registry_mirrors]\n\"docker.io\" = [\"https://m/x\"]").is_err());
    }

    #[test]
    fn registry_mirrors_are_read() {
        let c = Config::parse(
            "insecure_registries = [\"m:5000\"]\n[registry_mirrors]\n\"docker.io\" = [\"m:5000\", \"m2\"]\n",
        )
        .unwrap();
        assert_eq!(c.registry_mirrors["docker.io"], ["m:5000", "m2"]);
        assert_eq!(c.insecure_registries, ["m:5000"]);
    }

    #[test]
    fn missing_default_file_is_fine_but_a_named_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert!(Config::load(Some(&missing)).is_err());
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "vcpus = 3\n").unwrap();
        assert_eq!(Config::load(Some(&p)).unwrap().vcpus, 3);
    }

    #[test]
    fn annotations_size_the_pods_vm() {
        let c = Config::parse("vcpus = 2\nmemory_mib = 300").unwrap();
        let mut a = std::collections::BTreeMap::new();
        let v = c.vm_spec(&a).unwrap();
        assert_eq!((v.vcpus, v.memory_mib), (2, 300));
        a.insert(ANNOTATION_CPUS.to_string(), "4".to_string());
        a.insert(ANNOTATION_MEMORY.to_string(), "1Gi".to_string());
        let v = c.vm_spec(&a).unwrap();
        assert_eq!((v.vcpus, v.memory_mib), (4, 1024));
        a.insert(ANNOTATION_CPUS.to_string(), "many".to_string());
        let e = c.vm_spec(&a).unwrap_err().to_string();
        assert!(e.contains("io.husk.cpus=\"many\""), "{e}");
    }

    #[test]
    fn annotations_over_a_ceiling_or_when_off_are_refused() {
        let c = Config::parse("max_memory_mib = 2048\nmax_vcpus = 4").unwrap();
        let mut a = std::collections::BTreeMap::new();
        a.insert(ANNOTATION_MEMORY.to_string(), "64Gi".to_string());
        let e = c.vm_spec(&a).unwrap_err().to_string();
        assert!(e.contains("over max_memory_mib = 2048"), "{e}");
        a.insert(ANNOTATION_MEMORY.to_string(), "2Gi".to_string());
        assert_eq!(c.vm_spec(&a).unwrap().memory_mib, 2048);
        a.insert(ANNOTATION_CPUS.to_string(), "5".to_string());
        assert!(c
            .vm_spec(&a)
            .unwrap_err()
            .to_string()
            .contains("max_vcpus = 4"));
        let off = Config::parse("allow_annotations = false").unwrap();
        let mut b = std::collections::BTreeMap::new();
        b.insert("io.husk.vsock".to_string(), "allow".to_string());
        assert!(off
            .vm_spec(&b)
            .unwrap_err()
            .to_string()
            .contains("allow_annotations = false"));
        b.clear();
        b.insert("io.kubernetes.cri.sandbox-id".to_string(), "x".to_string());
        assert!(off.vm_spec(&b).is_ok(), "other annotations are not Husk's");
        assert!(Config::parse("vcpus = 8\nmax_vcpus = 4").is_err());
    }

    #[test]
    fn annotations_size_the_vm() {
        assert_eq!(parse_cpus("2"), Some(2));
        assert_eq!(parse_cpus("0"), None);
        assert_eq!(parse_cpus("x"), None);
        assert_eq!(parse_memory_mib("512"), Some(512));
        assert_eq!(parse_memory_mib("1Gi"), Some(1024));
        assert_eq!(parse_memory_mib("256Mi"), Some(256));
        assert_eq!(parse_memory_mib("2G"), Some(2048));
        assert_eq!(parse_memory_mib("16"), None);
    }
}
