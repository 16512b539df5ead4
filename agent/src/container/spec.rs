//! Validation of an OCI runtime spec (config.json) received from the host.
//!
//! The host is trusted more than the guest's workloads, but a spec is still
//! data from outside the agent: containerd passes through what a user or a
//! Kubernetes manifest wrote. Everything the agent will act on is checked
//! here, once, into [`ValidSpec`]; later stages use only that.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, LinuxSeccomp, Process, Spec};

/// What is wrong with a spec, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("OCI spec: {field}: {problem}")]
pub struct SpecError {
    /// The JSON path of the field, e.g. `process.args` or `mounts[2].type`.
    pub field: String,
    pub problem: String,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Mount types the agent knows how to set up in the guest.
pub use husk_agent_api::mount::GUEST_MOUNT_TYPES as MOUNT_TYPES;

/// A mount, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub destination: PathBuf,
    pub kind: String,
    pub source: Option<PathBuf>,
    pub options: Vec<String>,
}

/// Capability sets as bit masks (bit n = capability n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

/// A process to run (a container's own, or an exec), checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidProcess {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub terminal: bool,
    /// `None`: the spec names none, so the process keeps the full set root
    /// has (OCI leaves this to the runtime; runc does the same).
    pub capabilities: Option<CapSets>,
    /// (resource, soft, hard)
    pub rlimits: Vec<(u32, u64, u64)>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
}

/// What kind of node a `linux.devices` entry makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Char,
    Block,
    Fifo,
}

/// A node `linux.devices` asks for in the container's `/dev`, checked.
/// The numbers are the guest kernel's: a device whose driver the guest has
/// (fuse, tun, kmsg) works as it does under runc; any other node is made
/// and opening it fails (ENXIO), as on a host without that driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Below `/dev`, e.g. `net/tun`.
    pub path: PathBuf,
    pub kind: NodeKind,
    pub major: u32,
    pub minor: u32,
    /// Permission bits only.
    pub mode: u32,
    /// In the agent's (the guest's) user namespace: mapped already when the
    /// container has its own.
    pub uid: u32,
    pub gid: u32,
}

/// At most this many `linux.devices` entries (a privileged container on a
/// big host lists a few hundred).
pub const MAX_DEVICE_NODES: usize = 1024;

/// `/dev` entries every container gets from the agent (process.rs): a spec
/// that lists one (as `ctr run --privileged` lists every host node) keeps
/// the agent's, as runc keeps its defaults. Subtrees the agent mounts
/// (`pts`, `shm`) are left alone the same way.
const AGENT_DEV_ENTRIES: &[&str] = &[
    "null", "zero", "full", "random", "urandom", "tty", "ptmx", "console", "pts", "shm", "fd",
    "stdin", "stdout", "stderr",
];

/// The parts of a spec the agent acts on, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    pub process: ValidProcess,
    /// The rootfs, relative to the sandbox's shared directory.
    pub root: PathBuf,
    pub root_readonly: bool,
    pub hostname: Option<String>,
    pub mounts: Vec<Mount>,
    pub namespaces: Vec<LinuxNamespaceType>,
    pub masked_paths: Vec<PathBuf>,
    pub readonly_paths: Vec<PathBuf>,
    /// (key, value), keys checked against the namespaced ones.
    pub sysctls: Vec<(String, String)>,
    pub resources: Option<LinuxResources>,
    pub seccomp: Option<LinuxSeccomp>,
    /// The spec's annotations allow AF_VSOCK ([`super::seccomp::VSOCK_ANNOTATION`]).
    pub vsock_allowed: bool,
    /// (container id, host id, size) for a user namespace; empty without.
    pub uid_mappings: Vec<(u32, u32, u32)>,
    pub gid_mappings: Vec<(u32, u32, u32)>,
    /// `linux.devices`, less the agent's own entries.
    pub devices: Vec<DeviceNode>,
}

/// Sysctls a container may set: the ones its own namespaces scope (the
/// same rule runc applies). Others would change the whole VM under the
/// sandbox's other containers.
fn sysctl_allowed(key: &str, own_ipc: bool, own_uts: bool) -> bool {
    const IPC: &[&str] = &[
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    (own_ipc && (IPC.contains(&key) || key.starts_with("fs.mqueue.")))
        || (own_uts && (key == "kernel.domainname" || key == "kernel.hostname"))
        || key.starts_with("net.")
}

// The constants are u32 with glibc and c_int with musl (the agent's libc).
#[allow(clippy::unnecessary_cast)]
fn rlimit_resource(t: oci_spec::runtime::PosixRlimitType) -> u32 {
    use oci_spec::runtime::PosixRlimitType as R;
    (match t {
        R::RlimitCpu => libc::RLIMIT_CPU,
        R::RlimitFsize => libc::RLIMIT_FSIZE,
        R::RlimitData => libc::RLIMIT_DATA,
        R::RlimitStack => libc::RLIMIT_STACK,
        R::RlimitCore => libc::RLIMIT_CORE,
        R::RlimitRss => libc::RLIMIT_RSS,
        R::RlimitNproc => libc::RLIMIT_NPROC,
        R::RlimitNofile => libc::RLIMIT_NOFILE,
        R::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        R::RlimitAs => libc::RLIMIT_AS,
        R::RlimitLocks => libc::RLIMIT_LOCKS,
        R::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        R::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        R::RlimitNice => libc::RLIMIT_NICE,
        R::RlimitRtprio => libc::RLIMIT_RTPRIO,
        R::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as u32
}

fn cap_mask(field: &str, set: &Option<oci_spec::runtime::Capabilities>) -> Result<u64, SpecError> {
    let mut mask = 0u64;
    for c in set.iter().flatten() {
        // The OCI names ("CAP_CHOWN") through serde, the numbers from caps.
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let cap: caps::Capability = name.parse().map_err(|_| {
            err(
                field,
                format!("{name:?} is not a capability this agent knows"),
            )
        })?;
        mask |= 1u64 << cap.index();
    }
    Ok(mask)
}

/// Checks a `process` object: the container's own, or one to exec.
pub fn validate_process(process: &Process, prefix: &str) -> Result<ValidProcess, SpecError> {
    let f = |name: &str| format!("{prefix}.{name}");
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(err(f("args"), "must name a program to run"));
    }
    let env = process.env().clone().unwrap_or_default();
    for (i, e) in env.iter().enumerate() {
        if !e.contains('=') || e.starts_with('=') {
            return Err(err(
                f(&format!("env[{i}]")),
                format!("{e:?} is not NAME=value"),
            ));
        }
    }
    let cwd = process.cwd().clone();
    absolute_clean(&f("cwd"), &cwd)?;
    let user = process.user();
    let capabilities = match process.capabilities() {
        None => None,
        Some(c) => Some(CapSets {
            bounding: cap_mask(&f("capabilities.bounding"), c.bounding())?,
            effective: cap_mask(&f("capabilities.effective"), c.effective())?,
            permitted: cap_mask(&f("capabilities.permitted"), c.permitted())?,
            inheritable: cap_mask(&f("capabilities.inheritable"), c.inheritable())?,
            ambient: cap_mask(&f("capabilities.ambient"), c.ambient())?,
        }),
    };
    let mut rlimits = Vec::new();
    for (i, r) in process.rlimits().iter().flatten().enumerate() {
        if r.soft() > r.hard() {
            return Err(err(
                f(&format!("rlimits[{i}]")),
                format!("soft {} is above hard {}", r.soft(), r.hard()),
            ));
        }
        rlimits.push((rlimit_resource(r.typ()), r.soft(), r.hard()));
    }
    let oom_score_adj = process.oom_score_adj();
    if let Some(o) = oom_score_adj {
        if !(-1000..=1000).contains(&o) {
            return Err(err(
                f("oomScoreAdj"),
                format!("{o} is outside -1000..=1000"),
            ));
        }
    }
    Ok(ValidProcess {
        args,
        env,
        cwd,
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        terminal: process.terminal().unwrap_or(false),
        capabilities,
        rlimits,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        oom_score_adj,
    })
}

/// Parses and checks the JSON of a `process` object (ExecProcess).
pub fn validate_exec(json: &[u8]) -> Result<ValidProcess, SpecError> {
    let p: Process = serde_json::from_slice(json).map_err(|e| err("process", e.to_string()))?;
    validate_process(&p, "process")
}

/// An absolute path with no `..` (destinations inside the container).
fn absolute_clean(field: &str, p: &Path) -> Result<(), SpecError> {
    if !p.is_absolute() {
        return Err(err(
            field,
            format!("{} is not an absolute path", p.display()),
        ));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(err(field, format!("{} contains '..'", p.display())));
    }
    Ok(())
}

/// Parses and checks `json` (the bytes of config.json).
pub fn validate(json: &[u8]) -> Result<ValidSpec, SpecError> {
    let spec: Spec = serde_json::from_slice(json).map_err(|e| err("(document)", e.to_string()))?;

    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| err("process", "missing: nothing to run"))?;
    let process = validate_process(process, "process")?;

    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| err("root", "missing: no root filesystem"))?;
    let root_path = root.path().clone();
    if root_path.as_os_str().is_empty() {
        return Err(err("root.path", "is empty"));
    }
    // The rootfs lives in the sandbox's share: a relative path below it.
    if root_path.is_absolute() || root_path.components().any(|c| c == Component::ParentDir) {
        return Err(err(
            "root.path",
            format!(
                "{} must be relative to the sandbox share, without '..'",
                root_path.display()
            ),
        ));
    }

    let mut mounts = Vec::new();
    for (i, m) in spec.mounts().clone().unwrap_or_default().iter().enumerate() {
        let field = |f: &str| format!("mounts[{i}].{f}");
        absolute_clean(&field("destination"), m.destination())?;
        let options = m.options().clone().unwrap_or_default();
        let kind = match m.typ().as_deref() {
            // runc treats a missing type with "bind"/"rbind" options as a bind mount.
            None | Some("none") | Some("")
                if husk_agent_api::mount::parse_options(&options).is_bind() =>
            {
                "bind".to_string()
            }
            None | Some("") => return Err(err(field("type"), "missing")),
            Some(t) if MOUNT_TYPES.contains(&t) => t.to_string(),
            Some(t) => {
                return Err(err(
                    field("type"),
                    format!(
                        "{t:?} is not a mount type the guest supports ({})",
                        MOUNT_TYPES.join(", ")
                    ),
                ))
            }
        };
        if kind == "bind" {
            let src = m
                .source()
                .as_ref()
                .ok_or_else(|| err(field("source"), "a bind mount needs a source"))?;
            if src.as_os_str().is_empty() || src.components().any(|c| c == Component::ParentDir) {
                return Err(err(
                    field("source"),
                    format!("{} is empty or contains '..'", src.display()),
                ));
            }
        }
        mounts.push(Mount {
            destination: m.destination().clone(),
            kind,
            source: m.source().clone(),
            options,
        });
    }

    let mut namespaces = Vec::new();
    let (mut masked_paths, mut readonly_paths, mut sysctls) = (Vec::new(), Vec::new(), Vec::new());
    let (mut resources, mut seccomp) = (None, None);
    let mut uid_mappings: Vec<(u32, u32, u32)> = Vec::new();
    let mut gid_mappings: Vec<(u32, u32, u32)> = Vec::new();
    if let Some(linux) = spec.linux() {
        let mut seen = HashSet::new();
        for (i, ns) in linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if !seen.insert(ns.typ()) {
                return Err(err(
                    format!("linux.namespaces[{i}]"),
                    format!("{:?} is listed twice", ns.typ()),
                ));
            }
            if let Some(p) = ns.path() {
                absolute_clean(&format!("linux.namespaces[{i}].path"), p)?;
            }
            namespaces.push(ns.typ());
        }
        for (name, list, out) in [
            ("maskedPaths", linux.masked_paths(), &mut masked_paths),
            ("readonlyPaths", linux.readonly_paths(), &mut readonly_paths),
        ] {
            for (i, p) in list.iter().flatten().enumerate() {
                let p = PathBuf::from(p);
                absolute_clean(&format!("linux.{name}[{i}]"), &p)?;
                out.push(p);
            }
        }
        let own = |t| namespaces.contains(&t);
        let (own_ipc, own_uts) = (own(LinuxNamespaceType::Ipc), own(LinuxNamespaceType::Uts));
        let mut keys: Vec<_> = linux.sysctl().iter().flatten().collect();
        keys.sort();
        for (k, v) in keys {
            let field = format!("linux.sysctl.{k}");
            if k.is_empty()
                || k.contains(['/', '\0'])
                || k.split('.').any(|p| p.is_empty() || p == "..")
            {
                return Err(err(field, "is not a sysctl name"));
            }
            if !sysctl_allowed(k, own_ipc, own_uts) {
                return Err(err(
                    field,
                    "is not scoped to the container's namespaces (it would change the whole sandbox)",
                ));
            }
            if v.contains('\0') {
                return Err(err(field, "holds a NUL byte"));
            }
            sysctls.push((k.clone(), v.clone()));
        }
        resources = linux.resources().clone();
        seccomp = linux.seccomp().clone();
        if namespaces.contains(&LinuxNamespaceType::User) {
            for (name, list, out) in [
                ("uidMappings", linux.uid_mappings(), &mut uid_mappings),
                ("gidMappings", linux.gid_mappings(), &mut gid_mappings),
            ] {
                let list = list.clone().unwrap_or_default();
                if list.is_empty() || list.len() > 340 {
                    return Err(err(
                        format!("linux.{name}"),
                        "a user namespace needs 1 to 340 mappings",
                    ));
                }
                for (i, m) in list.iter().enumerate() {
                    if m.size() == 0
                        || m.container_id().checked_add(m.size()).is_none()
                        || m.host_id().checked_add(m.size()).is_none()
                    {
                        return Err(err(
                            format!("linux.{name}[{i}]"),
                            "is empty or runs past 2^32",
                        ));
                    }
                    out.push((m.container_id(), m.host_id(), m.size()));
                }
            }
        }
    }

    let devices = match spec.linux() {
        Some(linux) => device_nodes(
            linux.devices().as_deref().unwrap_or_default(),
            &uid_mappings,
            &gid_mappings,
        )?,
        None => Vec::new(),
    };

    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    if let Some(h) = &hostname {
        if h.len() > 64 || h.contains(['/', '\0', '\n']) {
            return Err(err("hostname", format!("{h:?} is not a usable hostname")));
        }
    }

    Ok(ValidSpec {
        process,
        root: root_path,
        root_readonly: root.readonly().unwrap_or(false),
        hostname,
        mounts,
        namespaces,
        masked_paths,
        readonly_paths,
        sysctls,
        resources,
        seccomp,
        vsock_allowed: spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(super::seccomp::VSOCK_ANNOTATION))
            .is_some_and(|v| v == "allow"),
        uid_mappings,
        gid_mappings,
        devices,
    })
}

/// `id` of the container's user namespace in the agent's, through
/// `mappings` (container id, host id, size); itself without a user
/// namespace.
fn map_id(id: u32, mappings: &[(u32, u32, u32)]) -> Option<u32> {
    if mappings.is_empty() {
        return Some(id);
    }
    mappings
        .iter()
        .find(|(c, _, n)| id >= *c && id - c < *n)
        .map(|(c, h, _)| h + (id - c))
}

/// Checks `linux.devices`.
fn device_nodes(
    list: &[oci_spec::runtime::LinuxDevice],
    uid_mappings: &[(u32, u32, u32)],
    gid_mappings: &[(u32, u32, u32)],
) -> Result<Vec<DeviceNode>, SpecError> {
    use oci_spec::runtime::LinuxDeviceType as T;
    if list.len() > MAX_DEVICE_NODES {
        return Err(err(
            "linux.devices",
            format!("{} entries; at most {MAX_DEVICE_NODES}", list.len()),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, d) in list.iter().enumerate() {
        let field = |f: &str| format!("linux.devices[{i}].{f}");
        absolute_clean(&field("path"), d.path())?;
        let rel = match d.path().strip_prefix("/dev") {
            Ok(rel) if rel.components().all(|c| matches!(c, Component::Normal(_))) && rel.components().next().is_some() => rel.to_path_buf(),
            _ => {
                return Err(err(
                    field("path"),
                    format!(
                        "{}: only nodes below /dev are made (the rest of the rootfs is the host's share)",
                        d.path().display()
                    ),
                ))
            }
        };
        if !seen.insert(rel.clone()) {
            return Err(err(
                field("path"),
                format!("{} is listed twice", d.path().display()),
            ));
        }
        let first = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        if first.is_some_and(|f| AGENT_DEV_ENTRIES.contains(&f.as_str())) {
            continue;
        }
        let kind = match d.typ() {
            T::C | T::U => NodeKind::Char,
            T::B => NodeKind::Block,
            T::P => NodeKind::Fifo,
            T::A => return Err(err(field("type"), "a node is c, u, b or p")),
        };
        let number = |n: i64, what: &str| {
            u32::try_from(n).map_err(|_| err(field(what), format!("{n} is out of range")))
        };
        let (major, minor) = match kind {
            NodeKind::Fifo => (0, 0),
            _ => (number(d.major(), "major")?, number(d.minor(), "minor")?),
        };
        let uid = d.uid().unwrap_or(0);
        let gid = d.gid().unwrap_or(0);
        out.push(DeviceNode {
            path: rel,
            kind,
            major,
            minor,
            mode: d.file_mode().unwrap_or(0o666) & 0o777,
            uid: map_id(uid, uid_mappings)
                .ok_or_else(|| err(field("uid"), format!("{uid} is not mapped")))?,
            gid: map_id(gid, gid_mappings)
                .ok_or_else(|| err(field("gid"), format!("{gid} is not mapped")))?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn good() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
                "args": ["/bin/sh", "-c", "echo hi"],
                "env": ["PATH=/usr/bin:/bin", "TERM=xterm"],
                "cwd": "/"
            },
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "pod",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "source": "volumes/data", "options": ["rbind", "ro"]}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"}]}
        })
    }

    fn check(v: &Value) -> Result<ValidSpec, SpecError> {
        validate(serde_json::to_string(v).unwrap().as_bytes())
    }

    fn refused(mut v: Value, edit: impl FnOnce(&mut Value), field: &str) {
        edit(&mut v);
        let e = check(&v).expect_err("a bad spec was accepted");
        assert_eq!(e.field, field, "{e}");
    }

    #[test]
    fn a_good_spec_is_taken_apart() {
        let s = check(&good()).unwrap();
        assert_eq!(s.process.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            (
                s.process.uid,
                s.process.gid,
                s.process.additional_gids.clone()
            ),
            (1000, 1000, vec![10, 20])
        );
        assert_eq!(s.root, Path::new("rootfs"));
        assert!(s.root_readonly);
        assert_eq!(s.hostname.as_deref(), Some("pod"));
        assert_eq!(s.mounts[1].kind, "bind");
        assert_eq!(s.namespaces.len(), 3);
    }

    #[test]
    fn device_nodes_are_checked_and_the_agents_own_kept() {
        let mut v = good();
        v["linux"]["devices"] = json!([
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o4666, "uid": 1000},
            {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200},
            {"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
            {"path": "/dev/pts/0", "type": "c", "major": 136, "minor": 0},
            {"path": "/dev/pipe", "type": "p"}
        ]);
        let d = check(&v).unwrap().devices;
        let paths: Vec<_> = d.iter().map(|n| n.path.display().to_string()).collect();
        assert_eq!(
            paths,
            ["fuse", "net/tun", "pipe"],
            "the agent's own entries stay its own"
        );
        assert_eq!(
            (d[0].kind, d[0].major, d[0].minor),
            (NodeKind::Char, 10, 229)
        );
        assert_eq!(
            (d[0].mode, d[0].uid, d[0].gid),
            (0o666, 1000, 0),
            "no set-id bits"
        );
        assert_eq!((d[1].mode, d[1].uid), (0o666, 0), "runc's defaults");
        assert_eq!(d[2].kind, NodeKind::Fifo);

        // In a user namespace the owner is mapped to the guest's ids.
        v["linux"]["namespaces"] = json!([{"type": "user"}, {"type": "mount"}]);
        v["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        v["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        let d = check(&v).unwrap().devices;
        assert_eq!((d[0].uid, d[0].gid), (101000, 100000));
        refused(
            v,
            |v| v["linux"]["devices"][0]["uid"] = json!(70000),
            "linux.devices[0].uid",
        );

        for (bad, field) in [
            (
                json!({"path": "/etc/passwd", "type": "c", "major": 1, "minor": 3}),
                "path",
            ),
            (
                json!({"path": "/dev", "type": "c", "major": 1, "minor": 3}),
                "path",
            ),
            (
                json!({"path": "/dev/../etc/x", "type": "c", "major": 1, "minor": 3}),
                "path",
            ),
            (
                json!({"path": "dev/x", "type": "c", "major": 1, "minor": 3}),
                "path",
            ),
            (json!({"path": "/dev/x", "type": "a"}), "type"),
            (
                json!({"path": "/dev/x", "type": "c", "major": -1, "minor": 3}),
                "major",
            ),
            (
                json!({"path": "/dev/x", "type": "b", "major": 8, "minor": 1u64 << 33}),
                "minor",
            ),
        ] {
            refused(
                good(),
                |v| v["linux"]["devices"] = json!([bad]),
                &format!("linux.devices[0].{field}"),
            );
        }
        let twice = json!({"path": "/dev/x", "type": "c", "major": 1, "minor": 3});
        refused(
            good(),
            |v| v["linux"]["devices"] = json!([twice, twice]),
            "linux.devices[1].path",
        );
        let many: Vec<Value> = (0..=MAX_DEVICE_NODES)
            .map(|i| json!({"path": format!("/dev/n{i}"), "type": "c", "major": 1, "minor": 3}))
            .collect();
        refused(
            good(),
            |v| v["linux"]["devices"] = json!(many),
            "linux.devices",
        );
    }

    #[test]
    fn malformed_specs_name_the_field() {
        refused(
            good(),
            |v| drop(v.as_object_mut().unwrap().remove("process")),
            "process",
        );
        refused(good(), |v| v["process"]["args"] = json!([]), "process.args");
        refused(
            good(),
            |v| v["process"]["cwd"] = json!("relative/dir"),
            "process.cwd",
        );
        refused(
            good(),
            |v| v["process"]["cwd"] = json!("/a/../../b"),
            "process.cwd",
        );
        refused(
            good(),
            |v| v["process"]["env"] = json!(["OK=1", "NOEQUALS"]),
            "process.env[1]",
        );
        refused(
            good(),
            |v| drop(v.as_object_mut().unwrap().remove("root")),
            "root",
        );
        refused(
            good(),
            |v| v["root"]["path"] = json!("/abs/rootfs"),
            "root.path",
        );
        refused(
            good(),
            |v| v["root"]["path"] = json!("../outside"),
            "root.path",
        );
        refused(
            good(),
            |v| v["mounts"][0]["type"] = json!("nfs"),
            "mounts[0].type",
        );
        refused(
            good(),
            |v| v["mounts"][0]["destination"] = json!("proc"),
            "mounts[0].destination",
        );
        refused(
            good(),
            |v| v["mounts"][1]["source"] = json!("../../etc"),
            "mounts[1].source",
        );
        refused(
            good(),
            |v| v["mounts"][1] = json!({"destination": "/x", "options": ["ro"]}),
            "mounts[1].type",
        );
        refused(
            good(),
            |v| v["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "pid"}]),
            "linux.namespaces[1]",
        );
        refused(good(), |v| v["hostname"] = json!("a/b"), "hostname");
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"{\"process\": 5}",
            &[0xff, 0xfe][..],
        ] {
            let e = validate(bad).unwrap_err();
            assert_eq!(e.field, "(document)", "{bad:?}: {e}");
        }
        // serde reads an empty array as a struct of defaults: still refused.
        assert_eq!(validate(b"[]").unwrap_err().field, "process");
    }
}
