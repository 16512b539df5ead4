//! cgroup v2 for containers: one cgroup per container under
//! `/sys/fs/cgroup/husk/<id>`, the spec's resources written as v2 files and
//! its device rules as an eBPF program ([`super::devices`]),
//! figures read back for StatsContainer, the freezer for pause/resume, and
//! the OOM-kill counter for OOM events.
//!
//! The guest kernel is cgroup v2 only, so OCI's v1-shaped resources are
//! converted the way runc and crun convert them (cpu shares to weight,
//! blkio weight to io weight).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_spec::runtime::LinuxResources;

/// Where the agent mounts the cgroup2 hierarchy (see init.rs).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The parent of every container's cgroup.
const PARENT: &str = "husk";
/// Controllers delegated to containers, as far as the kernel has them.
const CONTROLLERS: &[&str] = &["cpu", "cpuset", "io", "memory", "pids"];
/// How long a freeze or thaw may take before PauseContainer gives up.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("linux.resources.{field}: {problem}")]
    Invalid { field: String, problem: String },
    #[error(transparent)]
    Devices(#[from] super::devices::DeviceError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(field: &str, problem: impl Into<String>) -> CgroupError {
    CgroupError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// One v2 file write: (file name, value).
pub type Setting = (String, String);

/// cpu.weight from cpu shares (runc's conversion: 2..262144 onto 1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// io.weight from blkio weight (10..1000 onto 1..10000).
pub fn blkio_to_io_weight(w: u16) -> u64 {
    if w == 0 {
        return 0;
    }
    1 + (u64::from(w.clamp(10, 1000)) - 10) * 9999 / 990
}

fn max_or(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// The v2 file writes for `r`, checked. Order matters for memory: the swap
/// limit is memory+swap in OCI and memory.swap.max is swap alone.
pub fn settings(r: &LinuxResources) -> Result<Vec<Setting>, CgroupError> {
    let mut out: Vec<Setting> = Vec::new();
    let mut set = |k: &str, v: String| out.push((k.to_string(), v));
    if let Some(m) = r.memory() {
        if let Some(limit) = m.limit() {
            if limit == 0 || (limit > 0 && limit < 4096 * 16) {
                return Err(invalid(
                    "memory.limit",
                    format!("{limit} bytes is too small to run anything"),
                ));
            }
            set("memory.max", max_or(limit));
        }
        if let Some(res) = m.reservation() {
            set("memory.low", max_or(res));
        }
        if let Some(swap) = m.swap() {
            let v = match (swap, m.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l > 0 => {
                    if s < l {
                        return Err(invalid(
                            "memory.swap",
                            format!("{s} is below memory.limit {l} (it counts memory + swap)"),
                        ));
                    }
                    (s - l).to_string()
                }
                (s, _) => s.to_string(),
            };
            set("memory.swap.max", v);
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares() {
            set("cpu.weight", shares_to_weight(shares).to_string());
        }
        if c.quota().is_some() || c.period().is_some() {
            let period = c.period().unwrap_or(100_000);
            if !(1000..=1_000_000).contains(&period) {
                return Err(invalid(
                    "cpu.period",
                    format!("{period} us is outside 1000..=1000000"),
                ));
            }
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            set("cpu.max", format!("{quota} {period}"));
        }
        if let Some(cpus) = c.cpus().as_ref().filter(|s| !s.is_empty()) {
            set("cpuset.cpus", cpus.clone());
        }
        if let Some(mems) = c.mems().as_ref().filter(|s| !s.is_empty()) {
            set("cpuset.mems", mems.clone());
        }
    }
    if let Some(p) = r.pids() {
        let limit = p.limit();
        set(
            "pids.max",
            if limit <= 0 {
                "max".into()
            } else {
                limit.to_string()
            },
        );
    }
    if let Some(b) = r.block_io() {
        if let Some(w) = b.weight() {
            set("io.weight", blkio_to_io_weight(w).to_string());
        }
    }
    for (k, v) in r.unified().iter().flatten() {
        // Files of this cgroup only: no paths, no cgroup core files.
        if k.contains('/') || k.starts_with("cgroup.") || !k.contains('.') {
            return Err(invalid(&format!("unified.{k}"), "is not a controller file"));
        }
        set(k, v.clone());
    }
    Ok(out)
}

/// A container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
    /// The device program attached now (a clone shares it), kept to be
    /// swapped when an update brings new device rules.
    devices: Arc<Mutex<Option<super::devices::Attached>>>,
}

/// Enables the controllers for the children of `husk/`, once per agent:
/// every container after the first finds the parent ready.
/// Enables the controllers for containers' cgroups ahead of the first
/// (done at start, so that a VM template holds it).
pub fn prepare() -> Result<PathBuf, CgroupError> {
    prepared_parent(Path::new(CGROUP_ROOT))
}

fn prepared_parent(root: &Path) -> Result<PathBuf, CgroupError> {
    static READY: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = ready.as_ref().filter(|p| p.starts_with(root) && p.is_dir()) {
        return Ok(p.clone());
    }
    let p = prepare_parent(root)?;
    *ready = Some(p.clone());
    Ok(p)
}

/// Enables the controllers for the children of `husk/` (idempotent).
fn prepare_parent(root: &Path) -> Result<PathBuf, CgroupError> {
    let parent = root.join(PARENT);
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    for dir in [root, parent.as_path()] {
        let f = dir.join("cgroup.subtree_control");
        std::fs::write(&f, wanted.join(" ")).map_err(io_err(&f))?;
    }
    Ok(parent)
}

impl Cgroup {
    /// Creates the cgroup for container `id` and applies `resources`.
    pub fn create(id: &str, resources: Option<&LinuxResources>) -> Result<Self, CgroupError> {
        let settings = resources.map(settings).transpose()?.unwrap_or_default();
        let devices = super::devices::rules(resources.and_then(|r| r.devices().as_deref()))?;
        let parent = prepared_parent(Path::new(CGROUP_ROOT))?;
        let path = parent.join(id);
        std::fs::create_dir(&path).map_err(io_err(&path))?;
        let cg = Self {
            path,
            devices: Arc::default(),
        };
        // The device program before any process joins: none ever runs
        // without it.
        let applied = super::devices::apply(&cg.path, &devices)
            .map_err(CgroupError::from)
            .and_then(|prog| {
                *cg.devices.lock().unwrap_or_else(|p| p.into_inner()) = Some(prog);
                cg.apply(&settings)
            });
        if let Err(e) = applied {
            cg.destroy();
            return Err(e);
        }
        Ok(cg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`, for a child to move itself in before exec.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    pub fn apply(&self, settings: &[Setting]) -> Result<(), CgroupError> {
        for (k, v) in settings {
            let f = self.path.join(k);
            std::fs::write(&f, v).map_err(io_err(&f))?;
        }
        Ok(())
    }

    /// Applies an update: the limits it names, and its device rules when it
    /// has any (containerd sends the container's whole `linux.resources`,
    /// rules included; an update without `devices` keeps the rules).
    pub fn update(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        let settings = settings(r)?;
        if let Some(list) = r.devices() {
            let rules = super::devices::rules(Some(list))?;
            // Held across two bpf(2) calls (no I/O that can block): two
            // updates at once must not both detach the same program.
            let mut prog = self.devices.lock().unwrap_or_else(|p| p.into_inner());
            let new = match prog.as_ref() {
                Some(old) => super::devices::replace(&self.path, old, &rules)?,
                None => Some(super::devices::apply(&self.path, &rules)?),
            };
            if let Some(new) = new {
                *prog = Some(new);
            }
        }
        self.apply(&settings)
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// The pids in this cgroup, sorted.
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .read("cgroup.procs")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        v.sort_unstable();
        v
    }

    /// Freezes or thaws every process in the cgroup and waits until the
    /// kernel says it is done: `cgroup.events` raises a "modified" event on
    /// each change, so the wait wakes when the state flips, not on a tick.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let events = self.path.join("cgroup.events");
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| io_err(&events)(e.into()))?;
        // Watching before the write: no change can slip between the two.
        inotify
            .add_watch(&events, AddWatchFlags::IN_MODIFY)
            .map_err(|e| io_err(&events)(e.into()))?;
        let f = self.path.join("cgroup.freeze");
        std::fs::write(&f, if frozen { "1" } else { "0" }).map_err(io_err(&f))?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let deadline = std::time::Instant::now() + FREEZE_TIMEOUT;
        loop {
            if self.read("cgroup.events").lines().any(|l| l == want) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(CgroupError::Io {
                    path: events,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("not {want} within {FREEZE_TIMEOUT:?}"),
                    ),
                });
            }
            let mut fds = [PollFd::new(
                std::os::fd::AsFd::as_fd(&inotify),
                PollFlags::POLLIN,
            )];
            // inotify wakes the wait; the timeout only bounds it.
            let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::NONE);
            match poll(&mut fds, ms) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {
                    // Drain the events; the file itself says what changed.
                    while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
                }
                Err(e) => return Err(io_err(&events)(e.into())),
            }
        }
    }

    pub fn is_frozen(&self) -> bool {
        self.read("cgroup.events").lines().any(|l| l == "frozen 1")
    }

    /// How many OOM kills the memory controller has made here.
    pub fn oom_kills(&self) -> u64 {
        keyed(&self.read("memory.events"), "oom_kill")
    }

    /// `memory.events`, to watch for OOM kills.
    pub fn memory_events_file(&self) -> PathBuf {
        self.path.join("memory.events")
    }

    pub fn stats(&self) -> Stats {
        let cpu = self.read("cpu.stat");
        let mem = self.read("memory.stat");
        let (mut rbytes, mut wbytes) = (0, 0);
        for line in self.read("io.stat").lines() {
            for kv in line.split_whitespace().skip(1) {
                match kv.split_once('=') {
                    Some(("rbytes", v)) => rbytes += v.parse::<u64>().unwrap_or(0),
                    Some(("wbytes", v)) => wbytes += v.parse::<u64>().unwrap_or(0),
                    _ => {}
                }
            }
        }
        Stats {
            cpu_usage_usec: keyed(&cpu, "usage_usec"),
            cpu_user_usec: keyed(&cpu, "user_usec"),
            cpu_system_usec: keyed(&cpu, "system_usec"),
            cpu_nr_throttled: keyed(&cpu, "nr_throttled"),
            cpu_throttled_usec: keyed(&cpu, "throttled_usec"),
            memory_current: self.read("memory.current").trim().parse().unwrap_or(0),
            memory_limit: self.read("memory.max").trim().parse().unwrap_or(0),
            memory_anon: keyed(&mem, "anon"),
            memory_file: keyed(&mem, "file"),
            memory_oom_kill: self.oom_kills(),
            pids_current: self.read("pids.current").trim().parse().unwrap_or(0),
            pids_limit: self.read("pids.max").trim().parse().unwrap_or(0),
            io_read_bytes: rbytes,
            io_write_bytes: wbytes,
        }
    }

    /// SIGKILLs everything left in the cgroup (cgroup.kill, Linux 5.14+).
    pub fn kill_all(&self) {
        let f = self.path.join("cgroup.kill");
        if let Err(e) = std::fs::write(&f, "1") {
            tracing::warn!("{}: {e}", f.display());
        }
    }

    /// Removes the cgroup once its processes are gone (they are killed).
    pub fn destroy(&self) {
        if !self.path.exists() {
            return;
        }
        self.kill_all();
        for _ in 0..200 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                // EBUSY until the killed processes are reaped.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        tracing::warn!("cgroup {} still busy; left behind", self.path.display());
    }
}

/// The figures of StatsContainer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_current: u64,
    pub memory_limit: u64,
    pub memory_anon: u64,
    pub memory_file: u64,
    pub memory_oom_kill: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

/// The value of `key` in a flat-keyed cgroup file ("key value" lines).
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(v: serde_json::Value) -> LinuxResources {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn conversions_match_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(blkio_to_io_weight(10), 1);
        assert_eq!(blkio_to_io_weight(1000), 10_000);
    }

    #[test]
    fn resources_become_v2_files() {
        let s = settings(&res(serde_json::json!({
            "memory": {"limit": 67108864, "swap": 134217728},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0"},
            "pids": {"limit": 32},
            "unified": {"memory.high": "50000000"}
        })))
        .unwrap();
        let get = |k: &str| s.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("67108864"));
        assert_eq!(get("memory.swap.max"), Some("67108864"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0"));
        assert_eq!(get("pids.max"), Some("32"));
        assert_eq!(get("memory.high"), Some("50000000"));
        let s = settings(&res(
            serde_json::json!({"memory": {"limit": -1}, "pids": {"limit": 0}}),
        ))
        .unwrap();
        assert_eq!(
            s,
            [
                ("memory.max".into(), "max".into()),
                ("pids.max".into(), "max".into())
            ]
        );
    }

    #[test]
    fn bad_resources_name_the_field() {
        for (v, field) in [
            (
                serde_json::json!({"memory": {"limit": 100}}),
                "memory.limit",
            ),
            (
                serde_json::json!({"memory": {"limit": 67108864, "swap": 1}}),
                "memory.swap",
            ),
            (serde_json::json!({"cpu": {"period": 5}}), "cpu.period"),
            (
                serde_json::json!({"unified": {"../x": "1"}}),
                "unified.../x",
            ),
            (
                serde_json::json!({"unified": {"cgroup.procs": "1"}}),
                "unified.cgroup.procs",
            ),
        ] {
            match settings(&res(v)) {
                Err(CgroupError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn keyed_files_parse() {
        let t = "usage_usec 120\nuser_usec 100\nsystem_usec 20\n";
        assert_eq!(keyed(t, "user_usec"), 100);
        assert_eq!(keyed(t, "missing"), 0);
        assert_eq!(keyed("low 0\noom_kill 2\n", "oom_kill"), 2);
    }
}
