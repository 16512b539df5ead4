//! The agent API (`agent/api/proto/agent.proto`) served over ttrpc.
//!
//! Requests are validated here, before anything touches the guest: a bad
//! field is an `INVALID_ARGUMENT` naming it, never a half-applied change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use husk_agent_api::agent::{
    CheckRequest, CheckResponse, ContainerRequest, CreateContainerRequest, CreateSandboxRequest,
    DestroySandboxRequest, Empty, ExecProcessRequest, GuestDetailsRequest, GuestDetailsResponse,
    ListProcessesResponse, OomEventRequest, OomEventResponse, ProcessRequest, RestoredRequest,
    ShutdownRequest, SignalProcessRequest, StatsContainerResponse, TtyWinResizeRequest,
    UpdateContainerRequest, WaitProcessResponse,
};
use husk_agent_api::agent_ttrpc::Agent;
use husk_agent_api::ttrpc::{self, r#async::TtrpcContext, Code};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tokio::sync::mpsc;

use crate::container::cgroup::CgroupError;
use crate::container::devices::DeviceError;
use crate::container::manager::{Manager, ManagerError};
use crate::init;

/// Where per-sandbox files (resolv.conf, hostname) live in the guest.
pub const SANDBOX_DIR: &str = "/run/husk/sandbox";

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn invalid(field: &str, why: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::INVALID_ARGUMENT, format!("{field}: {why}"))
}

#[derive(Debug, Clone)]
struct Sandbox {
    id: String,
    shared_mount: Option<PathBuf>,
}

pub struct AgentService {
    sandbox: Mutex<Option<Sandbox>>,
    shutdown: mpsc::Sender<ShutdownAsked>,
    containers: Manager,
}

/// A Shutdown the main loop carries out; it answers on `done` once every
/// process has ended and the file systems are synced.
pub struct ShutdownAsked {
    pub grace: std::time::Duration,
    pub done: tokio::sync::oneshot::Sender<()>,
}

impl AgentService {
    pub fn new(shutdown: mpsc::Sender<ShutdownAsked>, containers: Manager) -> Arc<Self> {
        Arc::new(Self {
            sandbox: Mutex::new(None),
            shutdown,
            containers,
        })
    }
}

/// The one place a container error gets its ttrpc code: what the caller
/// got wrong (an argument, the state it asked in) is never INTERNAL.
fn container_code(e: &ManagerError) -> Code {
    match e {
        ManagerError::NotFound(_) | ManagerError::NoProcess { .. } => Code::NOT_FOUND,
        ManagerError::Exists(_) | ManagerError::ProcessExists { .. } => Code::ALREADY_EXISTS,
        ManagerError::State { .. }
        | ManagerError::ProcessRunning { .. }
        | ManagerError::NoTerminal { .. }
        | ManagerError::NoShare => Code::FAILED_PRECONDITION,
        ManagerError::Spec(_)
        | ManagerError::BadId { .. }
        | ManagerError::BadSignal(_)
        | ManagerError::Cgroup(CgroupError::Invalid { .. })
        | ManagerError::Cgroup(CgroupError::Devices(DeviceError::Invalid(_))) => {
            Code::INVALID_ARGUMENT
        }
        ManagerError::Start(_) | ManagerError::Io(_) | ManagerError::Cgroup(_) => Code::INTERNAL,
    }
}

fn container_status(e: ManagerError) -> ttrpc::Error {
    status(container_code(&e), e.to_string())
}

/// A hostname per RFC 1123: 1..=63 bytes, letters, digits, '-', not at the ends.
fn check_hostname(h: &str) -> Result<(), &'static str> {
    if h.is_empty() || h.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("may hold only letters, digits and '-'");
    }
    if h.starts_with('-') || h.ends_with('-') {
        return Err("may not start or end with '-'");
    }
    Ok(())
}

/// A sandbox ID as containerd makes them: 1..=128 of [A-Za-z0-9_.-].
fn check_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        || id.starts_with('.')
    {
        return Err("may hold only letters, digits, '_', '.' and '-', and not start with '.'");
    }
    Ok(())
}

/// resolv.conf for the sandbox; every entry checked so that no request can
/// write arbitrary lines.
fn resolv_conf(servers: &[String], search: &[String]) -> Result<String, ttrpc::Error> {
    let mut out = String::new();
    for s in servers {
        s.parse::<std::net::IpAddr>()
            .map_err(|_| invalid("dns_servers", format!("{s:?} is not an IP address")))?;
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !search.is_empty() {
        for d in search {
            if d.is_empty()
                || d.len() > 253
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
            {
                return Err(invalid("dns_search", format!("{d:?} is not a domain name")));
            }
        }
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    Ok(out)
}

pub fn guest_details() -> GuestDetailsResponse {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let online = read("/sys/devices/system/cpu/online");
    GuestDetailsResponse {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_version: read("/proc/sys/kernel/osrelease"),
        online_cpu_count: cpu_count(&online),
        online_cpus: online,
        memory_total_kib: read("/proc/meminfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0),
        uptime_seconds: read("/proc/uptime")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0),
        zombies: count_zombies(),
        ..Default::default()
    }
}

/// Processes in state Z, from /proc/<pid>/stat ("pid (comm) S ...").
fn count_zombies() -> u32 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        })
        .count() as u32
}

/// Counts the CPUs in a kernel CPU list such as "0-3,6,8-9".
pub fn cpu_count(list: &str) -> u32 {
    list.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(p.trim().parse::<u32>().is_ok()),
        })
        .sum()
}

#[async_trait]
impl Agent for AgentService {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            serving: true,
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        Ok(guest_details())
    }

    async fn restored(&self, _ctx: &TtrpcContext, req: RestoredRequest) -> ttrpc::Result<Empty> {
        // Entropy first: nothing of the template's CRNG output should be
        // handed out once the host has said this is a clone.
        crate::restored::reseed(&req.entropy).map_err(|e| invalid("entropy", e))?;
        crate::restored::set_clock(req.realtime_ns)
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        tracing::info!("restored from a snapshot: clock set, CRNG reseeded");
        Ok(Empty::default())
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let started = std::time::Instant::now();
        check_id(&req.sandbox_id).map_err(|e| invalid("sandbox_id", e))?;
        check_hostname(&req.hostname).map_err(|e| invalid("hostname", e))?;
        let resolv = resolv_conf(&req.dns_servers, &req.dns_search)?;
        let network = req.network.clone().unwrap_or_default();
        crate::network::validate(&network, &req.sysctls).map_err(|e| invalid("network", e))?;
        let shared = match (
            req.shared_fs_tag.is_empty(),
            req.shared_mount_point.is_empty(),
        ) {
            (true, true) => None,
            (false, false) => {
                let p = PathBuf::from(&req.shared_mount_point);
                if !p.is_absolute()
                    || p.components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(invalid(
                        "shared_mount_point",
                        "must be an absolute path without '..'",
                    ));
                }
                Some((req.shared_fs_tag.clone(), p))
            }
            _ => {
                return Err(invalid(
                    "shared_fs_tag",
                    "shared_fs_tag and shared_mount_point go together",
                ))
            }
        };

        let exists = || {
            let sandbox = self.sandbox.lock().unwrap_or_else(PoisonError::into_inner);
            sandbox.as_ref().map(|s| {
                status(
                    Code::ALREADY_EXISTS,
                    format!("sandbox {} already exists in this VM", s.id),
                )
            })
        };
        if let Some(e) = exists() {
            return Err(e);
        }
        // The network before the share, and not under the lock (netlink
        // calls): a pod whose NICs cannot be set up fails whole, with
        // nothing mounted.
        crate::network::configure(&network)
            .await
            .map_err(|e| status(Code::INTERNAL, format!("pod network: {e}")))?;
        crate::network::apply_sysctls(&req.sysctls)
            .map_err(|e| status(Code::INTERNAL, format!("pod sysctls: {e}")))?;
        let network_ms = started.elapsed().as_millis() as u64;
        let mut sandbox = self.sandbox.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = sandbox.as_ref() {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("sandbox {} already exists in this VM", s.id),
            ));
        }
        let dir = Path::new(SANDBOX_DIR);
        std::fs::create_dir_all(dir)
            .map_err(|e| status(Code::INTERNAL, format!("creating {SANDBOX_DIR}: {e}")))?;
        std::fs::write(dir.join("resolv.conf"), resolv)
            .map_err(|e| status(Code::INTERNAL, format!("writing resolv.conf: {e}")))?;
        std::fs::write(dir.join("hostname"), format!("{}\n", req.hostname))
            .map_err(|e| status(Code::INTERNAL, format!("writing hostname: {e}")))?;
        init::set_hostname(&req.hostname).map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        if let Some((tag, point)) = &shared {
            std::fs::create_dir_all(point).map_err(|e| {
                status(Code::INTERNAL, format!("creating {}: {e}", point.display()))
            })?;
            mount(
                Some(tag.as_str()),
                point,
                Some("virtiofs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None::<&str>,
            )
            .map_err(|e| {
                status(
                    Code::INTERNAL,
                    format!("mounting virtio-fs {tag:?} on {}: {e}", point.display()),
                )
            })?;
        }
        self.containers
            .set_share(shared.as_ref().map(|(_, p)| p.clone()));
        tracing::info!(
            sandbox = %req.sandbox_id,
            hostname = %req.hostname,
            network_ms,
            ms = started.elapsed().as_millis() as u64,
            "sandbox created"
        );
        *sandbox = Some(Sandbox {
            id: req.sandbox_id,
            shared_mount: shared.map(|(_, p)| p),
        });
        Ok(Empty::default())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let mut sandbox = self.sandbox.lock().unwrap_or_else(PoisonError::into_inner);
        match sandbox.as_ref() {
            Some(s) if s.id == req.sandbox_id => {
                if let Some(p) = &s.shared_mount {
                    // Detach: a process still inside must not keep the sandbox alive.
                    umount2(p, MntFlags::MNT_DETACH).map_err(|e| {
                        status(Code::INTERNAL, format!("unmounting {}: {e}", p.display()))
                    })?;
                }
                self.containers.set_share(None);
                tracing::info!(sandbox = %s.id, "sandbox destroyed");
                *sandbox = None;
                Ok(Empty::default())
            }
            _ => Err(status(
                Code::NOT_FOUND,
                format!("no sandbox {:?} in this VM", req.sandbox_id),
            )),
        }
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        // The main loop stops every process and syncs, then lets this answer
        // go out, then powers off.
        let (done, stopped) = tokio::sync::oneshot::channel();
        self.shutdown
            .try_send(ShutdownAsked {
                grace: std::time::Duration::from_secs(u64::from(req.grace_seconds)),
                done,
            })
            .map_err(|_| status(Code::UNAVAILABLE, "already shutting down"))?;
        stopped
            .await
            .map_err(|_| status(Code::INTERNAL, "the shutdown did not finish"))?;
        Ok(Empty::default())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let started = std::time::Instant::now();
        self.containers
            .create(
                &req.container_id,
                &req.oci_spec,
                req.stdin,
                req.rootfs_overlay,
            )
            .map_err(container_status)?;
        tracing::info!(container = %req.container_id, ms = started.elapsed().as_millis() as u64, "container created");
        Ok(Empty::default())
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let started = std::time::Instant::now();
        self.containers
            .start(&req.container_id)
            .await
            .map_err(container_status)?;
        tracing::info!(container = %req.container_id, ms = started.elapsed().as_millis() as u64, "container started");
        Ok(Empty::default())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let status = self
            .containers
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(container_status)?;
        Ok(WaitProcessResponse {
            status,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let sig = i32::try_from(req.signal).map_err(|_| invalid("signal", "out of range"))?;
        self.containers
            .signal(&req.container_id, &req.exec_id, sig, req.all)
            .map_err(container_status)?;
        Ok(Empty::default())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .remove(&req.container_id)
            .await
            .map_err(container_status)?;
        tracing::info!(container = %req.container_id, "container removed");
        Ok(Empty::default())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .exec(&req.container_id, &req.exec_id, &req.process, req.stdin)
            .await
            .map_err(container_status)?;
        tracing::info!(container = %req.container_id, exec = %req.exec_id, "process started");
        Ok(Empty::default())
    }

    async fn remove_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .remove_exec(&req.container_id, &req.exec_id)
            .map_err(container_status)?;
        Ok(Empty::default())
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)
            .map_err(container_status)?;
        Ok(Empty::default())
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        let rows = u16::try_from(req.rows).map_err(|_| invalid("rows", "above 65535"))?;
        let cols = u16::try_from(req.columns).map_err(|_| invalid("columns", "above 65535"))?;
        self.containers
            .resize(&req.container_id, &req.exec_id, rows, cols)
            .map_err(container_status)?;
        Ok(Empty::default())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let pids = self
            .containers
            .pids(&req.container_id)
            .map_err(container_status)?;
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let s = self
            .containers
            .stats(&req.container_id)
            .map_err(container_status)?;
        Ok(StatsContainerResponse {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            cpu_nr_throttled: s.cpu_nr_throttled,
            cpu_throttled_usec: s.cpu_throttled_usec,
            memory_current: s.memory_current,
            memory_limit: s.memory_limit,
            memory_anon: s.memory_anon,
            memory_file: s.memory_file,
            memory_oom_kill: s.memory_oom_kill,
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            io_read_bytes: s.io_read_bytes,
            io_write_bytes: s.io_write_bytes,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .update(&req.container_id, &req.resources)
            .map_err(container_status)?;
        Ok(Empty::default())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .freeze(&req.container_id, true)
            .await
            .map_err(container_status)?;
        Ok(Empty::default())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .freeze(&req.container_id, false)
            .await
            .map_err(container_status)?;
        Ok(Empty::default())
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: OomEventRequest,
    ) -> ttrpc::Result<OomEventResponse> {
        let container_id = self
            .containers
            .next_oom()
            .await
            .ok_or_else(|| status(Code::UNAVAILABLE, "shutting down"))?;
        Ok(OomEventResponse {
            container_id,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_errors_get_their_codes() {
        let s = String::from;
        for (e, want) in [
            (ManagerError::NotFound(s("c")), Code::NOT_FOUND),
            (
                ManagerError::NoProcess {
                    id: s("c"),
                    exec_id: s("e"),
                },
                Code::NOT_FOUND,
            ),
            (ManagerError::Exists(s("c")), Code::ALREADY_EXISTS),
            (
                ManagerError::ProcessExists {
                    id: s("c"),
                    exec_id: s("e"),
                },
                Code::ALREADY_EXISTS,
            ),
            (
                ManagerError::State {
                    id: s("c"),
                    state: "created",
                },
                Code::FAILED_PRECONDITION,
            ),
            (
                ManagerError::ProcessRunning {
                    id: s("c"),
                    exec_id: s("e"),
                },
                Code::FAILED_PRECONDITION,
            ),
            (
                ManagerError::NoTerminal {
                    id: s("c"),
                    exec_id: s(""),
                },
                Code::FAILED_PRECONDITION,
            ),
            (ManagerError::NoShare, Code::FAILED_PRECONDITION),
            (ManagerError::BadSignal(99), Code::INVALID_ARGUMENT),
            (
                ManagerError::BadId {
                    what: "exec id",
                    id: s("-"),
                },
                Code::INVALID_ARGUMENT,
            ),
            (ManagerError::Io(s("pipe: EMFILE")), Code::INTERNAL),
        ] {
            assert_eq!(container_code(&e), want, "{e}");
            let ttrpc::Error::RpcStatus(st) = container_status(e) else {
                panic!("not a status");
            };
            assert_eq!(st.code(), want);
        }
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_count("0"), 1);
        assert_eq!(cpu_count("0-3"), 4);
        assert_eq!(cpu_count("0-3,6,8-9"), 7);
        assert_eq!(cpu_count(""), 0);
        assert_eq!(cpu_count("3-1,x"), 0);
    }

    #[test]
    fn hostnames_and_ids() {
        assert!(check_hostname("pod-1").is_ok());
        for bad in ["", "-a", "a-", "a_b", "a.b", &"x".repeat(64), "a\nb"] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
        assert!(check_id("abc_1.2-3").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolv_conf_is_built_from_checked_parts() {
        let r = resolv_conf(
            &["10.0.0.2".into(), "fd00::1".into()],
            &["svc.local".into()],
        )
        .unwrap();
        assert_eq!(
            r,
            "nameserver 10.0.0.2\nnameserver fd00::1\nsearch svc.local\n"
        );
        assert!(resolv_conf(&["1.2.3.4\noptions evil".into()], &[]).is_err());
        assert!(resolv_conf(&[], &["a b".into()]).is_err());
    }

    #[test]
    fn details_describe_this_kernel() {
        let d = guest_details();
        assert!(!d.kernel_version.is_empty());
        assert!(d.online_cpu_count >= 1);
        assert!(d.memory_total_kib > 0);
    }
}
