//! Turning containerd's OCI spec (the bundle's `config.json`, written for a
//! host runtime) into the spec the guest agent accepts: paths relative to
//! the sandbox share, no host namespaces, no host hooks, only mount types the
//! guest can make. Works on JSON values so that fields this shim does not
//! know pass through untouched.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::layout::in_share;

/// CRI annotations that say what a container is in its pod.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("config.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config.json: {0}")]
    Invalid(String),
}

/// What a container is to this shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Boots the VM: a CRI sandbox, or a plain `ctr run` container.
    Sandbox,
    /// Joins the VM of the named sandbox.
    Member { sandbox_id: String },
}

/// The annotations of a spec (empty when there are none).
pub fn annotations(spec: &Value) -> BTreeMap<String, String> {
    spec.get("annotations")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Sandbox or member, from the CRI annotations. Anything that is not a CRI
/// "container" with a sandbox id is its own sandbox.
pub fn role(annotations: &BTreeMap<String, String>) -> Role {
    match (
        annotations.get(CONTAINER_TYPE).map(String::as_str),
        annotations.get(SANDBOX_ID),
    ) {
        (Some("container"), Some(s)) if !s.is_empty() => Role::Member {
            sandbox_id: s.clone(),
        },
        _ => Role::Sandbox,
    }
}

/// The network namespace the spec names by path (CRI's pod namespace,
/// `/var/run/netns/cni-*`); `None` for a new one or none (a plain `ctr run`).
pub fn network_namespace(spec: &Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(Value::as_str) == Some("network"))?
        .get("path")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The spec's `net.*` sysctls: the pod's, set once in the guest.
pub fn net_sysctls(spec: &Value) -> std::collections::HashMap<String, String> {
    spec.pointer("/linux/sysctl")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.starts_with("net."))
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// A host path to show the guest: bound on the host to `share/<target>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub source: PathBuf,
    /// Relative to the share: `<container-id>/volumes/<n>`.
    pub target: PathBuf,
    pub readonly: bool,
}

/// The rewritten spec and the volumes to bind before the agent creates the
/// container.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Value,
    pub volumes: Vec<Volume>,
}

/// Host paths the guest has its own of: binding the host's would be wrong
/// (and /dev, /proc, /sys of the host must never reach a guest).
fn host_only(source: &Path) -> bool {
    ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| source == Path::new(p) || source.starts_with(p))
}

/// Mount points the guest agent makes in every container.
const AGENT_MADE: &[&str] = &["/dev", "/dev/pts", "/dev/shm"];

/// Rewrites `spec` for container `id`.
pub fn for_guest(mut spec: Value, id: &str) -> Result<GuestSpec, SpecError> {
    if id.is_empty() || Path::new(id).components().count() != 1 || id.starts_with('.') {
        return Err(SpecError::Invalid(format!(
            "container id {id:?} cannot name a directory"
        )));
    }
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| SpecError::Invalid("not a JSON object".into()))?;

    // The rootfs: the shim mounts it at <share>/<id>/rootfs.
    let readonly = obj
        .get("root")
        .and_then(|r| r.get("readonly"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    obj.insert(
        "root".into(),
        serde_json::json!({
            "path": in_share::rootfs(id),
            "readonly": readonly,
        }),
    );

    // Hooks are host programs; the guest cannot run them.
    obj.remove("hooks");

    let mut volumes = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        let mut kept = Vec::new();
        for m in mounts.drain(..) {
            let dest = m.get("destination").and_then(Value::as_str).unwrap_or("");
            let typ = m.get("type").and_then(Value::as_str).unwrap_or("");
            let opts: Vec<&str> = m
                .get("options")
                .and_then(Value::as_array)
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let is_bind = typ == "bind" || opts.iter().any(|o| *o == "bind" || *o == "rbind");
            // The agent builds /dev, /dev/pts and /dev/shm itself (a pty it
            // allocates must stay in the container's devpts); mounts further
            // below /dev (mqueue, termination-log) it makes after those.
            if AGENT_MADE.iter().any(|d| Path::new(dest) == Path::new(d)) {
                tracing::debug!(destination = dest, "the guest agent makes this itself");
                continue;
            }
            if typ == "cgroup" {
                // The guest kernel has cgroup v2 only.
                let mut m = m.clone();
                m["type"] = Value::String("cgroup2".into());
                m["source"] = Value::String("cgroup2".into());
                kept.push(m);
                continue;
            }
            if !is_bind {
                if husk_agent_api::mount::GUEST_MOUNT_TYPES.contains(&typ) {
                    kept.push(m);
                } else {
                    tracing::warn!(
                        destination = dest,
                        r#type = typ,
                        "dropping a mount the guest cannot make"
                    );
                }
                continue;
            }
            let source = PathBuf::from(m.get("source").and_then(Value::as_str).unwrap_or(""));
            if !source.is_absolute()
                || source.components().any(|c| c == Component::ParentDir)
                || host_only(&source)
            {
                tracing::info!(destination = dest, source = %source.display(), "not sharing this host path with the guest");
                continue;
            }
            let target = in_share::volume(id, volumes.len());
            let mut m = m.clone();
            m["source"] = Value::String(target.display().to_string());
            m["type"] = Value::String("bind".into());
            volumes.push(Volume {
                source,
                target,
                readonly: opts.contains(&"ro"),
            });
            kept.push(m);
        }
        *mounts = kept;
    }

    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        if let Some(nss) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            // Namespace paths name host processes; the network is the VM's
            // own (one per pod), so the container stays in the guest's.
            nss.retain(|ns| ns.get("type").and_then(Value::as_str) != Some("network"));
            for ns in nss.iter_mut() {
                if let Some(o) = ns.as_object_mut() {
                    o.remove("path");
                }
            }
        }
        // `linux.devices` goes as it is: the agent makes the nodes in the
        // guest with the same numbers, which name the guest kernel's
        // drivers (fuse, kmsg: what runc would give on a host with them).
        // Nothing of the host's device is passed through.
    }
    Ok(GuestSpec { spec, volumes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_network_namespace_and_sysctls_are_found() {
        let spec = serde_json::json!({"linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}],
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shmmax": "1"}
        }});
        assert_eq!(
            network_namespace(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        assert_eq!(net_sysctls(&spec).len(), 1);
        let fresh = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(network_namespace(&fresh), None);
        assert_eq!(network_namespace(&serde_json::json!({})), None);
    }
    use serde_json::json;

    fn containerd_spec() -> Value {
        json!({
            "ociVersion": "1.0.2-dev",
            "process": {"args": ["echo", "hello"], "cwd": "/", "env": ["PATH=/bin"]},
            "root": {"path": "rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "source": "/var/lib/x/hosts", "options": ["bind"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
                {"destination": "/dev/termination-log", "type": "bind", "source": "/var/lib/x/log", "options": ["bind"]},
                {"destination": "/x", "type": "fuse", "source": "f"},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]}
            ],
            "annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1"},
            "linux": {
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/proc/4/ns/net"},
                    {"type": "ipc", "path": "/proc/4/ns/ipc"}
                ],
                "devices": [{"path": "/dev/fuse"}],
                "cgroupsPath": "/default/c1"
            }
        })
    }

    #[test]
    fn rootfs_and_binds_move_into_the_share() {
        let g = for_guest(containerd_spec(), "c1").unwrap();
        assert_eq!(g.spec["root"]["path"], "c1/rootfs");
        assert!(g.spec.get("hooks").is_none());
        let mounts = g.spec["mounts"].as_array().unwrap();
        let dests: Vec<&str> = mounts
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/data",
                "/etc/hosts",
                "/dev/mqueue",
                "/dev/termination-log",
                "/sys/fs/cgroup"
            ]
        );
        assert_eq!(mounts[1]["source"], "c1/volumes/0");
        assert_eq!(mounts[2]["source"], "c1/volumes/1");
        assert_eq!(mounts[2]["type"], "bind");
        assert_eq!(mounts[4]["source"], "c1/volumes/2");
        assert_eq!(mounts[5]["type"], "cgroup2");
        assert_eq!(
            g.volumes,
            vec![
                Volume {
                    source: "/srv/data".into(),
                    target: "c1/volumes/0".into(),
                    readonly: true
                },
                Volume {
                    source: "/var/lib/x/hosts".into(),
                    target: "c1/volumes/1".into(),
                    readonly: false
                },
                Volume {
                    source: "/var/lib/x/log".into(),
                    target: "c1/volumes/2".into(),
                    readonly: false
                },
            ]
        );
    }

    #[test]
    fn host_namespaces_are_dropped() {
        let g = for_guest(containerd_spec(), "c1").unwrap();
        assert_eq!(
            g.spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc"}])
        );
        assert_eq!(
            g.spec["linux"]["devices"],
            json!([{"path": "/dev/fuse"}]),
            "device nodes are the guest's to make"
        );
    }

    #[test]
    fn readonly_root_is_kept_and_bad_ids_refused() {
        let mut s = containerd_spec();
        s["root"]["readonly"] = json!(true);
        assert_eq!(for_guest(s, "c").unwrap().spec["root"]["readonly"], true);
        for id in ["", "../x", "a/b", ".hidden"] {
            assert!(for_guest(containerd_spec(), id).is_err(), "{id}");
        }
    }

    #[test]
    fn roles_from_annotations() {
        let spec = containerd_spec();
        assert_eq!(
            role(&annotations(&spec)),
            Role::Member {
                sandbox_id: "pod1".into()
            }
        );
        let mut sb = BTreeMap::new();
        sb.insert(CONTAINER_TYPE.to_string(), "sandbox".to_string());
        sb.insert(SANDBOX_ID.to_string(), "pod1".to_string());
        assert_eq!(role(&sb), Role::Sandbox);
        assert_eq!(role(&BTreeMap::new()), Role::Sandbox);
    }
}
