//! `husk-bench vmm-restore`: husk-vmm's restore from a snapshot against its
//! cold boot, with the real agent initramfs, to the agent's first answered
//! Check; then host memory (PSS, guest RAM included) of idle VMs restored
//! from one snapshot against as many cold-booted ones (issue #14).
//!
//! One VM is booted and snapshotted (`--snapshot-to`, `{"op":"snapshot"}`)
//! once its agent answers; then cold boots and restores alternate, each
//! stopped through its control socket before the next starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use husk_agent_client::{Client, ConnectOptions};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::stats;

pub struct Setup {
    pub husk_vmm: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub runs: usize,
    pub cpus: u32,
    pub memory: u32,
    pub idle: usize,
}

struct Vm {
    child: tokio::process::Child,
    api: PathBuf,
    vsock: PathBuf,
}

fn launch(s: &Setup, dir: &Path, name: &str, extra: &[&std::ffi::OsStr]) -> Result<Vm> {
    let api = dir.join(format!("{name}.api"));
    let vsock = dir.join(format!("{name}.vsock"));
    let child = tokio::process::Command::new(&s.husk_vmm)
        .arg("--kernel")
        .arg(&s.kernel)
        .arg("--initramfs")
        .arg(&s.initramfs)
        .arg("--vcpus")
        .arg(s.cpus.to_string())
        .arg("--memory-mib")
        .arg(s.memory.to_string())
        .arg("--api-socket")
        .arg(&api)
        .arg("--vsock-socket")
        .arg(&vsock)
        .arg("--serial-out")
        .arg(dir.join(format!("{name}.console")))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", s.husk_vmm.display()))?;
    Ok(Vm { child, api, vsock })
}

/// Waits until the agent answers a Check; the time from `start`.
async fn agent_ready(vm: &Vm, start: Instant) -> Result<Duration> {
    // The client backs off up to 250 ms between attempts while the socket
    // is missing; a restore is faster than that, so wait for the socket here.
    while !vm.vsock.exists() {
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "no vsock socket"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut opts = ConnectOptions::new(&vm.vsock);
    opts.boot_timeout = Duration::from_secs(120);
    Client::connect(opts).await.context("the agent")?;
    Ok(start.elapsed())
}

async fn control(api: &Path, request: &str) -> Result<serde_json::Value> {
    let s = UnixStream::connect(api).await?;
    let (r, mut w) = s.into_split();
    w.write_all(format!("{request}\n").as_bytes()).await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(120),
        tokio::io::BufReader::new(r).read_line(&mut line),
    )
    .await
    .context("no answer")??;
    Ok(serde_json::from_str(&line)?)
}

async fn stop(mut vm: Vm) -> Result<()> {
    control(&vm.api, r#"{"op":"shutdown"}"#).await?;
    let status = tokio::time::timeout(Duration::from_secs(30), vm.child.wait()).await??;
    ensure!(status.success(), "husk-vmm ended with {status}");
    Ok(())
}

/// The process's PSS in KiB, everything included (guest RAM too).
fn pss_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("no Pss in smaps_rollup")
}

pub async fn run(s: &Setup) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let snap = dir.path().join("snapshot");
    std::fs::create_dir(&snap)?;

    let start = Instant::now();
    let template = launch(
        s,
        dir.path(),
        "template",
        &["--snapshot-to".as_ref(), snap.as_os_str()],
    )?;
    let boot = agent_ready(&template, start).await?;
    let asked = Instant::now();
    let answer = control(&template.api, r#"{"op":"snapshot"}"#).await?;
    ensure!(answer["ok"] == true, "snapshot: {answer}");
    let took = asked.elapsed();
    let mut t = template;
    ensure!(
        t.child.wait().await?.success(),
        "the template's husk-vmm failed"
    );
    eprintln!("template: agent ready in {boot:?}, snapshot written in {took:?}");

    let restore_args = ["--restore-from".as_ref(), snap.as_os_str()];
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for run in 0..=s.runs {
        let start = Instant::now();
        let vm = launch(s, dir.path(), "cold", &[])?;
        let c = agent_ready(&vm, start).await?;
        stop(vm).await?;
        let start = Instant::now();
        let vm = launch(s, dir.path(), "warm", &restore_args)?;
        let w = agent_ready(&vm, start).await?;
        stop(vm).await?;
        // The first pair warms the page cache and is not counted.
        if run > 0 {
            eprintln!("run {run}: cold boot {c:?}, restore {w:?}");
            cold.push(c.as_secs_f64() * 1e3);
            warm.push(w.as_secs_f64() * 1e3);
        }
    }
    let (c50, c90) = stats(&mut cold);
    let (w50, w90) = stats(&mut warm);

    // Idle VMs side by side: restored from the one snapshot, then cold.
    let mut pss = Vec::new();
    for (kind, extra) in [("restored", &restore_args[..]), ("cold", &[][..])] {
        let mut vms = Vec::new();
        for i in 0..s.idle {
            let vm = launch(s, dir.path(), &format!("{kind}-{i}"), extra)?;
            agent_ready(&vm, Instant::now()).await?;
            vms.push(vm);
        }
        // Let what the guests do right after start settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut total = 0;
        for vm in &vms {
            total += pss_kib(vm.child.id().context("no pid")?)?;
        }
        pss.push(total);
        for vm in vms {
            stop(vm).await?;
        }
    }
    if pss.len() != 2 {
        bail!("PSS not measured");
    }

    let n = s.runs;
    println!(
        "| husk-vmm start -> agent ready ({n} each, {} vCPU, {} MiB) | median | p90 |",
        s.cpus, s.memory
    );
    println!("|---|---:|---:|");
    println!("| cold boot | {c50:.0} ms | {c90:.0} ms |");
    println!("| restore from a snapshot | {w50:.0} ms | {w90:.0} ms |");
    println!("| cold / restore | {:.1}x | |", c50 / w50);
    println!(
        "| PSS of {} idle VMs, guest RAM included: restored / cold | {} MiB / {} MiB | |",
        s.idle,
        pss[0] >> 10,
        pss[1] >> 10
    );
    println!("snapshot written in {took:?} (template's agent ready in {boot:?})");
    Ok(json!({
        "benchmark": "vmm-restore", "runs": n, "vcpus": s.cpus, "memory_mib": s.memory,
        "cold_boot_ms": {"median": c50, "p90": c90},
        "restore_ms": {"median": w50, "p90": w90},
        "ratio": c50 / w50,
        "idle_vms": s.idle, "pss_kib_restored": pss[0], "pss_kib_cold": pss[1],
        "snapshot_ms": took.as_secs_f64() * 1e3,
    }))
}
