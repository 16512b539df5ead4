//! containerd-shim-husk-v2: Husk as containerd runtime `io.containerd.husk.v2`.
//! One shim daemon and one micro-VM per pod; see docs/shim.md.

mod events;
mod options;
mod shim;
mod task;

use std::os::unix::fs::OpenOptionsExt;

/// The name containerd knows the runtime by.
const RUNTIME_ID: &str = "io.containerd.husk.v2";

/// Logging: the serving daemon writes to the bundle's `log` FIFO, which
/// containerd reads into its own log; `start` and `delete` write to stderr,
/// which containerd quotes when they fail (stdout is the protocol).
fn init_logging(flags: &containerd_shim::Flags) {
    let user = std::env::var("RUST_LOG").ok().or_else(|| {
        if flags.debug {
            Some("debug,ttrpc=info".into())
        } else {
            husk_runtime::config::Config::load(None)
                .map(|c| c.log_level)
                .ok()
        }
    });
    let filter = husk_runtime::logging::directives(user, "info,ttrpc=error");
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    if flags.action.is_empty() {
        // Read-write and non-blocking: opening never waits for a reader, and
        // a containerd that is restarting loses no line the FIFO can hold
        // nor stalls the shim.
        if let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("log")
        {
            let _ = builder.with_writer(std::sync::Mutex::new(f)).try_init();
            return;
        }
    }
    let _ = builder.with_writer(std::io::stderr).try_init();
}

fn main() {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..]).unwrap_or_default();
    if flags.version {
        println!("containerd-shim-husk-v2 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    init_logging(&flags);
    let config = containerd_shim::Config {
        // Our own tracing subscriber writes the log FIFO (above).
        no_setup_logger: true,
        // husk-vmm is our only child and tokio reaps it; the crate's
        // waitpid(-1) reaper would steal its exit status.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(containerd_shim::asynchronous::run::<shim::HuskShim>(
        RUNTIME_ID,
        Some(config),
    ));
}
