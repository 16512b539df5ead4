//! The CLI's containers as docker keeps them: a record per container in
//! `<storage_root>/containers/<id>/` that outlives its VM, so that `ps -a`,
//! `logs`, `start`, `stop`, `inspect` and `rm` work on it.
//!
//! ```text
//! container.json   what to run: the guest spec, the VM's shape, the rootfs
//! state.json       created | running | exited, exit code, times, an error
//! log              the container's output, a record a line (docker's
//!                  json-file format, both streams), at most 64 MiB
//! lock             held by the `husk` that runs the container (attached, or
//!                  the monitor a detached one gets): held means running
//! upper/, work/    an image container's writable layer
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use husk_runtime::config::Config;
pub use husk_runtime::container::logfile::rfc3339;
use serde::{Deserialize, Serialize};

/// An image container's overlay, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OverlayRecord {
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub readonly: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindRecord {
    pub source: PathBuf,
    pub target: PathBuf,
    pub readonly: bool,
}

/// What `husk run` was asked to run, enough to start it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// The image's name, or `--rootfs DIR`.
    pub image: String,
    /// The image config's digest (`husk rmi` checks it).
    pub image_id: Option<String>,
    pub command: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    /// The OCI spec for the guest.
    pub spec: serde_json::Value,
    pub cpus: u32,
    pub memory_mib: u32,
    pub boot_timeout_secs: u64,
    pub binds: Vec<BindRecord>,
    pub overlay: Option<OverlayRecord>,
    /// The agent's in-memory layer over a read-only rootfs (`--rootfs`).
    pub rootfs_overlay: bool,
    pub tty: bool,
    /// `--rm`: the record goes when the container ends.
    pub auto_remove: bool,
    /// `--network`: "bridge" (the default) or "none"; absent in records
    /// from before the CLI had a network, which had none.
    #[serde(default)]
    pub network: Option<String>,
    /// `-p`: ports published on the host.
    #[serde(default)]
    pub publish: Vec<husk_runtime::network::bridge::Publish>,
    /// `--no-template`: its VM boots, whatever the config says.
    #[serde(default)]
    pub no_template: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Created,
    Running,
    Exited,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub started: Option<u64>,
    pub finished: Option<u64>,
    /// Why it did not start or run to its end, if it did not.
    pub error: Option<String>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One container's directory.
#[derive(Debug, Clone)]
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn of(cfg: &Config, id: &str) -> Dir {
        Dir(cfg.storage_root.join("containers").join(id))
    }

    pub fn exists(&self) -> bool {
        self.0.join("container.json").is_file()
    }

    pub fn log(&self) -> PathBuf {
        self.0.join("log")
    }

    pub fn record(&self) -> Result<Record> {
        let p = self.0.join("container.json");
        let b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("{}", p.display()))
    }

    pub fn save_record(&self, r: &Record) -> Result<()> {
        write_atomic(
            &self.0.join("container.json"),
            &serde_json::to_vec_pretty(r)?,
        )
    }

    pub fn state(&self) -> RunState {
        std::fs::read(self.0.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save_state(&self, s: &RunState) -> Result<()> {
        write_atomic(&self.0.join("state.json"), &serde_json::to_vec_pretty(s)?)
    }

    /// Takes the run lock, or says who holds it (None: it is running).
    pub fn try_lock(&self) -> Option<nix::fcntl::Flock<File>> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.0.join("lock"))
            .ok()?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
    }

    /// Whether a `husk` runs it now.
    pub fn running(&self) -> bool {
        self.0.join("lock").exists() && self.try_lock().is_none()
    }

    /// Waits up to `limit` for the container's `husk` to finish.
    pub async fn wait_stopped(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.running() {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        true
    }

    pub fn remove(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.0).with_context(|| format!("removing {}", self.0.display()))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Every container directory, by id.
pub fn all(cfg: &Config) -> Vec<(String, Dir)> {
    let root = cfg.storage_root.join("containers");
    let mut v: Vec<(String, Dir)> = std::fs::read_dir(&root)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .map(|id| {
                    let dir = Dir(root.join(&id));
                    (id, dir)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Tidies what a killed `husk` left: a record that says running with no
/// one holding its lock is marked exited; a directory without a record
/// (a `husk run` that died while making it) and unlocked is removed.
pub fn reap(cfg: &Config) {
    let mut idle = Vec::new();
    for (id, d) in all(cfg) {
        let Some(_held) = d.try_lock() else { continue };
        if !d.exists() {
            tracing::info!(id, "removing a container left half-made");
            let _ = std::fs::remove_dir_all(&d.0);
        } else {
            let mut s = d.state();
            if s.status == Status::Running {
                s.status = Status::Exited;
                s.exit_code = s.exit_code.or(Some(137));
                s.finished = Some(now());
                s.error
                    .get_or_insert_with(|| "its husk process was killed".into());
                let _ = d.save_state(&s);
            }
        }
        idle.push(id);
    }
    // No process holds these containers, so no VM of theirs runs: a VM
    // whose husk was killed (booting or running) dies with it (the death
    // signal) and leaves its cgroup; the cgroups go once it has (after the
    // locks: this may wait a moment; an absent cgroup costs one rmdir).
    for id in idle {
        husk_runtime::sandbox::cgroup::remove_stale(&husk_runtime::sandbox::cgroup::cli_vm_path(
            &id,
        ));
    }
}

/// docker's STATUS column: "Up 5 minutes", "Exited (0) 2 hours ago", "Created".
pub fn status_text(d: &Dir) -> String {
    let s = d.state();
    let running = d.running();
    match (running, &s.status) {
        (true, _) => format!(
            "Up {}",
            super::images::ago(s.started.map(|t| t as i64)).trim_end_matches(" ago")
        ),
        (false, Status::Exited) | (false, Status::Running) => format!(
            "Exited ({}) {}",
            s.exit_code.unwrap_or(-1),
            super::images::ago(s.finished.map(|t| t as i64))
        ),
        (false, Status::Created) => "Created".into(),
    }
}

/// A container's id, checked to name one.
pub fn find(cfg: &Config, id: &str) -> Result<Dir> {
    husk_runtime::layout::check_id("container", id)?;
    let d = Dir::of(cfg, id);
    if !d.exists() {
        bail!("No such container: {id}");
    }
    Ok(d)
}

/// docker's `inspect` shape, for the fields Husk has.
pub fn inspect(d: &Dir) -> Result<serde_json::Value> {
    let r = d.record()?;
    let s = d.state();
    let running = d.running();
    let time = |t: Option<u64>| {
        t.map(rfc3339)
            .unwrap_or_else(|| "0001-01-01T00:00:00Z".into())
    };
    Ok(serde_json::json!({
        "Id": r.id,
        "Name": format!("/{}", r.id),
        "Created": rfc3339(r.created),
        "Path": r.command.first(),
        "Args": r.command.get(1..).unwrap_or_default(),
        "State": {
            "Status": if running { "running" } else { match s.status { Status::Created => "created", _ => "exited" } },
            "Running": running,
            "ExitCode": s.exit_code.unwrap_or(0),
            "Error": s.error.unwrap_or_default(),
            "StartedAt": time(s.started),
            "FinishedAt": time(s.finished),
        },
        "Image": r.image_id,
        "Config": {
            "Image": r.image,
            "Cmd": r.command,
            "Env": r.spec["process"]["env"],
            "WorkingDir": r.spec["process"]["cwd"],
            "User": format!("{}:{}", r.spec["process"]["user"]["uid"], r.spec["process"]["user"]["gid"]),
            "Tty": r.tty,
        },
        "HostConfig": {
            "NanoCpus": u64::from(r.cpus) * 1_000_000_000,
            "Memory": u64::from(r.memory_mib) << 20,
            "AutoRemove": r.auto_remove,
            "ReadonlyRootfs": r.spec["root"]["readonly"],
            "Binds": r.binds.iter().map(|b| format!("{}:{}", b.source.display(), b.target.display())).collect::<Vec<_>>(),
        },
        "NetworkSettings": {
            "Networks": r.network.as_deref().filter(|n| *n != "none").map(|n| serde_json::json!({
                n: {
                    "IPAddress": if running {
                        husk_runtime::network::bridge::address_of(&r.id).map(|ip| ip.to_string())
                    } else { None }.unwrap_or_default(),
                    "Gateway": husk_runtime::network::bridge::GATEWAY.to_string(),
                    "IPPrefixLen": husk_runtime::network::bridge::PREFIX,
                }
            })).unwrap_or_else(|| serde_json::json!({})),
            "Ports": r.publish.iter().map(|p| format!(
                "{}/{} -> {}:{}",
                p.container_port,
                if p.udp { "udp" } else { "tcp" },
                p.host_ip.map_or("0.0.0.0".to_string(), |ip| ip.to_string()),
                p.host_port
            )).collect::<Vec<_>>(),
        },
        "LogPath": d.log(),
    }))
}

/// The last `n` lines of `bytes`.
pub fn tail_lines(bytes: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &bytes[bytes.len()..];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut count = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            count += 1;
            if count == n {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_and_read_back() {
        assert_eq!(
            super::super::images::parse_rfc3339(&rfc3339(1_800_000_123)),
            Some(1_800_000_123)
        );
    }

    #[test]
    fn tail_takes_the_last_lines() {
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_lines(b"a\n", 5), b"a\n");
        assert_eq!(tail_lines(b"a\nb\n", 0), b"");
    }
}
