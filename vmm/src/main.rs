//! `husk-vmm`: boots one micro-VM and exits when it stops.
//!
//! Exit status: 0 when the guest powers off or reboots (a Husk guest's way to shut
//! down) or on SIGTERM/SIGINT; 1 on a VMM error; 2 on a guest kernel panic; 3 when
//! a vCPU fails (KVM cannot run the guest); 159 when seccomp denies a syscall.
//! A `{"op":"shutdown"}` on the control socket (`--api-socket`) exits 0.

use std::io::{IsTerminal, Stderr, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use husk_vmm::config::VmConfig;
use husk_vmm::logging::BoundedLog;

#[derive(Parser, Debug)]
#[command(name = "husk-vmm", about = "Husk's KVM micro-VM monitor", version)]
struct Args {
    /// The guest kernel: ELF vmlinux (PVH) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// The whole guest command line (the Husk defaults otherwise).
    #[arg(long)]
    cmdline: Option<String>,
    /// Parameters appended after the command line (`--cmdline` or the defaults).
    #[arg(long = "extra-cmdline")]
    extra_cmdline: Option<String>,
    #[arg(long)]
    vcpus: Option<u64>,
    #[arg(long = "memory-mib")]
    memory_mib: Option<u64>,
    /// Where the guest console goes (stderr otherwise).
    #[arg(long = "serial-out")]
    serial_out: Option<PathBuf>,
    /// The host side of vsock (no vsock device otherwise).
    #[arg(long = "vsock-socket")]
    vsock_socket: Option<PathBuf>,
    /// A host directory to share into the guest over virtio-fs.
    #[arg(long = "shared-dir")]
    shared_dir: Option<PathBuf>,
    /// The virtio-fs tag the guest mounts (default husk-share).
    #[arg(long = "fs-tag")]
    fs_tag: Option<String>,
    /// The guest's vsock CID.
    #[arg(long = "guest-cid")]
    guest_cid: Option<u64>,
    /// A JSON VM description; flags override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run without seccomp filters (debugging only).
    #[arg(long = "no-seccomp")]
    no_seccomp: bool,
    /// Run without the Landlock jail (debugging only).
    #[arg(long = "no-landlock")]
    no_landlock: bool,
    /// The control socket for the shim: line-oriented JSON (ping, info, shutdown).
    #[arg(long = "api-socket")]
    api_socket: Option<PathBuf>,
    /// An inherited fd that gets one byte, then is closed, once the guest runs.
    #[arg(long = "ready-fd")]
    ready_fd: Option<i32>,
    /// Bytes of this process's own log (stderr) before the rest is dropped
    /// (default 16 MiB).
    #[arg(long = "log-limit-bytes")]
    log_limit_bytes: Option<u64>,
    /// A guest NIC (repeatable): `fd=N,mac=AA:BB:CC:DD:EE:FF[,mtu=M][,rx-bps=B][,tx-bps=B]`,
    /// N an inherited tap fd opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
    #[arg(long = "net")]
    net: Vec<husk_vmm::config::NetConfig>,
    /// Where `{"op":"snapshot"}` on the control socket writes the snapshot
    /// (an existing directory; the request is refused without it).
    #[arg(long = "snapshot-to")]
    snapshot_to: Option<PathBuf>,
    /// Resume the snapshot in this directory instead of booting; the kernel,
    /// initramfs, command line, vCPUs and memory must be the snapshot's.
    #[arg(long = "restore-from")]
    restore_from: Option<PathBuf>,
    /// Become this user once set up (with --gid): no capabilities left,
    /// the share served by a file-system process that keeps them.
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
    /// Internal: be the file-system process of a husk-vmm (the share of
    /// --shared-dir, requests on stdin, a Unix socket).
    #[arg(long = "serve-fs", hide = true)]
    serve_fs: bool,
}

fn build_config(args: Args) -> anyhow::Result<VmConfig> {
    let mut c = match &args.config {
        Some(p) => VmConfig::from_file(p)?,
        None => VmConfig::default(),
    };
    if args.kernel.is_some() {
        c.kernel = args.kernel;
    }
    if args.initramfs.is_some() {
        c.initramfs = args.initramfs;
    }
    if args.cmdline.is_some() {
        c.cmdline = args.cmdline;
    }
    if args.extra_cmdline.is_some() {
        c.extra_cmdline = args.extra_cmdline;
    }
    if let Some(v) = args.vcpus {
        c.vcpus = v;
    }
    if let Some(m) = args.memory_mib {
        c.memory_mib = m;
    }
    if args.serial_out.is_some() {
        c.serial_out = args.serial_out;
    }
    if args.shared_dir.is_some() {
        c.shared_dir = args.shared_dir;
    }
    if let Some(t) = args.fs_tag {
        c.fs_tag = t;
    }
    if args.vsock_socket.is_some() {
        c.vsock_socket = args.vsock_socket;
    }
    if let Some(cid) = args.guest_cid {
        c.guest_cid = cid;
    }
    if args.no_seccomp {
        c.seccomp = false;
    }
    if args.no_landlock {
        c.landlock = false;
    }
    if args.api_socket.is_some() {
        c.api_socket = args.api_socket;
    }
    if let Some(n) = args.log_limit_bytes {
        c.log_limit_bytes = n;
    }
    if args.snapshot_to.is_some() {
        c.snapshot_to = args.snapshot_to;
    }
    if args.restore_from.is_some() {
        c.restore_from = args.restore_from;
    }
    if let (Some(uid), Some(gid)) = (args.uid, args.gid) {
        c.user = Some(husk_vmm::config::User { uid, gid });
    }
    c.ready_fd = args.ready_fd;
    c.net = args.net;
    Ok(c)
}

/// The log: tracing to stderr, bounded (see husk_vmm::logging).
fn init_log(limit: u64) -> BoundedLog<Stderr> {
    let log = BoundedLog::new(std::io::stderr(), limit);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(log.clone())
        // Colours only for a person's terminal: vmm.log is a file, and its
        // readers show control characters as `?`.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    log
}

/// The last word, outside the limit (it is one line), and never a panic if
/// stderr is gone (`eprintln!` would panic).
fn last_line(log: Option<&BoundedLog<Stderr>>, line: std::fmt::Arguments) {
    let write = |o: &mut Stderr| {
        let _ = writeln!(o, "husk-vmm: {line}");
        if let Some((lines, bytes)) = log.map(BoundedLog::dropped).filter(|d| d.0 > 0) {
            let _ = writeln!(
                o,
                "husk-vmm: {lines} log lines ({bytes} bytes) were dropped past the log limit"
            );
        }
    };
    match log {
        Some(l) => l.with_output(write),
        None => write(&mut std::io::stderr()),
    }
}

/// An error and its causes, `: `-joined like `{:#}`, but without a cause
/// its parent already ends with (our error types name their sources in
/// their own text too).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.ends_with(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

fn main() -> ExitCode {
    // Before any allocation a thread could make: no arena of a filtered
    // thread may ever need a file (seccomp::prepare_allocator).
    husk_vmm::seccomp::prepare_allocator();
    // The config first: its log limit sizes the log. Nothing before logs.
    let args = Args::parse();
    let serve_fs = args.serve_fs;
    let config = match build_config(args) {
        Ok(c) => c,
        Err(e) => {
            last_line(None, format_args!("error: {e:#}"));
            return ExitCode::from(1);
        }
    };
    let log = init_log(config.log_limit_bytes);
    if serve_fs {
        return match husk_vmm::fs_process::serve(&config).map_err(anyhow::Error::from) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                last_line(
                    Some(&log),
                    format_args!("file-system process: {}", chain(&e)),
                );
                ExitCode::from(1)
            }
        };
    }
    let run = config
        .validate()
        .map_err(anyhow::Error::from)
        .and_then(|valid| husk_vmm::vmm::run(&valid).context("running the VM"));
    match run {
        Ok(reason) => {
            let code = reason.exit_code();
            last_line(Some(&log), format_args!("{reason}"));
            // vCPU threads may still be inside KVM_RUN; exiting the process ends them.
            std::process::exit(code);
        }
        Err(e) => {
            last_line(Some(&log), format_args!("error: {}", chain(&e)));
            ExitCode::from(1)
        }
    }
}
