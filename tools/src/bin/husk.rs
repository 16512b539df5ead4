//! `husk`: Husk on one machine, without containerd.
//!
//!   husk run --rootfs DIR [-t] [-i] [-d] [--name ID] [-e K=V] [-w DIR] [-u UID[:GID]]
//!            [-v HOST:GUEST[:ro]] [--read-only] [--cpus N] [--memory SIZE] -- CMD ARGS
//!                              run CMD as a container in a new VM; exits with its code
//!   husk exec [-t] [-i] [-e K=V] [-w DIR] [-u UID[:GID]] ID -- CMD ARGS
//!                              run CMD in the running container ID
//!   husk ps                    list the containers (VMs) on this host
//!   husk rm [-f] ID...         remove stopped (with -f: running) containers
//!   husk vm boot [--cpus N] [--memory MIB] [--keep]   boot a VM, show what the guest sees
//!   husk vm stop ID            stop a VM left running with --keep
//!
//! Every call first removes what a `husk` killed with SIGKILL left behind
//! (its VM dies with it; the directory is found and removed).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use husk_runtime::config::Config;
use husk_runtime::container::Endpoint;
use husk_runtime::hypervisor::Bind;
use husk_runtime::layout::{self, PidFile, SandboxLayout};
use husk_runtime::sandbox::stale;
use husk_runtime::{
    Container, ContainerConfig, Exit, HuskVmm, NoEvents, Sandbox, SandboxSpec, StdioConfig, VmSpec,
    INIT,
};

#[derive(Parser)]
#[command(name = "husk", about = "Run containers in KVM micro-VMs", version)]
struct Cli {
    /// Show Husk's own log, the guest's and husk-vmm's (RUST_LOG overrides).
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Micro-VMs themselves.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Run a command as a container in its own micro-VM; exit with its code.
    Run(RunArgs),
    /// Run a command in a running container; exit with its code.
    Exec(ExecArgs),
    /// List the containers on this host.
    Ps,
    /// Remove containers (their VMs).
    Rm {
        /// Also stop running ones.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(clap::Args)]
struct ProcessArgs {
    /// A terminal for the process (raw mode here, resizes follow).
    #[arg(short = 't', long)]
    tty: bool,
    /// Keep stdin open and pass it to the process.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Environment variables, NAME=value.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory in the container.
    #[arg(short = 'w', long = "workdir", default_value = "/")]
    workdir: String,
    /// UID[:GID] to run as.
    #[arg(short = 'u', long = "user", default_value = "0:0")]
    user: String,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The container's root filesystem (a directory).
    #[arg(long)]
    rootfs: PathBuf,
    #[command(flatten)]
    process: ProcessArgs,
    /// The container's name (its VM's id); random when not given.
    #[arg(long)]
    name: Option<String>,
    /// Start it and return; `husk rm -f ID` ends it.
    #[arg(short = 'd', long)]
    detach: bool,
    /// A host directory or file in the container: HOST:GUEST[:ro].
    #[arg(short = 'v', long = "volume")]
    volumes: Vec<String>,
    /// Mount the rootfs read-only.
    #[arg(long)]
    read_only: bool,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory: MiB, or with a k/m/g suffix.
    #[arg(long, default_value = "256")]
    memory: String,
    /// The container's memory limit (cgroup), same units; none by default.
    #[arg(long)]
    memory_limit: Option<String>,
    /// The container's process limit (cgroup pids.max).
    #[arg(long)]
    pids_limit: Option<i64>,
    /// Seconds to wait for the VM's agent.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct ExecArgs {
    #[command(flatten)]
    process: ProcessArgs,
    /// The container (see `husk ps`).
    id: String,
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

/// The container's name inside its VM.
const CONTAINER: &str = "main";

/// The capabilities a container gets: Docker's and containerd's default set.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Bytes from "512", "512m", "1g", "65536k" (no suffix: `default_unit`).
fn parse_size(s: &str, default_unit: u64) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], s[i..].to_ascii_lowercase()),
        None => (s, String::new()),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a size"))?;
    let mult = match unit.trim_end_matches(['b', 'i']) {
        "" => default_unit,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        other => bail!("{s:?}: unknown unit {other:?} (k, m, g)"),
    };
    n.checked_mul(mult).context("size overflows")
}

/// The OCI `process` object for `p`.
fn process_json(p: &ProcessArgs, args: &[String]) -> Result<serde_json::Value> {
    let parse = |v: &str| {
        v.parse::<u32>()
            .with_context(|| format!("-u {:?}: expected UID[:GID] as numbers", p.user))
    };
    let (uid, gid) = match p.user.split_once(':') {
        Some((u, g)) => (parse(u)?, parse(g)?),
        None => (parse(&p.user)?, parse(&p.user)?),
    };
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    if p.tty {
        env.push(format!(
            "TERM={}",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into())
        ));
    }
    for e in &p.env {
        if !e.contains('=') || e.starts_with('=') {
            bail!("-e {e:?}: expected NAME=value");
        }
        env.push(e.clone());
    }
    // Docker's default set: root in the container is not root in the VM
    // (no CAP_SYS_ADMIN, no CAP_DAC_READ_SEARCH for file-handle tricks...).
    let caps = DEFAULT_CAPS;
    Ok(serde_json::json!({
        "terminal": p.tty,
        "user": {"uid": uid, "gid": gid},
        "args": args,
        "env": env,
        "cwd": p.workdir,
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []
        },
    }))
}

/// A volume: (bind into the share, the OCI mount).
fn volume(i: usize, v: &str) -> Result<(Bind, serde_json::Value)> {
    let parts: Vec<&str> = v.split(':').collect();
    let (host, guest, ro) = match parts[..] {
        [h, g] => (h, g, false),
        [h, g, "ro"] => (h, g, true),
        [h, g, "rw"] => (h, g, false),
        _ => bail!("-v {v:?}: expected HOST:GUEST[:ro]"),
    };
    if !guest.starts_with('/') {
        bail!("-v {v:?}: {guest} must be an absolute path in the container");
    }
    let source = Path::new(host)
        .canonicalize()
        .with_context(|| format!("-v {v:?}: {host}"))?;
    let target = PathBuf::from(format!("volumes/{i}"));
    let mut options = vec!["rbind"];
    if ro {
        options.push("ro");
    }
    let mount = serde_json::json!({
        "destination": guest, "type": "bind", "source": target, "options": options,
    });
    Ok((
        Bind {
            source,
            target,
            readonly: ro,
        },
        mount,
    ))
}

fn oci_spec(
    a: &RunArgs,
    hostname: &str,
    mounts: Vec<serde_json::Value>,
) -> Result<serde_json::Value> {
    let mut resources = serde_json::Map::new();
    if let Some(m) = &a.memory_limit {
        resources.insert(
            "memory".into(),
            serde_json::json!({"limit": parse_size(m, 1 << 20)?, "swap": parse_size(m, 1 << 20)?}),
        );
    }
    if let Some(p) = a.pids_limit {
        resources.insert("pids".into(), serde_json::json!({"limit": p}));
    }
    let mut all_mounts = vec![
        serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        serde_json::json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        serde_json::json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
    ];
    all_mounts.extend(mounts);
    Ok(serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process_json(&a.process, &a.command)?,
        "root": {"path": "rootfs", "readonly": a.read_only},
        "hostname": hostname,
        "mounts": all_mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}, {"type": "network"}],
            "resources": resources,
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        }
    }))
}

/// The host terminal in raw mode while a `-t` session runs; restored on drop.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter(tty: bool) -> Self {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        if !tty || !std::io::stdin().is_terminal() {
            return Self(None);
        }
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        Self(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// This terminal's size, if stdin is one.
fn terminal_size() -> Option<(u32, u32)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the valid pointer.
    let r = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then(|| (u32::from(ws.ws_row), u32::from(ws.ws_col)))
}

/// Forwards signals and terminal resizes to a running process until aborted.
fn forward_signals(c: Arc<Container>, exec_id: String, tty: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut winch)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::window_change()),
        ) else {
            return;
        };
        let resize = async |c: &Container| {
            if let (true, Some((rows, cols))) = (tty, terminal_size()) {
                let _ = c.resize(&exec_id, rows, cols).await;
            }
        };
        resize(&c).await;
        loop {
            let sig = tokio::select! {
                _ = int.recv() => libc::SIGINT,
                _ = term.recv() => libc::SIGTERM,
                _ = winch.recv() => {
                    resize(&c).await;
                    continue;
                }
            };
            let _ = c.kill(&exec_id, sig as u32, false).await;
        }
    })
}

/// This process's stdio for a container process.
fn stdio(p: &ProcessArgs) -> StdioConfig {
    StdioConfig {
        stdin: if p.interactive {
            Endpoint::Inherit
        } else {
            Endpoint::None
        },
        stdout: Endpoint::Inherit,
        stderr: Endpoint::Inherit,
        terminal: p.tty,
    }
}

/// Remembers whether the guest reported an OOM kill.
#[derive(Default)]
struct OomSeen(AtomicBool);

#[async_trait::async_trait]
impl husk_runtime::Events for OomSeen {
    async fn process_exited(&self, _: &str, _: &str, _: u32, _: Exit) {}
    async fn oom(&self, _: &str) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The container's hostname: `husk-` and the first 12 characters of its id.
fn hostname(id: &str) -> String {
    format!("husk-{}", &id[..12.min(id.len())])
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Boots a VM for one container, runs it, relays its output, returns its code.
async fn run(a: RunArgs) -> Result<i32> {
    let cfg = Config::load(None)?;
    let rootfs = a
        .rootfs
        .canonicalize()
        .with_context(|| format!("rootfs {}", a.rootfs.display()))?;
    // Read-only: the guest writes to a layer of its own (the agent's rootfs
    // overlay, in guest memory), never to the host's directory.
    let mut binds = vec![Bind {
        source: rootfs,
        target: PathBuf::from("rootfs"),
        readonly: true,
    }];
    let mut mounts = Vec::new();
    for (i, v) in a.volumes.iter().enumerate() {
        let (b, m) = volume(i, v)?;
        binds.push(b);
        mounts.push(m);
    }
    let id = a.name.clone().unwrap_or_else(layout::random_id);
    let memory_mib =
        u32::try_from(parse_size(&a.memory, 1 << 20)? >> 20).context("--memory is too large")?;
    let spec = SandboxSpec {
        vm: VmSpec {
            vcpus: a.cpus,
            memory_mib,
            boot_timeout: Duration::from_secs(a.boot_timeout),
            binds,
            detach: a.detach,
            ..cfg.vm_spec(&Default::default())?
        },
        hostname: Some(hostname(&id)),
        forward_vmm_log: false,
    };
    let mut oci = oci_spec(&a, &hostname(&id), mounts)?;
    oci["hostname"] = serde_json::Value::String(hostname(&id));
    let oom = Arc::new(OomSeen::default());
    let sandbox = match Sandbox::boot(&id, &spec, &HuskVmm, oom.clone()).await {
        Err(husk_runtime::Error::AlreadyExists(_)) => {
            bail!("a container named {id:?} exists: `husk rm -f {id}` first")
        }
        r => r?,
    };
    std::fs::write(sandbox.layout().command_file(), a.command.join(" "))?;
    let result = run_in(&sandbox, &a, oci, &oom).await;
    if a.detach && result.is_ok() {
        // The VM lives on; `husk rm -f` ends it.
        println!("{id}");
        return Ok(0);
    }
    // Whatever happened, the VM goes.
    sandbox.own();
    let stopped = sandbox.shutdown().await;
    let code = result?;
    if !stopped.success() {
        tracing::warn!(%stopped, "husk-vmm did not end cleanly");
    }
    Ok(code)
}

async fn run_in(sb: &Sandbox, a: &RunArgs, oci: serde_json::Value, oom: &OomSeen) -> Result<i32> {
    let mut io = stdio(&a.process);
    if a.detach {
        io = StdioConfig::default();
    }
    let c = sb
        .create_container(ContainerConfig {
            id: CONTAINER.into(),
            spec: oci,
            share_mounts: Vec::new(),
            stdio: io,
            // The rootfs is shared read-only; the container writes to a
            // layer in the guest's memory, gone with it (volumes are for
            // what must stay).
            rootfs_overlay: true,
            bundle: String::new(),
        })
        .await?;
    let _raw = RawMode::enter(a.process.tty && !a.detach);
    c.start(INIT).await?;
    if a.detach {
        return Ok(0);
    }
    let forward = forward_signals(c.clone(), INIT.into(), a.process.tty);
    let exit = c.wait(INIT).await?;
    forward.abort();
    // A SIGKILL may be the OOM killer's: the event says so.
    if exit.status == 137 {
        for _ in 0..20 {
            if oom.0.load(Ordering::SeqCst) {
                eprintln!("husk: the container hit its memory limit and was killed (OOM)");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    sb.delete_container(CONTAINER).await?;
    Ok(exit.status as i32)
}

/// The sandbox of container `id`, started by another `husk`.
async fn open(id: &str) -> Result<Sandbox> {
    layout::check_id("container", id)?;
    Sandbox::open(id, Arc::new(NoEvents))
        .await
        .with_context(|| format!("no running container {id:?} (see `husk ps`)"))
}

async fn exec(a: ExecArgs) -> Result<i32> {
    let sb = open(&a.id).await?;
    let c = sb.adopt_container(CONTAINER);
    let exec_id = format!("exec-{}-{}", std::process::id(), {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
    });
    let process = serde_json::to_vec(&process_json(&a.process, &a.command)?)?;
    c.add_exec(&exec_id, process, stdio(&a.process))?;
    let _raw = RawMode::enter(a.process.tty);
    c.start(&exec_id).await?;
    let forward = forward_signals(c.clone(), exec_id.clone(), a.process.tty);
    let exit = c.wait(&exec_id).await?;
    forward.abort();
    // The agent keeps an ended exec until told; a long-lived container
    // would otherwise collect one entry per `husk exec`.
    c.delete_exec(&exec_id).await?;
    Ok(exit.status as i32)
}

async fn ps() -> Result<()> {
    let root = layout::runtime_root();
    stale::reap(&root);
    println!("{:<20} {:<9} {:<9} COMMAND", "ID", "VMM PID", "STATUS");
    let mut ids: Vec<String> = std::fs::read_dir(&root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    for id in ids {
        let Ok(l) = SandboxLayout::under(&root, &id) else {
            continue;
        };
        let Some(pids) = PidFile::read(&l.pid_file()) else {
            continue;
        };
        let command = std::fs::read_to_string(l.command_file()).unwrap_or_default();
        let opts = husk_agent_client::ConnectOptions {
            boot_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(2),
            ..husk_agent_client::ConnectOptions::new(l.vsock_socket())
        };
        let status = match husk_agent_client::Client::connect(opts).await {
            Ok(c) => match c.list_processes(CONTAINER).await {
                Ok(p) if !p.is_empty() => "running",
                Ok(_) => "exited",
                Err(_) => "vm-only",
            },
            Err(_) => "booting",
        };
        println!("{id:<20} {:<9} {status:<9} {command}", pids.vmm.pid);
    }
    Ok(())
}

async fn rm(ids: Vec<String>, force: bool) -> Result<()> {
    let mut failed = false;
    for id in ids {
        let r = async {
            let sb = open(&id).await?;
            let running = !sb
                .agent()
                .list_processes(CONTAINER)
                .await
                .unwrap_or_default()
                .is_empty();
            if running && !force {
                bail!("{id} is running: stop it first, or `husk rm -f {id}`");
            }
            sb.own();
            sb.shutdown().await;
            Ok(())
        }
        .await;
        match r {
            Ok(()) => println!("{id}"),
            Err(e) => {
                eprintln!("husk rm {id}: {e:#}");
                failed = true;
            }
        }
    }
    if failed {
        bail!("some containers were not removed");
    }
    Ok(())
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a VM, wait for its agent, print the guest's details, shut it down.
    Boot {
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Seconds to wait for the agent.
        #[arg(long, default_value_t = 60)]
        boot_timeout: u64,
        /// Leave the VM running and say how to reach it.
        #[arg(long)]
        keep: bool,
    },
    /// Shut down a VM left running by `vm boot --keep`.
    Stop { id: String },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Only the container's own output by default: the guest's and the
    // VMM's logs stay in the VM's log files, shown with --debug.
    let default = if cli.debug {
        "debug,ttrpc=info"
    } else {
        "warn,ttrpc=error,guest=off,vmm=off"
    };
    let filter = husk_runtime::logging::directives(std::env::var("RUST_LOG").ok(), default);
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("husk: RUST_LOG {filter:?} is not a log filter ({e}); using warn");
        tracing_subscriber::EnvFilter::new("warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli.cmd).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("husk: {e:#}");
            // docker's code for "the runtime itself failed".
            std::process::exit(125);
        }
    }
}

async fn dispatch(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Vm(VmCmd::Boot {
            cpus,
            memory,
            boot_timeout,
            keep,
        }) => {
            let cfg = Config::load(None)?;
            let spec = SandboxSpec {
                vm: VmSpec {
                    vcpus: cpus,
                    memory_mib: memory,
                    boot_timeout: Duration::from_secs(boot_timeout),
                    detach: keep,
                    ..cfg.vm_spec(&Default::default())?
                },
                hostname: None,
                forward_vmm_log: false,
            };
            let id = layout::random_id();
            let started = std::time::Instant::now();
            let sb = Sandbox::boot(&id, &spec, &HuskVmm, Arc::new(NoEvents)).await?;
            let ready = started.elapsed();
            let client = sb.client().context("a VM without an agent client")?;
            let d = client.guest_details().await?;
            println!("vm:        {id}");
            println!(
                "agent:     {} (ready {} ms after start)",
                d.agent_version,
                ready.as_millis()
            );
            println!("kernel:    {}", d.kernel_version);
            println!("cpus:      {} ({})", d.online_cpu_count, d.online_cpus);
            println!("memory:    {} KiB", d.memory_total_kib);
            if keep {
                let l = sb.layout();
                println!("running:   husk-vmm pid {}", sb.vmm_pid());
                println!(
                    "vsock:     {} (CONNECT 1024 for the agent)",
                    l.vsock_socket().display()
                );
                println!("console:   {}", l.console_log().display());
                println!("stop with: husk vm stop {id}");
                return Ok(0);
            }
            let status = sb.shutdown().await;
            println!("stopped:   husk-vmm {status}");
            if !status.success() {
                bail!("husk-vmm ended with {status}");
            }
            Ok(0)
        }
        Cmd::Vm(VmCmd::Stop { id }) => {
            let sb = open(&id).await?;
            sb.own();
            sb.shutdown().await;
            println!("stopped {id}");
            Ok(0)
        }
        Cmd::Run(a) => run(a).await,
        Cmd::Exec(a) => exec(a).await,
        Cmd::Ps => ps().await.map(|()| 0),
        Cmd::Rm { force, ids } => rm(ids, force).await.map(|()| 0),
    }
}
