//! husk-agent's entry point: the init sequence, then the ttrpc server.
//!
//! Kernel command line parameters it reads:
//! - `husk.exit=poweroff|reboot`: end the VM right after the ready report
//!   (boot tests and boot benchmarks),
//! - `husk.log=FILTER`: the log filter (tracing's env-filter syntax).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use husk_agent::{init, logging, reaper::Reaper, service, shutdown, READY_MARKER};
use husk_agent_api::{agent_ttrpc, ttrpc, AGENT_VSOCK_PORT};
use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::sync;

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 && std::env::var_os(init::SWITCHED_ENV).is_none() {
        // Only returns if the switch failed: go on from the initramfs
        // (containers then fall back to MS_MOVE + chroot).
        let e = init::switch_root_to_tmpfs();
        let _ = writeln!(
            std::io::stderr(),
            "husk-agent: staying on the initramfs: {e}"
        );
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if pid1 {
        if let Err(e) = init::mount_kernel_filesystems(Path::new("/")) {
            // Say it on the console; the API may still work without, say, devpts.
            let _ = writeln!(std::io::stderr(), "husk-agent: {e}");
        }
    }
    // /proc is mounted now: read the command line again if it was not.
    let cmdline = if cmdline.is_empty() {
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    } else {
        cmdline
    };
    let filter = init::cmdline_value(&cmdline, "husk.log").unwrap_or_else(|| "info".into());
    logging::init(&filter);

    let d = service::guest_details();
    println!(
        "{READY_MARKER} (agent {}, kernel {}, cpus {}, memory {} KiB)",
        d.agent_version, d.kernel_version, d.online_cpus, d.memory_total_kib
    );
    let _ = std::io::stdout().flush();

    match init::cmdline_value(&cmdline, "husk.exit").as_deref() {
        Some("poweroff") => {
            let e = shutdown::power_off();
            eprintln!("husk-agent: power off failed: {e}");
        }
        Some("reboot") => {
            sync();
            let _ = reboot(RebootMode::RB_AUTOBOOT);
        }
        _ => {}
    }

    let result = serve(pid1);
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    if pid1 {
        // An init must never exit: the kernel would panic. End the VM instead.
        let e = shutdown::power_off();
        eprintln!("husk-agent: power off failed: {e}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if result.is_err() {
        std::process::exit(1);
    }
}

fn serve(pid1: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let reaper = Reaper::new();
        tokio::spawn(reaper.clone().run());
        logging::start_vsock_forwarding();

        if pid1 {
            // Before the API serves: a template is snapshotted once it does.
            husk_agent::warm::warm_up().await;
        }
        let hub = husk_agent::container::stdio::Hub::default();
        tokio::spawn({
            let hub = hub.clone();
            async move {
                if let Err(e) = hub.serve().await {
                    tracing::error!("stdio streams: {e}");
                }
            }
        });
        let containers = husk_agent::container::manager::Manager::new(reaper.clone(), hub);
        let (shutdown_tx, mut shutdown_rx) = tokio::sync::mpsc::channel(1);
        let service = service::AgentService::new(shutdown_tx, containers.clone());
        let addr = format!("vsock://-1:{AGENT_VSOCK_PORT}");
        let mut server = ttrpc::r#async::Server::new()
            .bind(&addr)
            .with_context(|| format!("binding {addr}"))?
            .register_service(agent_ttrpc::create_agent(service));
        server.start().await.context("starting the ttrpc server")?;
        tracing::info!(port = AGENT_VSOCK_PORT, "agent API serving on vsock");

        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let (grace, done) = tokio::select! {
            req = shutdown_rx.recv() => match req {
                Some(r) => (r.grace, Some(r.done)),
                None => (Duration::from_secs(5), None),
            },
            _ = sigterm.recv() => (Duration::from_secs(5), None),
            _ = sigint.recv() => (Duration::from_secs(5), None),
        };
        tracing::info!(?grace, "shutting down");
        let t0 = std::time::Instant::now();
        containers.kill_unstarted();
        if pid1 {
            let r = reaper.clone();
            tokio::task::spawn_blocking(move || shutdown::stop_all_processes(&r, grace)).await?;
        }
        let stopped = t0.elapsed();
        tokio::task::spawn_blocking(sync).await?;
        tracing::debug!(
            stop_us = stopped.as_micros() as u64,
            sync_us = t0.elapsed().saturating_sub(stopped).as_micros() as u64,
            "processes stopped and synced"
        );
        // Nothing is left to lose: the Shutdown answer may go, and the host
        // may end the VM before the power-off below gets there.
        if let Some(done) = done {
            let _ = done.send(());
        }
        // Lets in-flight answers (the Shutdown reply among them) go out.
        // Bounded tightly: shutdown() also waits for idle clients (a shim
        // keeps its connection) to hang up, which they never do first.
        let _ = tokio::time::timeout(Duration::from_millis(300), server.shutdown()).await;
        Ok(())
    })
}
