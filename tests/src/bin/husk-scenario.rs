//! Scenarios that must run where KVM boots a stock guest: integration tests
//! start this inside the test host (`tests/tests/agent.rs`). Each scenario
//! boots real VMs with husk-vmm, the guest kernel and husk-agent, asserts,
//! and exits non-zero with a message on the first failure.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use husk_agent_client::{Client, ClientError, ConnectOptions};
use husk_tools::vm::{runtime_root, Vm, VmSpec};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

#[derive(Clone, Copy, ValueEnum)]
enum Scenario {
    /// Check x100 in a row and x16 at once, GetGuestDetails against the
    /// configuration, Shutdown ends husk-vmm with 0, nothing left behind.
    Api,
    /// A connection cut mid-call is a clear error; the next call reconnects.
    Reconnect,
    /// An agent that never comes up is a boot-timeout error quoting the console.
    BootTimeout,
}

#[derive(Parser)]
struct Args {
    scenario: Scenario,
    /// Guest kernel and initramfs directory (vmlinux, initramfs.cpio).
    #[arg(long)]
    guest: Option<PathBuf>,
}

fn spec(guest: &Option<PathBuf>, vcpus: u32, memory_mib: u32) -> VmSpec {
    let mut s = VmSpec {
        vcpus,
        memory_mib,
        ..VmSpec::default()
    };
    if let Some(g) = guest {
        s.kernel = g.join("vmlinux");
        s.initramfs = g.join("initramfs.cpio");
    }
    s
}

fn runtime_entries() -> usize {
    std::fs::read_dir(runtime_root())
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn api(guest: &Option<PathBuf>) -> Result<()> {
    for (vcpus, mem) in [(1u32, 128u32), (2, 512)] {
        let vm = Vm::boot(&spec(guest, vcpus, mem)).await?;
        for i in 0..100 {
            ensure!(
                vm.client
                    .check()
                    .await
                    .with_context(|| format!("check #{i}"))?,
                "check #{i}: not serving"
            );
        }
        let client = vm.client.clone();
        let ok = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (c, ok) = (client.clone(), ok.clone());
            tasks.push(tokio::spawn(async move {
                if c.check().await.unwrap_or(false) {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        ensure!(
            ok.load(Ordering::SeqCst) == 16,
            "{} of 16 concurrent checks answered",
            ok.load(Ordering::SeqCst)
        );
        let d = vm.client.guest_details().await?;
        ensure!(
            d.online_cpu_count == vcpus,
            "guest sees {} CPUs ({}), configured {vcpus}",
            d.online_cpu_count,
            d.online_cpus
        );
        // The kernel keeps some memory for itself: expect 80..=100 % of it.
        let kib = u64::from(mem) * 1024;
        ensure!(
            d.memory_total_kib <= kib && d.memory_total_kib >= kib * 8 / 10,
            "guest sees {} KiB, configured {kib} KiB",
            d.memory_total_kib
        );
        ensure!(
            d.agent_version == env!("CARGO_PKG_VERSION"),
            "agent version {}",
            d.agent_version
        );
        let dir = vm.dir.clone();
        let status = vm.shutdown(Duration::from_secs(30)).await?;
        ensure!(
            status.success(),
            "husk-vmm ended with {status} after Shutdown"
        );
        ensure!(!dir.exists(), "{} was left behind", dir.display());
        println!("api: {vcpus} vCPU / {mem} MiB: 100 checks, 16 concurrent, details, shutdown -> {status}");
    }
    ensure!(runtime_entries() == 0, "runtime entries left behind");
    Ok(())
}

/// A proxy in front of the VM's vsock socket. Its first connection passes
/// the handshake, forwards the request, and closes as soon as the answer
/// starts: a cut mid-call. Later connections pass everything.
async fn cutting_proxy(listen: UnixListener, target: PathBuf, cut_done: Arc<AtomicUsize>) {
    let mut n = 0;
    while let Ok((client, _)) = listen.accept().await {
        n += 1;
        let target = target.clone();
        let cut_done = cut_done.clone();
        let first = n == 1;
        tokio::spawn(async move {
            let Ok(vm) = UnixStream::connect(&target).await else {
                return;
            };
            let (cr, mut cw) = client.into_split();
            let (vr, mut vw) = vm.into_split();
            let mut cr = cr;
            let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut vw).await });
            let mut vr = tokio::io::BufReader::new(vr);
            // The handshake answer passes whole.
            let mut ok = String::new();
            if vr.read_line(&mut ok).await.is_err() || cw.write_all(ok.as_bytes()).await.is_err() {
                return;
            }
            if first {
                let mut b = [0u8; 1];
                let _ = vr.read(&mut b).await;
                // The answer has begun: cut both ways.
                up.abort();
                cut_done.fetch_add(1, Ordering::SeqCst);
                return;
            }
            let _ = tokio::io::copy(&mut vr, &mut cw).await;
        });
    }
}

async fn reconnect(guest: &Option<PathBuf>) -> Result<()> {
    let vm = Vm::boot(&spec(guest, 1, 128)).await?;
    let proxy = vm.dir.join("proxy.sock");
    let cut = Arc::new(AtomicUsize::new(0));
    tokio::spawn(cutting_proxy(
        UnixListener::bind(&proxy)?,
        Vm::vsock_socket(&vm.dir),
        cut.clone(),
    ));
    let mut opts = ConnectOptions::new(&proxy);
    opts.boot_timeout = Duration::from_secs(10);
    // connect() itself checks: that first call is the one cut. It retries.
    let client = Client::connect(opts)
        .await
        .context("connecting through the proxy")?;
    ensure!(cut.load(Ordering::SeqCst) == 1, "the proxy cut no call");
    let e = client.guest_details().await;
    ensure!(e.is_ok(), "after a reconnect: {e:?}");
    // Now cut a call that is under way on an established connection.
    drop(client);
    let cut2 = Arc::new(AtomicUsize::new(0));
    let proxy2 = vm.dir.join("proxy2.sock");
    tokio::spawn(cutting_proxy(
        UnixListener::bind(&proxy2)?,
        Vm::vsock_socket(&vm.dir),
        cut2.clone(),
    ));
    let raw = Client::lazy(ConnectOptions::new(&proxy2));
    match raw.check().await {
        Err(ClientError::Transport { call, .. }) => {
            println!("reconnect: the cut call failed clearly ({call})");
        }
        other => bail!("a cut call gave {other:?}, not a transport error"),
    }
    ensure!(
        raw.check().await?,
        "the call after the cut did not reconnect"
    );
    let status = vm.shutdown(Duration::from_secs(30)).await?;
    ensure!(status.success(), "husk-vmm ended with {status}");
    println!("reconnect: cut mid-call -> transport error; next call reconnected");
    Ok(())
}

async fn boot_timeout(guest: &Option<PathBuf>) -> Result<()> {
    let mut s = spec(guest, 1, 128);
    // No such init: the kernel panics and, with panic=0, waits forever.
    s.extra_cmdline = Some("rdinit=/no-such-init panic=0".into());
    s.boot_timeout = Duration::from_secs(20);
    let before = runtime_entries();
    let started = Instant::now();
    let err = match Vm::boot(&s).await {
        Ok(_) => bail!("a VM without an agent came up"),
        Err(e) => format!("{e:#}"),
    };
    let took = started.elapsed();
    ensure!(
        took < Duration::from_secs(40),
        "boot timeout of 20 s took {took:?}"
    );
    ensure!(
        err.contains("boot timeout"),
        "not a boot-timeout error: {err}"
    );
    ensure!(
        err.contains("No working init") || err.contains("Kernel panic"),
        "the error does not quote the console: {err}"
    );
    ensure!(
        runtime_entries() == before,
        "the failed VM left its runtime directory"
    );
    let vmm_left = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "husk-vmm")
        })
        .count();
    ensure!(vmm_left == 0, "{vmm_left} husk-vmm processes left running");
    println!(
        "boot-timeout: after {took:?}: {}",
        err.lines().next().unwrap_or("")
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match args.scenario {
            Scenario::Api => api(&args.guest).await,
            Scenario::Reconnect => reconnect(&args.guest).await,
            Scenario::BootTimeout => boot_timeout(&args.guest).await,
        }
    })?;
    Ok(())
}
