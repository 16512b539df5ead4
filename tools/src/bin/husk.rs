//! `husk`: Husk on one machine, without containerd.
//!
//!   husk run [-t] [-i] [-d] [--rm] [--name ID] [-e K=V] [-w DIR] [-u USER[:GROUP]]
//!            [-v HOST:GUEST[:ro]] [--read-only] [--cpus N] [--memory SIZE] IMAGE [CMD ARGS]
//!                              run IMAGE (pulled if missing) as a container in a new VM;
//!                              exits with its code (125: husk failed, 126/127: CMD cannot
//!                              be run / is not found)
//!   husk run --rootfs DIR [OPTIONS] -- CMD ARGS    the same from a root filesystem directory
//!   husk pull IMAGE            pull an image from its registry into the store
//!   husk login -u USER [--password-stdin] REGISTRY   check and keep credentials
//!   husk images [-q]           list the images in the store
//!   husk rmi [-f] IMAGE...     remove images (refused while a container uses one)
//!   husk image prune           remove what no image or container needs
//!   husk exec [-t] [-i] [-e K=V] [-w DIR] [-u UID[:GID]] ID -- CMD ARGS
//!                              run CMD in the running container ID
//!   husk ps [-a] [-q]          list running (-a: all) containers
//!   husk logs [-f] [--tail N] ID   a container's output, kept from every run
//!   husk stop [-t N] ID...     SIGTERM, then SIGKILL after N seconds (10)
//!   husk start ID...           run stopped containers again, detached
//!   husk inspect ID...         containers' records as JSON
//!   husk rm [-f] ID...         remove stopped (with -f: running) containers
//!   husk vm boot [--cpus N] [--memory MIB] [--keep]   boot a VM, show what the guest sees
//!   husk vm stop ID            stop a VM left running with --keep
//!   husk template build [--cpus N] [--memory MIB] [--network bridge|none]
//!                              build the VM template such runs resume from
//!   husk template ls [-q] | rm [--all] KEY... | prune   list, remove templates
//!
//! Containers are kept after they end (docker's model) in
//! `<storage_root>/containers/<id>/` until `husk rm` (or `--rm`). A
//! detached one is run by a `husk monitor` process of its own, the parent of
//! its VM. Calls first tidy what a `husk` killed with SIGKILL left behind
//! (its VM dies with it; the runtime directory is removed, its record marked
//! exited).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[path = "husk/containers.rs"]
mod containers;
#[path = "husk/images.rs"]
mod images;
#[path = "husk/templates.rs"]
mod templates;
use husk_runtime::config::Config;
use husk_runtime::container::Endpoint;
use husk_runtime::hypervisor::{Bind, Overlay};
use husk_runtime::image::{read_beneath, ImageError};
use husk_runtime::layout;
use husk_runtime::network::bridge;
use husk_runtime::sandbox::{cgroup, stale};
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
    Run(Box<RunArgs>),
    /// Run a command in a running container; exit with its code.
    Exec(ExecArgs),
    /// List the containers on this host (running ones; -a: all).
    Ps {
        #[arg(short, long)]
        all: bool,
        /// Only ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Stop running containers: SIGTERM, then SIGKILL after the grace time.
    Stop {
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(short = 't', long = "time", default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Start stopped containers again (detached; their writable layer kept).
    Start {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Send a signal to running containers' main process (SIGKILL unless
    /// told).
    Kill {
        /// The signal: a name (KILL, SIGTERM, hup) or a number.
        #[arg(short = 's', long = "signal", default_value = "KILL")]
        signal: String,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Wait for containers to stop, then print each one's exit code.
    Wait {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// A container's output, kept from every run of it: its stdout here on
    /// stdout, its stderr on stderr.
    Logs {
        /// Keep following while it runs.
        #[arg(short, long)]
        follow: bool,
        /// Each line with the time it was written (RFC 3339, nanoseconds).
        #[arg(short, long)]
        timestamps: bool,
        /// Only the last N lines.
        #[arg(long = "tail", short = 'n')]
        tail: Option<usize>,
        id: String,
    },
    /// Containers' records as JSON (docker's inspect fields).
    Inspect {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Runs a detached container (started by `run -d` and `start`).
    #[command(hide = true)]
    Monitor { id: String },
    /// Remove containers (their VMs).
    Rm {
        /// Also stop running ones.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Pull an image from a registry.
    Pull {
        image: String,
        /// Print only the image's name.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List images.
    Images {
        /// Only image ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove images.
    Rmi {
        /// Even if a container uses it (its layers stay until it goes).
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Check credentials for a registry and keep them (~/.docker/config.json).
    Login {
        #[arg(short, long)]
        username: String,
        #[arg(short, long, conflicts_with = "password_stdin")]
        password: Option<String>,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
        registry: String,
    },
    /// Images, as docker's `image` verbs.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Husk on this host, as docker's `system` verbs.
    #[command(subcommand)]
    System(SystemCmd),
    /// VM templates: a VM booted once to its agent and snapshotted, which
    /// runs of the same shape resume instead of booting.
    #[command(subcommand)]
    Template(TemplateCmd),
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Build (again) the template `husk run` with these flags resumes.
    Build {
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// "bridge" (one NIC) or "none".
        #[arg(long, default_value = "bridge")]
        network: String,
    },
    /// List templates.
    Ls {
        /// Only keys.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove templates (a key's first digits will do).
    Rm {
        /// Every template.
        #[arg(long, conflicts_with = "keys")]
        all: bool,
        #[arg(required_unless_present = "all")]
        keys: Vec<String>,
    },
    /// Remove templates no VM can use again (made from a husk-vmm, kernel
    /// or initramfs that has changed since).
    Prune,
}

#[derive(Subcommand)]
enum SystemCmd {
    /// Disk used by images and containers, and what could be reclaimed.
    Df,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List images.
    Ls {
        #[arg(short, long)]
        quiet: bool,
    },
    /// Pull an image.
    Pull { image: String },
    /// Remove images.
    Rm {
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove blobs and layers no image or container needs, and what
    /// interrupted pulls left.
    Prune,
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
    /// Working directory in the container (default: the image's, or /).
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// USER[:GROUP] to run as, names or numbers (default: the image's, or root).
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Run from this root filesystem directory instead of an image.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    #[command(flatten)]
    process: ProcessArgs,
    /// The container's name (its VM's id); random when not given.
    #[arg(long)]
    name: Option<String>,
    /// Start it and return; `husk rm -f ID` ends it.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Remove the container when it exits: its record, logs and writable
    /// layer. Without it an exited container stays (`husk ps -a`,
    /// `husk logs`, `husk start`) until `husk rm`.
    #[arg(long)]
    rm: bool,
    /// A host directory or file in the container: HOST:GUEST[:ro].
    #[arg(short = 'v', long = "volume")]
    volumes: Vec<String>,
    /// Mount the rootfs read-only.
    #[arg(long)]
    read_only: bool,
    /// Add a Linux capability to the default set (NET_ADMIN or
    /// CAP_NET_ADMIN; ALL for every one). `husk exec` gets the same set.
    #[arg(long = "cap-add")]
    cap_add: Vec<String>,
    /// Drop a Linux capability from the default set (ALL: every one).
    #[arg(long = "cap-drop")]
    cap_drop: Vec<String>,
    /// Run this instead of the image's ENTRYPOINT; the image's CMD is then
    /// dropped (the arguments after the image go to it), and "" clears the
    /// ENTRYPOINT and keeps the CMD, as docker does.
    #[arg(long)]
    entrypoint: Option<String>,
    /// The container's hostname (default: husk- and the first 12
    /// characters of its id).
    #[arg(long)]
    hostname: Option<String>,
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
    /// Publish a container port on the host: [IP:]HOST:CONTAINER[/tcp|udp].
    #[arg(short = 'p', long = "publish")]
    publish: Vec<String>,
    /// "bridge" (husk0, NAT to the outside; the default) or "none" (lo only).
    #[arg(long, default_value = "bridge")]
    network: String,
    /// Boot the VM instead of resuming it from a template (`template` in
    /// /etc/husk/config.toml says what runs do by default).
    #[arg(long)]
    no_template: bool,
    /// IMAGE [COMMAND [ARG...]]; with --rootfs, COMMAND [ARG...].
    #[arg(
        trailing_var_arg = true,
        required = true,
        value_name = "IMAGE [COMMAND]"
    )]
    args: Vec<String>,
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

/// Every capability a Linux 6.1 guest knows, by number.
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The default set with `--cap-add` and `--cap-drop` applied, as docker
/// does: names with or without `CAP_`, any case; `ALL`; drops first, then
/// adds. An unknown name is an error, never ignored.
fn capabilities(add: &[String], drop: &[String]) -> Result<Vec<String>> {
    let name = |flag: &str, c: &str| -> Result<Option<&'static str>> {
        let up = c.trim().to_ascii_uppercase();
        if up == "ALL" {
            return Ok(None);
        }
        let full = if up.starts_with("CAP_") {
            up
        } else {
            format!("CAP_{up}")
        };
        ALL_CAPS
            .iter()
            .find(|k| **k == full)
            .map(|k| Some(*k))
            .with_context(|| format!("{flag} {c:?}: not a Linux capability"))
    };
    let mut caps: Vec<&str> = DEFAULT_CAPS.to_vec();
    for c in drop {
        match name("--cap-drop", c)? {
            None => caps.clear(),
            Some(k) => caps.retain(|x| *x != k),
        }
    }
    for c in add {
        match name("--cap-add", c)? {
            None => caps = ALL_CAPS.to_vec(),
            Some(k) if !caps.contains(&k) => caps.push(k),
            Some(_) => {}
        }
    }
    Ok(caps.into_iter().map(String::from).collect())
}

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

/// What an image says a process gets, under what the flags say.
#[derive(Default)]
struct ImageDefaults {
    env: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
    /// The image's layers, topmost first: where names in `user` are looked up.
    layers: Vec<PathBuf>,
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An id from `/etc/passwd` or `/etc/group` of the image (the topmost layer
/// that has the file): `name` -> (field 2, field 3).
fn lookup(layers: &[PathBuf], file: &str, name: &str) -> Option<(u32, u32)> {
    let text = layers
        .iter()
        .find_map(|l| read_beneath(l, Path::new(file), 1 << 20))?;
    String::from_utf8_lossy(&text).lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            Some((
                f[2].parse().ok()?,
                f.get(3).and_then(|g| g.parse().ok()).unwrap_or(0),
            ))
        } else {
            None
        }
    })
}

/// USER[:GROUP], names or numbers, as docker reads `-u`: a name is looked
/// up in the image; a bare number with no passwd entry keeps its own gid.
fn user_ids(user: &str, layers: &[PathBuf]) -> Result<(u32, u32)> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => {
            let by_uid = layers
                .iter()
                .find_map(|l| read_beneath(l, Path::new("etc/passwd"), 1 << 20))
                .and_then(|t| {
                    String::from_utf8_lossy(&t).lines().find_map(|line| {
                        let f: Vec<&str> = line.split(':').collect();
                        (f.len() >= 4 && f[2] == u)
                            .then(|| f[3].parse().ok())
                            .flatten()
                    })
                });
            (n, by_uid.unwrap_or(n))
        }
        Err(_) => lookup(layers, "etc/passwd", u).with_context(|| {
            format!("unable to find user {u}: no matching entries in passwd file")
        })?,
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                lookup(layers, "etc/group", g)
                    .with_context(|| {
                        format!("unable to find group {g}: no matching entries in group file")
                    })?
                    .0
            }
        },
    };
    Ok((uid, gid))
}

/// The OCI `process` object for `p` running `args`, over `img`'s defaults,
/// with `capabilities` (an OCI capabilities object, [`caps_json`]).
fn process_json(
    p: &ProcessArgs,
    args: &[String],
    img: &ImageDefaults,
    capabilities: serde_json::Value,
) -> Result<serde_json::Value> {
    let user = p
        .user
        .as_deref()
        .or(img.user.as_deref())
        .filter(|u| !u.is_empty())
        .unwrap_or("0:0");
    let (uid, gid) = user_ids(user, &img.layers).with_context(|| format!("user {user:?}"))?;
    let mut env: Vec<String> = img.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let mut set = |e: String| {
        let key = e.split('=').next().unwrap_or("").to_string();
        env.retain(|old| old.split('=').next() != Some(key.as_str()));
        env.push(e);
    };
    if p.tty {
        set(format!(
            "TERM={}",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into())
        ));
    }
    for e in &p.env {
        if !e.contains('=') || e.starts_with('=') {
            bail!("-e {e:?}: expected NAME=value");
        }
        set(e.clone());
    }
    let cwd = p
        .workdir
        .clone()
        .or_else(|| img.workdir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    Ok(serde_json::json!({
        "terminal": p.tty,
        "user": {"uid": uid, "gid": gid},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": capabilities,
    }))
}

/// The OCI capabilities object giving the process `caps`, no more.
fn caps_json(caps: &[String]) -> serde_json::Value {
    serde_json::json!({
        "bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []
    })
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
    process: serde_json::Value,
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
        "process": process,
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

/// What runs: docker's merge of the image's ENTRYPOINT and CMD with
/// `--entrypoint` and the arguments after the image. A given entrypoint
/// replaces the image's and drops its CMD; an empty one clears the
/// ENTRYPOINT and keeps the CMD unless arguments replace it.
fn image_command(
    image_entrypoint: &[String],
    image_cmd: &[String],
    entrypoint: Option<&str>,
    args: &[String],
) -> Vec<String> {
    let (mut command, cmd) = match entrypoint {
        Some("") => (Vec::new(), image_cmd),
        Some(e) => (vec![e.to_string()], &[][..]),
        None => (image_entrypoint.to_vec(), image_cmd),
    };
    command.extend(if args.is_empty() { cmd } else { args }.iter().cloned());
    command
}

/// A `--hostname` the kernel takes and a resolver would: 1-64 characters,
/// letters, digits, `-` and `.`, not starting with either.
fn valid_hostname(h: &str) -> Result<String> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !h.starts_with(['-', '.']);
    if !ok {
        bail!("--hostname {h:?}: 1-64 letters, digits, '-' and '.', not starting with '-' or '.'");
    }
    Ok(h.to_string())
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

/// Removes a container's directory on drop unless kept (a failed
/// `husk run` leaves nothing behind).
struct Cleanup(Option<containers::Dir>);

impl Cleanup {
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            if let Err(e) = d.remove() {
                tracing::warn!(error = %e, "removing the container");
            }
        }
    }
}

/// The rootfs of `husk run IMAGE`: the image (pulled if missing) under a
/// fresh writable layer in `dir`, and what its config says to run.
async fn image_rootfs(
    cfg: &Config,
    dir: &containers::Dir,
    image: &str,
    rest: &[String],
    entrypoint: Option<&str>,
) -> Result<(
    containers::OverlayRecord,
    Vec<String>,
    ImageDefaults,
    String,
    String,
)> {
    let images = images::open(cfg)?;
    let rec = match images.resolve(image) {
        Ok(r) => r,
        Err(ImageError::NotFound(_)) => {
            eprintln!("Unable to find image '{image}' locally");
            let r = husk_runtime::image::pull::pull(
                &images,
                image,
                &images::registries(cfg),
                Arc::new(husk_runtime::image::pull::NoProgress),
            )
            .await
            .map_err(|e| images::pull_error(image, e))?;
            eprintln!("Pulled {} ({})", r.name, r.config.short());
            r
        }
        Err(e) => return Err(e.into()),
    };
    let config = images.config(&rec)?;
    let layers = images.lower_dirs(&rec)?;
    for d in ["upper", "work"] {
        let p = dir.0.join(d);
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    let chain: Vec<String> = rec.chain.iter().map(|c| c.to_string()).collect();
    // What `rmi` and the store's garbage collection read.
    std::fs::write(dir.0.join("layers"), chain.join("\n"))?;
    std::fs::write(dir.0.join("image"), rec.config.to_string())?;
    let run = &config.config;
    let command = image_command(
        run.entrypoint.as_deref().unwrap_or_default(),
        run.cmd.as_deref().unwrap_or_default(),
        entrypoint,
        rest,
    );
    if command.is_empty() {
        bail!("{image} has no Entrypoint or Cmd: give a command to run");
    }
    let overlay = containers::OverlayRecord {
        lower: layers.clone(),
        upper: dir.0.join("upper"),
        work: dir.0.join("work"),
        // Mounted writable even for --read-only: the agent makes the mount
        // points an image lacks (/proc, /sys) before its own read-only
        // remount (root.readonly in the spec), as runc does; the runtime
        // then makes the overlay read-only in husk-vmm's namespace.
        readonly: false,
    };
    let defaults = ImageDefaults {
        env: run.env.clone().unwrap_or_default(),
        workdir: run.working_dir.clone(),
        user: run.user.clone(),
        layers,
    };
    Ok((
        overlay,
        command,
        defaults,
        rec.name.clone(),
        rec.config.to_string(),
    ))
}

/// `husk run`: records the container, then runs it here (attached) or in
/// a monitor of its own (`-d`).
async fn run(a: RunArgs) -> Result<i32> {
    let cfg = Config::load_cli()?;
    containers::reap(&cfg);
    let id = a.name.clone().unwrap_or_else(layout::random_id);
    layout::check_id("container", &id)?;
    let dir = containers::Dir::of(&cfg, &id);
    std::fs::create_dir_all(dir.0.parent().unwrap_or(Path::new("/")))
        .with_context(|| format!("creating {}", cfg.storage_root.display()))?;
    match std::fs::create_dir(&dir.0) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("a container named {id:?} exists: `husk rm -f {id}` first")
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.0.display())),
    }
    let mut cleanup = Cleanup(Some(dir.clone()));
    let lock = dir.try_lock().context("locking the new container")?;
    let mut binds = Vec::new();
    let (command, defaults, overlay, image, image_id) = match &a.rootfs {
        Some(rootfs) => {
            let rootfs = rootfs
                .canonicalize()
                .with_context(|| format!("rootfs {}", rootfs.display()))?;
            // Read-only: the guest writes to a layer of its own (the agent's
            // rootfs overlay, in guest memory), never to the host's directory.
            binds.push(containers::BindRecord {
                source: rootfs.clone(),
                target: PathBuf::from("rootfs"),
                readonly: true,
            });
            let image = format!("--rootfs {}", rootfs.display());
            let command = image_command(&[], &[], a.entrypoint.as_deref(), &a.args);
            (command, ImageDefaults::default(), None, image, None)
        }
        None => {
            let (image, rest) = a.args.split_first().context("an image to run")?;
            let (o, command, defaults, name, config) =
                image_rootfs(&cfg, &dir, image, rest, a.entrypoint.as_deref()).await?;
            (command, defaults, Some(o), name, Some(config))
        }
    };
    let mut mounts = Vec::new();
    for (i, v) in a.volumes.iter().enumerate() {
        let (b, m) = volume(i, v)?;
        binds.push(containers::BindRecord {
            source: b.source,
            target: b.target,
            readonly: b.readonly,
        });
        mounts.push(m);
    }
    let memory_mib =
        u32::try_from(parse_size(&a.memory, 1 << 20)? >> 20).context("--memory is too large")?;
    let publish = network_args(&a.network, &a.publish)?;
    // Docker's default set unless told: root in the container is not root
    // in the VM (no CAP_SYS_ADMIN, no CAP_DAC_READ_SEARCH for file-handle
    // tricks...).
    let caps = caps_json(&capabilities(&a.cap_add, &a.cap_drop)?);
    let process = process_json(&a.process, &command, &defaults, caps)?;
    let host = match &a.hostname {
        Some(h) => valid_hostname(h)?,
        None => hostname(&id),
    };
    let spec = oci_spec(&a, process, &host, mounts)?;
    let rec = containers::Record {
        id: id.clone(),
        rootfs_overlay: a.rootfs.is_some(),
        image,
        image_id,
        command,
        created: containers::now(),
        spec,
        cpus: a.cpus,
        memory_mib,
        boot_timeout_secs: a.boot_timeout,
        binds,
        overlay,
        tty: a.process.tty,
        auto_remove: a.rm,
        network: Some(a.network.clone()),
        publish,
        no_template: a.no_template,
    };
    dir.save_record(&rec)?;
    dir.save_state(&containers::RunState::default())?;
    cleanup.keep();
    if a.detach {
        drop(lock);
        return start_monitor(&dir, &rec).await.map(|()| {
            println!("{id}");
            0
        });
    }
    let io = stdio(&a.process);
    let code = execute(&cfg, &dir, &rec, io, Some(&a.process)).await;
    drop(lock);
    if rec.auto_remove {
        let _ = dir.remove();
    }
    code
}

/// Starts `husk monitor ID` in a session of its own to run a detached
/// container, and returns once it runs (or says why it did not).
async fn start_monitor(dir: &containers::Dir, rec: &containers::Record) -> Result<()> {
    let exe = std::env::current_exe().context("finding the husk binary")?;
    let err = std::fs::File::create(dir.0.join("monitor.log"))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["monitor", &rec.id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err);
    if let Some(c) = std::env::var_os(husk_runtime::config::ENV_CONFIG) {
        cmd.env(husk_runtime::config::ENV_CONFIG, c);
    }
    // SAFETY: setsid(2) only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the container's monitor")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(rec.boot_timeout_secs + 30);
    loop {
        let s = dir.state();
        match s.status {
            containers::Status::Running => break,
            containers::Status::Exited => {
                if let Some(e) = s.error {
                    bail!("{e}");
                }
                break;
            }
            containers::Status::Created => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            if dir.state().status == containers::Status::Created {
                bail!(
                    "the container's monitor ended ({status}): {}",
                    std::fs::read_to_string(dir.0.join("monitor.log"))
                        .unwrap_or_default()
                        .trim()
                );
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the container did not start within {} s",
                rec.boot_timeout_secs + 30
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `husk monitor ID`: runs a detached container to its end, its output to
/// its log, its exit to its state.
async fn monitor(id: &str) -> Result<i32> {
    let cfg = Config::load_cli()?;
    let dir = containers::find(&cfg, id)?;
    let lock = dir.try_lock().context("the container runs already")?;
    let rec = dir.record()?;
    let log = dir.log();
    let io = StdioConfig {
        stdin: Endpoint::None,
        stdout: Endpoint::Log(log.clone()),
        stderr: Endpoint::Log(log),
        terminal: rec.tty,
    };
    let code = execute(&cfg, &dir, &rec, io, None).await;
    drop(lock);
    if rec.auto_remove {
        let _ = dir.remove();
    }
    code
}

/// Boots the container's VM, runs it to its end, records how it ended.
/// `attached`: this terminal's process options (signals, raw mode).
async fn execute(
    cfg: &Config,
    dir: &containers::Dir,
    rec: &containers::Record,
    mut io: StdioConfig,
    attached: Option<&ProcessArgs>,
) -> Result<i32> {
    if attached.is_some() {
        // What reaches the terminal is kept too, for `husk logs`.
        let log = dir.log();
        io.stdout = match io.stdout {
            Endpoint::Inherit => Endpoint::InheritAndLog(log.clone()),
            e => e,
        };
        io.stderr = match io.stderr {
            Endpoint::Inherit => Endpoint::InheritAndLog(log),
            e => e,
        };
    }
    let result = boot_and_wait(cfg, dir, rec, io, attached).await;
    let mut end = containers::RunState {
        status: containers::Status::Exited,
        finished: Some(containers::now()),
        ..dir.state()
    };
    match &result {
        Ok(code) => end.exit_code = Some(*code),
        Err(e) => {
            end.exit_code = Some(125);
            end.error = Some(format!("{e:#}"));
        }
    }
    dir.save_state(&end)?;
    result
}

/// `--network` and `-p`, checked before anything is made.
fn network_args(network: &str, publish: &[String]) -> Result<Vec<bridge::Publish>> {
    if network != "bridge" && network != "none" {
        bail!("--network {network:?}: husk has \"bridge\" and \"none\"");
    }
    let ports = publish
        .iter()
        .map(|p| p.parse::<bridge::Publish>())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if network == "none" && !ports.is_empty() {
        bail!("-p needs a network: not with --network none");
    }
    Ok(ports)
}

/// Boots the container's VM on its network, runs it to its end; the
/// network goes whatever happened.
async fn boot_and_wait(
    cfg: &Config,
    dir: &containers::Dir,
    rec: &containers::Record,
    io: StdioConfig,
    attached: Option<&ProcessArgs>,
) -> Result<i32> {
    let netns = match rec.network.as_deref() {
        Some("bridge") => Some(
            bridge::connect(&rec.id, rec.publish.clone())
                .await
                .context("connecting to the bridge network")?,
        ),
        _ => None,
    };
    // 127.0.0.1:PORT, which NAT cannot reach, through a relay in this
    // process (it lives as long as the container: the CLI or its monitor).
    let proxies = bridge::proxy_localhost(&rec.id, &rec.publish);
    let result = boot_on(cfg, dir, rec, io, attached, netns.clone()).await;
    for p in proxies {
        p.abort();
    }
    if netns.is_some() {
        if let Err(e) = bridge::disconnect(&rec.id).await {
            tracing::warn!(container = %rec.id, error = %e, "leaving the bridge network");
        }
    }
    result
}

async fn boot_on(
    cfg: &Config,
    dir: &containers::Dir,
    rec: &containers::Record,
    io: StdioConfig,
    attached: Option<&ProcessArgs>,
    netns: Option<PathBuf>,
) -> Result<i32> {
    let spec = SandboxSpec {
        vm: VmSpec {
            vcpus: rec.cpus,
            memory_mib: rec.memory_mib,
            boot_timeout: Duration::from_secs(rec.boot_timeout_secs),
            binds: rec
                .binds
                .iter()
                .map(|b| Bind {
                    source: b.source.clone(),
                    target: b.target.clone(),
                    readonly: b.readonly,
                })
                .collect(),
            overlays: rec
                .overlay
                .iter()
                .map(|o| Overlay {
                    lower: o.lower.clone(),
                    upper: o.upper.clone(),
                    work: o.work.clone(),
                    target: PathBuf::from("rootfs"),
                    readonly: o.readonly,
                })
                .collect(),
            ..cfg.vm_spec(&Default::default())?
        },
        hostname: Some(
            rec.spec["hostname"]
                .as_str()
                .map_or_else(|| hostname(&rec.id), str::to_string),
        ),
        forward_vmm_log: false,
        netns,
        // The host's cost of the VM is bounded, as docker bounds a
        // container's: guest RAM and husk's own overhead, no more.
        cgroup: Some(cgroup::cli_vm_path(&rec.id)),
        cgroup_limits: Some(cgroup::Limits::for_vm(rec.memory_mib)),
        template: cfg.template && !rec.no_template,
        ..Default::default()
    };
    let oom = Arc::new(OomSeen::default());
    let sandbox = match Sandbox::boot(&rec.id, &spec, &HuskVmm, oom.clone()).await {
        Err(husk_runtime::Error::AlreadyExists(_)) => {
            bail!("the VM of {:?} runs already", rec.id)
        }
        r => r?,
    };
    std::fs::write(sandbox.layout().command_file(), rec.command.join(" "))?;
    let result = run_in(&sandbox, dir, rec, io, &oom, attached).await;
    // Whatever happened, the VM goes.
    sandbox.own();
    let stopped = sandbox.shutdown().await;
    let code = result?;
    if !stopped.success() {
        tracing::warn!(%stopped, "husk-vmm did not end cleanly");
    }
    Ok(code)
}

/// docker's codes for a command that could not be started: 127 when it
/// was not found, 126 when it could not be run.
fn start_failure_code(e: &husk_runtime::Error) -> Option<i32> {
    let text = e.to_string();
    if !text.contains("failed at Exec") {
        return None;
    }
    Some(
        if text.contains("ENOENT") || text.contains("No such file") {
            127
        } else {
            126
        },
    )
}

async fn run_in(
    sb: &Sandbox,
    dir: &containers::Dir,
    rec: &containers::Record,
    io: StdioConfig,
    oom: &OomSeen,
    attached: Option<&ProcessArgs>,
) -> Result<i32> {
    let c = sb
        .create_container(ContainerConfig {
            id: CONTAINER.into(),
            spec: rec.spec.clone(),
            share_mounts: Vec::new(),
            stdio: io,
            // A rootfs directory is shared read-only and the container
            // writes to a layer in the guest's memory, gone with it; an
            // image's rootfs has its own writable layer on the host.
            rootfs_overlay: rec.rootfs_overlay,
            bundle: String::new(),
        })
        .await?;
    let _raw = RawMode::enter(attached.is_some_and(|p| p.tty));
    if let Err(e) = c.start(INIT).await {
        if let Some(code) = start_failure_code(&e) {
            let cmd = rec.command.first().map(String::as_str).unwrap_or("");
            // docker's words; the agent's own error under --debug.
            if code == 127 {
                eprintln!("husk: exec: {cmd:?}: executable file not found in $PATH");
            } else {
                eprintln!("husk: exec: {cmd:?}: permission denied");
            }
            tracing::debug!(error = %e, "the command did not start");
            let _ = sb.delete_container(CONTAINER).await;
            return Ok(code);
        }
        return Err(e.into());
    }
    // Running from here: `run -d` and `start` return once this is written.
    dir.save_state(&containers::RunState {
        status: containers::Status::Running,
        started: Some(containers::now()),
        ..Default::default()
    })?;
    let forward = attached.map(|p| forward_signals(c.clone(), INIT.into(), p.tty));
    let exit = c.wait(INIT).await;
    if let Some(f) = forward {
        f.abort();
    }
    let exit = exit?;
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
    // The container's own set (its --cap-add and --cap-drop), as docker's
    // exec gets; a record that cannot be read leaves the default set.
    let caps = Config::load_cli()
        .ok()
        .and_then(|cfg| containers::find(&cfg, &a.id).ok())
        .and_then(|d| d.record().ok())
        .map(|r| r.spec["process"]["capabilities"].clone())
        .filter(|c| c.is_object())
        .unwrap_or_else(|| caps_json(&capabilities(&[], &[]).unwrap_or_default()));
    let process = serde_json::to_vec(&process_json(
        &a.process,
        &a.command,
        &ImageDefaults::default(),
        caps,
    )?)?;
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

/// `husk ps [-a]`: docker's columns, from the containers' records.
async fn ps(all: bool, quiet: bool) -> Result<()> {
    let cfg = Config::load_cli()?;
    stale::reap(&layout::runtime_root());
    containers::reap(&cfg);
    let mut rows = Vec::new();
    for (id, d) in containers::all(&cfg) {
        let Ok(r) = d.record() else { continue };
        let running = d.running();
        if !all && !running {
            continue;
        }
        if quiet {
            println!("{id}");
            continue;
        }
        let mut command = format!("\"{}\"", r.command.join(" "));
        if command.chars().count() > 22 {
            command = format!("{}…\"", command.chars().take(20).collect::<String>());
        }
        let image = if r.image.starts_with("--rootfs") {
            "(rootfs)".to_string()
        } else {
            images::repo_tag(&r.image).0 + ":" + &images::repo_tag(&r.image).1
        };
        let short: String = id.chars().take(12).collect();
        rows.push([
            short,
            image,
            command,
            images::ago(Some(r.created as i64)),
            containers::status_text(&d),
            if running {
                ports_text(&r.publish)
            } else {
                String::new()
            },
            id,
        ]);
    }
    if !quiet {
        let header = [
            "CONTAINER ID",
            "IMAGE",
            "COMMAND",
            "CREATED",
            "STATUS",
            "PORTS",
            "NAMES",
        ]
        .map(String::from);
        images::print_table(&header, &rows);
    }
    Ok(())
}

/// docker's PORTS column: `0.0.0.0:8080->80/tcp, ...`.
fn ports_text(ports: &[bridge::Publish]) -> String {
    ports
        .iter()
        .map(|p| {
            format!(
                "{}:{}->{}/{}",
                p.host_ip.map_or("0.0.0.0".to_string(), |ip| ip.to_string()),
                p.host_port,
                p.container_port,
                if p.udp { "udp" } else { "tcp" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Docker's multi-container verbs: `f` for each id in turn, the id printed
/// when it went through, `husk VERB ID: error` when not, and a failure
/// once all were tried.
async fn each_container(
    verb: &str,
    past: &str,
    ids: Vec<String>,
    f: impl AsyncFn(&str) -> Result<()>,
) -> Result<()> {
    let mut failed = false;
    for id in ids {
        match f(&id).await {
            Ok(()) => println!("{id}"),
            Err(e) => {
                eprintln!("husk {verb} {id}: {e:#}");
                failed = true;
            }
        }
    }
    if failed {
        bail!("some containers were not {past}");
    }
    Ok(())
}

/// `husk stop [-t N] ID...`: SIGTERM, then SIGKILL after N seconds.
async fn stop(ids: Vec<String>, grace: u64) -> Result<()> {
    let cfg = Config::load_cli()?;
    each_container("stop", "stopped", ids, async |id: &str| {
        let d = containers::find(&cfg, id)?;
        if !d.running() {
            return Ok(());
        }
        let sb = open(id).await?;
        let c = sb.adopt_container(CONTAINER);
        let _ = c.kill(INIT, libc::SIGTERM as u32, false).await;
        if !d.wait_stopped(Duration::from_secs(grace)).await {
            let _ = c.kill(INIT, libc::SIGKILL as u32, false).await;
            if !d.wait_stopped(Duration::from_secs(10)).await {
                sb.own();
                sb.shutdown().await;
                d.wait_stopped(Duration::from_secs(10)).await;
            }
        }
        Ok(())
    })
    .await
}

/// `husk kill [-s SIGNAL] ID...`: a signal to each running container's
/// main process; docker's default, SIGKILL.
async fn kill(ids: Vec<String>, signal: &str) -> Result<()> {
    let sig = parse_signal(signal)?;
    let cfg = Config::load_cli()?;
    each_container("kill", "signalled", ids, async |id: &str| {
        let d = containers::find(&cfg, id)?;
        if !d.running() {
            bail!("container {id} is not running");
        }
        // Its VM is named by the container's full id.
        let sb = open(&d.record()?.id).await?;
        sb.adopt_container(CONTAINER)
            .kill(INIT, sig as u32, false)
            .await?;
        Ok(())
    })
    .await
}

/// A signal as docker's `-s` takes it: a number, or a name with or without
/// `SIG`, in any case.
fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal;
    let bad = || anyhow::anyhow!("{s:?} is not a signal");
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let upper = s.to_ascii_uppercase();
    let name = match upper.strip_prefix("SIG") {
        Some(_) => upper,
        None => format!("SIG{upper}"),
    };
    name.parse::<Signal>().map_err(|_| bad())
}

/// `husk wait ID...`: blocks until each container has stopped and prints
/// its exit code, one a line (docker's).
async fn wait(ids: Vec<String>) -> Result<()> {
    let cfg = Config::load_cli()?;
    for id in ids {
        let d = containers::find(&cfg, &id)?;
        while !d.wait_stopped(Duration::from_secs(3600)).await {}
        // A monitor that was killed left no exit behind: recorded now.
        containers::reap(&cfg);
        let code = d
            .state()
            .exit_code
            .with_context(|| format!("{id} stopped without an exit code"))?;
        println!("{code}");
    }
    Ok(())
}

/// `husk start ID...`: a stopped container runs again (same writable layer).
async fn start(ids: Vec<String>) -> Result<()> {
    let cfg = Config::load_cli()?;
    containers::reap(&cfg);
    for id in ids {
        let d = containers::find(&cfg, &id)?;
        if d.running() {
            println!("{id}");
            continue;
        }
        let rec = d.record()?;
        d.save_state(&containers::RunState::default())?;
        start_monitor(&d, &rec)
            .await
            .with_context(|| format!("starting {id}"))?;
        println!("{id}");
    }
    Ok(())
}

/// `husk logs [-f] [-t] [--tail N] ID`: the container's stdout records to
/// stdout, its stderr records to stderr, as docker's.
async fn logs(id: String, follow: bool, tail: Option<usize>, timestamps: bool) -> Result<()> {
    use std::io::{Read, Seek};
    let cfg = Config::load_cli()?;
    let d = containers::find(&cfg, &id)?;
    let mut f = match std::fs::File::open(d.log()) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => return Ok(()),
        Err(_) => {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.log())?;
            std::fs::File::open(d.log())?
        }
    };
    let mut all = Vec::new();
    f.read_to_end(&mut all)?;
    let mut pos = all.len() as u64;
    // A record still being written waits for its newline.
    let complete = all.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut pending = all.split_off(complete);
    let shown = match tail {
        Some(n) => containers::tail_lines(&all, n),
        None => &all,
    };
    let mut out = LogOutput { timestamps };
    out.lines(shown)?;
    if !follow {
        return Ok(());
    }
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let running = d.running();
        f.seek(std::io::SeekFrom::Start(pos))?;
        let n = f.read(&mut buf)?;
        if n > 0 {
            pos += n as u64;
            pending.extend_from_slice(&buf[..n]);
            if let Some(i) = pending.iter().rposition(|&b| b == b'\n') {
                let rest = pending.split_off(i + 1);
                out.lines(&pending)?;
                pending = rest;
            }
            continue;
        }
        if !running {
            return out.lines(&pending);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes log records where they came from.
struct LogOutput {
    timestamps: bool,
}

impl LogOutput {
    fn lines(&mut self, bytes: &[u8]) -> Result<()> {
        use husk_runtime::container::logfile::{self, Line};
        use std::io::Write;
        let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr().lock());
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match logfile::parse(line) {
                Line::Record(r) => {
                    let w: &mut dyn Write = if r.is_stderr() {
                        &mut stderr
                    } else {
                        &mut stdout
                    };
                    if self.timestamps {
                        write!(w, "{} ", r.time)?;
                    }
                    w.write_all(r.log.as_bytes())?;
                }
                // A log kept before records (or not one of ours).
                Line::Raw(raw) => {
                    stdout.write_all(&raw)?;
                    stdout.write_all(b"\n")?;
                }
            }
        }
        stdout.flush()?;
        stderr.flush()?;
        Ok(())
    }
}

fn inspect(ids: Vec<String>) -> Result<()> {
    let cfg = Config::load_cli()?;
    let mut out = Vec::new();
    for id in &ids {
        out.push(containers::inspect(&containers::find(&cfg, id)?)?);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn rm(ids: Vec<String>, force: bool) -> Result<()> {
    let cfg = Config::load_cli()?;
    containers::reap(&cfg);
    each_container("rm", "removed", ids, async |id: &str| {
        layout::check_id("container", id)?;
        let d = containers::Dir::of(&cfg, id);
        let has_vm = layout::runtime_root().join(id).exists();
        if !d.exists() && !has_vm {
            bail!("No such container: {id}");
        }
        if d.running() || (!d.exists() && has_vm) {
            if !force {
                bail!("{id} is running: stop it first, or `husk rm -f {id}`");
            }
            if let Ok(sb) = open(id).await {
                sb.own();
                sb.shutdown().await;
            }
            if !d.wait_stopped(Duration::from_secs(20)).await {
                bail!("{id} did not stop");
            }
        }
        // What a killed monitor left of its network and cgroup.
        bridge::disconnect(id).await?;
        cgroup::remove_stale(&cgroup::cli_vm_path(id));
        if d.0.exists() {
            d.remove()?;
        }
        Ok(())
    })
    .await
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
        /// Boot it even when a template could be resumed.
        #[arg(long)]
        no_template: bool,
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
            no_template,
        }) => {
            let cfg = Config::load_cli()?;
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
                template: cfg.template && !no_template,
                ..Default::default()
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
            match sb.from_template() {
                Some(t) => println!(
                    "start:     resumed from template {}",
                    t.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .get(..12)
                        .unwrap_or("?")
                ),
                None => println!("start:     booted"),
            }
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
        Cmd::Run(a) => run(*a).await,
        Cmd::Template(TemplateCmd::Build {
            cpus,
            memory,
            network,
        }) => {
            let cfg = Config::load_cli()?;
            templates::build(&cfg, cpus, memory, &network)
                .await
                .map(|()| 0)
        }
        Cmd::Template(TemplateCmd::Ls { quiet }) => templates::ls(quiet).map(|()| 0),
        Cmd::Template(TemplateCmd::Rm { all, keys }) => templates::rm(&keys, all).map(|()| 0),
        Cmd::Template(TemplateCmd::Prune) => {
            templates::prune();
            Ok(0)
        }
        Cmd::Exec(a) => exec(a).await,
        Cmd::Ps { all, quiet } => ps(all, quiet).await.map(|()| 0),
        Cmd::Stop { time, ids } => stop(ids, time).await.map(|()| 0),
        Cmd::Start { ids } => start(ids).await.map(|()| 0),
        Cmd::Kill { signal, ids } => kill(ids, &signal).await.map(|()| 0),
        Cmd::Wait { ids } => wait(ids).await.map(|()| 0),
        Cmd::Logs {
            follow,
            tail,
            timestamps,
            id,
        } => logs(id, follow, tail, timestamps).await.map(|()| 0),
        Cmd::Inspect { ids } => inspect(ids).map(|()| 0),
        Cmd::Monitor { id } => monitor(&id).await,
        Cmd::Rm { force, ids } => rm(ids, force).await.map(|()| 0),
        Cmd::Pull { image, quiet } => images::pull(&Config::load_cli()?, &image, quiet)
            .await
            .map(|_| 0),
        Cmd::Image(ImageCmd::Pull { image }) => images::pull(&Config::load_cli()?, &image, false)
            .await
            .map(|_| 0),
        Cmd::Login {
            username,
            password,
            password_stdin,
            registry,
        } => images::login(
            &Config::load_cli()?,
            &registry,
            &username,
            password,
            password_stdin,
        )
        .await
        .map(|()| 0),
        Cmd::Images { quiet } | Cmd::Image(ImageCmd::Ls { quiet }) => {
            images::list(&Config::load_cli()?, quiet).map(|()| 0)
        }
        Cmd::Rmi { force, images } | Cmd::Image(ImageCmd::Rm { force, images }) => {
            let cfg = Config::load_cli()?;
            containers::reap(&cfg);
            images::rmi(&cfg, &images, force).map(|()| 0)
        }
        Cmd::System(SystemCmd::Df) => {
            let cfg = Config::load_cli()?;
            containers::reap(&cfg);
            images::df(&cfg).map(|()| 0)
        }
        Cmd::Image(ImageCmd::Prune) => {
            let cfg = Config::load_cli()?;
            containers::reap(&cfg);
            images::prune(&cfg).map(|()| 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(add: &[&str], drop: &[&str]) -> Result<Vec<String>> {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        capabilities(&v(add), &v(drop))
    }

    #[test]
    fn entrypoint_and_cmd_merge_as_docker() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (ep, cmd) = (v(&["/entry", "-x"]), v(&["serve", "--port=80"]));
        let run = |e: Option<&str>, args: &[&str]| image_command(&ep, &cmd, e, &v(args));
        assert_eq!(run(None, &[]), v(&["/entry", "-x", "serve", "--port=80"]));
        assert_eq!(run(None, &["sh"]), v(&["/entry", "-x", "sh"]));
        // A given entrypoint drops the image's CMD.
        assert_eq!(run(Some("/bin/echo"), &[]), v(&["/bin/echo"]));
        assert_eq!(
            run(Some("/bin/echo"), &["a", "b"]),
            v(&["/bin/echo", "a", "b"])
        );
        // An empty one clears the ENTRYPOINT and keeps the CMD.
        assert_eq!(run(Some(""), &[]), v(&["serve", "--port=80"]));
        assert_eq!(run(Some(""), &["id"]), v(&["id"]));
        // --rootfs: no image, the arguments are the command.
        assert_eq!(image_command(&[], &[], None, &v(&["true"])), v(&["true"]));
        assert_eq!(
            image_command(&[], &[], Some("/init"), &v(&["a"])),
            v(&["/init", "a"])
        );
    }

    #[test]
    fn hostnames_and_signals_are_checked() {
        assert_eq!(valid_hostname("web-1.local").unwrap(), "web-1.local");
        for bad in ["", "-x", ".x", "a b", "a/b", &"x".repeat(65)] {
            assert!(valid_hostname(bad).is_err(), "{bad:?}");
        }
        use nix::sys::signal::Signal;
        for (s, want) in [
            ("KILL", Signal::SIGKILL),
            ("sigterm", Signal::SIGTERM),
            ("hup", Signal::SIGHUP),
            ("9", Signal::SIGKILL),
            ("SIGUSR1", Signal::SIGUSR1),
        ] {
            assert_eq!(parse_signal(s).unwrap(), want, "{s}");
        }
        for bad in ["NOPE", "0", "999", "", "SIG"] {
            assert!(parse_signal(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cap_add_and_drop_change_the_default_set_as_docker() {
        let default: Vec<String> = DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
        assert_eq!(caps(&[], &[]).unwrap(), default);
        let added = caps(&["net_admin", "CAP_SYS_TIME", "NET_RAW"], &[]).unwrap();
        assert_eq!(added.len(), default.len() + 2);
        assert!(added.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(added.contains(&"CAP_SYS_TIME".to_string()));
        let dropped = caps(&[], &["NET_RAW", "cap_mknod"]).unwrap();
        assert!(!dropped.contains(&"CAP_NET_RAW".to_string()));
        assert!(!dropped.contains(&"CAP_MKNOD".to_string()));
        assert_eq!(dropped.len(), default.len() - 2);
        // Drops first, then adds: `--cap-drop ALL --cap-add CHOWN` is CHOWN.
        assert_eq!(caps(&["chown"], &["ALL"]).unwrap(), vec!["CAP_CHOWN"]);
        assert_eq!(caps(&["all"], &[]).unwrap().len(), ALL_CAPS.len());
    }

    #[test]
    fn unknown_capabilities_are_refused_by_name() {
        let e = caps(&["NET_WIZARD"], &[]).unwrap_err().to_string();
        assert!(e.contains("--cap-add \"NET_WIZARD\""), "{e}");
        let e = caps(&[], &["CAP_"]).unwrap_err().to_string();
        assert!(e.contains("--cap-drop"), "{e}");
    }
}
