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

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use husk_agent_client::{Client, Stream};
use husk_tools::vm::{self, Bind, Vm, VmSpec};
use tokio::io::AsyncWriteExt;

#[derive(Parser)]
#[command(name = "husk", about = "Run containers in KVM micro-VMs", version)]
struct Cli {
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

/// Where the agent mounts the sandbox share in the guest.
const GUEST_SHARE: &str = "/run/husk/share";
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

/// Attaches a process's streams, runs `start`, relays stdio, signals and
/// resizes until it exits; returns its exit code.
async fn attach_and_wait<F, Fut>(
    client: &Client,
    exec_id: &str,
    p: &ProcessArgs,
    start: F,
) -> Result<i32>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut out = client.attach(CONTAINER, exec_id, Stream::Stdout).await?;
    let err = if p.tty {
        None
    } else {
        Some(client.attach(CONTAINER, exec_id, Stream::Stderr).await?)
    };
    let stdin = if p.interactive {
        Some(client.attach(CONTAINER, exec_id, Stream::Stdin).await?)
    } else {
        None
    };
    let relay_out = tokio::spawn(async move {
        let mut o = tokio::io::stdout();
        let r = tokio::io::copy(&mut out, &mut o).await;
        let _ = o.flush().await;
        r
    });
    let relay_err = err.map(|mut err| {
        tokio::spawn(async move { tokio::io::copy(&mut err, &mut tokio::io::stderr()).await })
    });
    let _raw = RawMode::enter(p.tty);
    start().await?;
    if let Some(mut s) = stdin {
        // At our stdin's end the stream closes and so does the process's stdin.
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut s).await;
            let _ = s.shutdown().await;
        });
    }
    let (c, id) = (client.clone(), exec_id.to_string());
    let tty = p.tty;
    let forward = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut winch)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::window_change()),
        ) else {
            return;
        };
        if tty {
            if let Some((rows, cols)) = terminal_size() {
                let _ = c.tty_resize(CONTAINER, &id, rows, cols).await;
            }
        }
        loop {
            let sig = tokio::select! {
                _ = int.recv() => libc::SIGINT,
                _ = term.recv() => libc::SIGTERM,
                _ = winch.recv() => {
                    if let (true, Some((rows, cols))) = (tty, terminal_size()) {
                        let _ = c.tty_resize(CONTAINER, &id, rows, cols).await;
                    }
                    continue;
                }
            };
            let _ = c.signal_process(CONTAINER, &id, sig).await;
        }
    });
    let code = client.wait_process(CONTAINER, exec_id).await?;
    forward.abort();
    // The agent answers Wait only after the output is out; drain our side.
    let _ = relay_out.await;
    if let Some(r) = relay_err {
        let _ = r.await;
    }
    Ok(code)
}

/// Boots a VM for one container, runs it, relays its output, returns its code.
async fn run(a: RunArgs) -> Result<i32> {
    let mut binds = Vec::new();
    let mut mounts = Vec::new();
    for (i, v) in a.volumes.iter().enumerate() {
        let (b, m) = volume(i, v)?;
        binds.push(b);
        mounts.push(m);
    }
    if let Some(name) = &a.name {
        if vm::runtime_root().join(name).exists() {
            bail!("a container named {name:?} exists: `husk rm -f {name}` first");
        }
    }
    let memory_mib =
        u32::try_from(parse_size(&a.memory, 1 << 20)? >> 20).context("--memory is too large")?;
    let spec = VmSpec {
        vcpus: a.cpus,
        memory_mib,
        boot_timeout: Duration::from_secs(a.boot_timeout),
        rootfs: Some(
            a.rootfs
                .canonicalize()
                .with_context(|| format!("rootfs {}", a.rootfs.display()))?,
        ),
        binds,
        id: a.name.clone(),
        detach: a.detach,
        ..VmSpec::default()
    };
    let oci = oci_spec(&a, "husk", mounts)?;
    let vm = Vm::boot(&spec).await?;
    std::fs::write(vm.dir.join("command"), a.command.join(" "))?;
    if a.detach {
        // Our Vm value must not kill it; a failure still cleans up.
        let r = start_detached(&vm, oci).await;
        if let Err(e) = r {
            let _ = vm.client.shutdown(Duration::from_secs(1)).await;
            let _ = nix::sys::signal::kill(vm.vmm_pid, nix::sys::signal::Signal::SIGKILL);
            let _ = std::fs::remove_dir_all(&vm.dir);
            return Err(e);
        }
        println!("{}", vm.id);
        return Ok(0);
    }
    let result = run_in(&vm, &a, oci).await;
    // Whatever happened, the VM goes.
    let stopped = vm.shutdown(Duration::from_secs(20)).await;
    let code = result?;
    stopped?;
    Ok(code)
}

async fn create_sandbox(vm: &Vm, oci: serde_json::Value, stdin: bool) -> Result<()> {
    use husk_agent_client::agent::CreateSandboxRequest;
    let hostname = format!("husk-{}", &vm.id[..12.min(vm.id.len())]);
    let hostname: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    vm.client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: vm.id.clone(),
            hostname: hostname.clone(),
            shared_fs_tag: "husk-share".into(),
            shared_mount_point: GUEST_SHARE.into(),
            ..Default::default()
        })
        .await?;
    let mut oci = oci;
    oci["hostname"] = serde_json::Value::String(hostname);
    // The rootfs is shared read-only; the container writes to a layer in
    // the guest's memory, gone with it (volumes are for what must stay).
    vm.client
        .create_container_with(husk_agent_client::agent::CreateContainerRequest {
            container_id: CONTAINER.into(),
            oci_spec: serde_json::to_vec(&oci)?,
            stdin,
            rootfs_overlay: true,
            ..Default::default()
        })
        .await?;
    Ok(())
}

async fn start_detached(vm: &Vm, oci: serde_json::Value) -> Result<()> {
    create_sandbox(vm, oci, false).await?;
    vm.client.start_container(CONTAINER).await?;
    Ok(())
}

async fn run_in(vm: &Vm, a: &RunArgs, oci: serde_json::Value) -> Result<i32> {
    create_sandbox(vm, oci, a.process.interactive).await?;
    let events = vm.client.clone();
    let mut oom = tokio::spawn(async move { events.oom_event().await });
    let code = attach_and_wait(&vm.client, "", &a.process, || async {
        vm.client.start_container(CONTAINER).await?;
        Ok(())
    })
    .await?;
    // A SIGKILL may be the OOM killer's: the event says so.
    if code == 137 {
        if let Ok(Ok(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), &mut oom).await {
            eprintln!("husk: the container hit its memory limit and was killed (OOM)");
        }
    }
    oom.abort();
    vm.client.remove_container(CONTAINER).await?;
    Ok(code)
}

/// A client for the VM of container `id`.
async fn open(id: &str) -> Result<(PathBuf, Client)> {
    vm::reap_stale(&vm::runtime_root());
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        bail!("invalid container id {id:?}");
    }
    let dir = vm::runtime_root().join(id);
    if !dir.join("pid").exists() {
        bail!("no container {id:?} (see `husk ps`)");
    }
    let opts = husk_agent_client::ConnectOptions {
        boot_timeout: Duration::from_secs(5),
        ..husk_agent_client::ConnectOptions::new(Vm::vsock_socket(&dir))
    };
    let client = Client::connect(opts)
        .await
        .with_context(|| format!("reaching container {id}"))?;
    Ok((dir, client))
}

async fn exec(a: ExecArgs) -> Result<i32> {
    let (_dir, client) = open(&a.id).await?;
    let exec_id = format!("exec-{}-{}", std::process::id(), {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
    });
    let process = serde_json::to_vec(&process_json(&a.process, &a.command)?)?;
    let code = attach_and_wait(&client, &exec_id, &a.process, || async {
        client
            .exec_process(CONTAINER, &exec_id, process, a.process.interactive)
            .await?;
        Ok(())
    })
    .await;
    // The agent keeps an ended exec until told; a long-lived container
    // would otherwise collect one entry per `husk exec`.
    if let Err(e) = client.remove_process(CONTAINER, &exec_id).await {
        tracing::debug!(error = %e, "RemoveProcess");
    }
    code
}

fn vmm_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

async fn ps() -> Result<()> {
    let root = vm::runtime_root();
    vm::reap_stale(&root);
    println!("{:<20} {:<9} {:<9} COMMAND", "ID", "VMM PID", "STATUS");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    for dir in dirs {
        let Some(pid) = vmm_pid(&dir) else { continue };
        let id = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let command = std::fs::read_to_string(dir.join("command")).unwrap_or_default();
        let opts = husk_agent_client::ConnectOptions {
            boot_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(2),
            ..husk_agent_client::ConnectOptions::new(Vm::vsock_socket(&dir))
        };
        let status = match Client::connect(opts).await {
            Ok(c) => match c.list_processes(CONTAINER).await {
                Ok(p) if !p.is_empty() => "running",
                Ok(_) => "exited",
                Err(_) => "vm-only",
            },
            Err(_) => "booting",
        };
        println!("{id:<20} {pid:<9} {status:<9} {command}");
    }
    Ok(())
}

async fn rm(ids: Vec<String>, force: bool) -> Result<()> {
    let mut failed = false;
    for id in ids {
        let r = async {
            let (dir, client) = open(&id).await?;
            let running = !client
                .list_processes(CONTAINER)
                .await
                .unwrap_or_default()
                .is_empty();
            if running && !force {
                bail!("{id} is running: stop it first, or `husk rm -f {id}`");
            }
            let pid = vmm_pid(&dir).unwrap_or(0);
            let _ = client.shutdown(Duration::from_secs(2)).await;
            stop_vmm(&dir, pid).await
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

/// Waits for husk-vmm `pid` to exit (SIGKILL after 10 s), removes its directory.
async fn stop_vmm(dir: &Path, pid: i32) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(pid);
    for i in 0..240 {
        if pid.as_raw() <= 0 || kill(pid, None).is_err() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            return Ok(());
        }
        if i == 200 {
            let _ = kill(pid, Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("husk-vmm {pid} did not exit");
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
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,ttrpc=error,guest=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Vm(VmCmd::Boot {
            cpus,
            memory,
            boot_timeout,
            keep,
        }) => {
            let spec = VmSpec {
                vcpus: cpus,
                memory_mib: memory,
                boot_timeout: Duration::from_secs(boot_timeout),
                detach: keep,
                ..VmSpec::default()
            };
            let started = std::time::Instant::now();
            let vm = Vm::boot(&spec).await?;
            let ready = started.elapsed();
            let d = vm.client.guest_details().await?;
            println!("vm:        {}", vm.id);
            println!(
                "agent:     {} (ready {} ms after start)",
                d.agent_version,
                ready.as_millis()
            );
            println!("kernel:    {}", d.kernel_version);
            println!("cpus:      {} ({})", d.online_cpu_count, d.online_cpus);
            println!("memory:    {} KiB", d.memory_total_kib);
            if keep {
                println!("running:   husk-vmm pid {}", vm.vmm_pid);
                println!(
                    "vsock:     {} (CONNECT 1024 for the agent)",
                    Vm::vsock_socket(&vm.dir).display()
                );
                println!("console:   {}", Vm::console_log(&vm.dir).display());
                println!("stop with: husk vm stop {}", vm.id);
                return Ok(());
            }
            let status = vm.shutdown(Duration::from_secs(20)).await?;
            println!("stopped:   husk-vmm {status}");
            if !status.success() {
                anyhow::bail!("husk-vmm ended with {status}");
            }
        }
        Cmd::Run(a) => {
            let code = run(a).await?;
            std::process::exit(code);
        }
        Cmd::Exec(a) => {
            let code = exec(a).await?;
            std::process::exit(code);
        }
        Cmd::Ps => ps().await?,
        Cmd::Rm { force, ids } => rm(ids, force).await?,
        Cmd::Vm(VmCmd::Stop { id }) => {
            let dir = vm::runtime_root().join(&id);
            let opts = husk_agent_client::ConnectOptions {
                boot_timeout: Duration::from_secs(5),
                ..husk_agent_client::ConnectOptions::new(Vm::vsock_socket(&dir))
            };
            let client = husk_agent_client::Client::connect(opts)
                .await
                .with_context(|| format!("reaching VM {id}"))?;
            client.shutdown(Duration::from_secs(2)).await?;
            stop_vmm(&dir, vmm_pid(&dir).unwrap_or(0)).await?;
            println!("stopped {id}");
        }
    }
    Ok(())
}
