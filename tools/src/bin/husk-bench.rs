//! `husk-bench`: Husk's benchmark harness. Medians and p90 over repeated
//! runs, printed as a markdown table and written as JSON.
//!
//!   husk-bench initramfs --runs 20     boot to /init, gzip vs uncompressed initramfs
//!   husk-bench vmm-boot --runs 20      husk-vmm start -> guest /init -> agent ready; VMM RSS/PSS
//!   husk-bench vmm-restore --runs 20   restore from a snapshot vs cold boot -> agent ready; PSS
//!
//! Later issues add their measurements here as subcommands.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use husk_guest_image::{agent_initramfs, install_dir};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Husk benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Write the results as JSON here too.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time from VMM start to the agent's first console line, with an
    /// uncompressed and a gzip initramfs, booted alternately.
    Initramfs {
        #[arg(long, default_value_t = 20, value_parser = at_least_one)]
        runs: usize,
        /// The static husk-agent to put in the initramfs.
        #[arg(
            long,
            default_value = "target/x86_64-unknown-linux-musl/release/husk-agent"
        )]
        agent: PathBuf,
        /// Guest kernel (ELF vmlinux, PVH entry).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// QEMU accelerator: tcg here; kvm on hardware KVM or in the test host.
        #[arg(long, default_value = "tcg")]
        accel: String,
    },
    /// husk-vmm start to the agent's first console line (guest /init) and to
    /// its first answered Check (agent ready), and husk-vmm's own RSS and PSS
    /// (guest RAM excluded) once the agent is ready. Needs KVM that boots stock guests (run it in
    /// the test host here: `husk-testhost run -- ./target/debug/husk-bench vmm-boot`).
    VmmBoot {
        #[arg(long, default_value_t = 20, value_parser = at_least_one)]
        runs: usize,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// A Firecracker binary: boot the same kernel and a minimal busybox
        /// initramfs under it and husk-vmm, alternated, and report the ratio
        /// (instead of the agent boot).
        #[arg(long)]
        firecracker: Option<PathBuf>,
        /// The husk-vmm for the comparison (default: the release build,
        /// else the one beside this program).
        #[arg(long, requires = "firecracker")]
        husk_vmm: Option<PathBuf>,
        /// The guest kernel for the comparison (default: the installed vmlinux).
        #[arg(long, requires = "firecracker")]
        kernel: Option<PathBuf>,
        /// The whole guest command line for both VMMs in the comparison.
        #[arg(long, default_value = compare::CMDLINE, requires = "firecracker")]
        cmdline: String,
        /// husk-vmm flags added in the comparison (say, "--vsock-socket /tmp/v.sock"
        /// to count a device's cost).
        #[arg(long, allow_hyphen_values = true, requires = "firecracker")]
        husk_args: Option<String>,
    },
    /// husk-vmm restored from a snapshot against its cold boot, alternated:
    /// start -> the agent's first answered Check (the real agent
    /// initramfs); then the PSS, guest RAM included, of `--idle` idle VMs
    /// restored from the one snapshot against as many cold ones. Needs KVM
    /// that boots stock guests (the test host here).
    VmmRestore {
        #[arg(long, default_value_t = 20, value_parser = at_least_one)]
        runs: usize,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[arg(long, default_value_t = 256)]
        memory: u32,
        #[arg(long, default_value_t = 10)]
        idle: usize,
        /// The husk-vmm (default: the release build, else the one beside this program).
        #[arg(long)]
        husk_vmm: Option<PathBuf>,
    },
}

#[path = "husk-bench/compare.rs"]
mod compare;
#[path = "husk-bench/restore.rs"]
mod restore;

/// A sample count: a median of nothing is no figure.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Median and 90th percentile of a sample, in milliseconds.
pub(crate) fn stats(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (pick(0.5), pick(0.9))
}

/// Boots once under QEMU and returns milliseconds to the agent's marker.
fn boot_once(kernel: &Path, initrd: &Path, accel: &str) -> Result<f64> {
    let started = Instant::now();
    let mut child =
        husk_guest_image::qemu::microvm_command(kernel, initrd, accel, 1, 256, "husk.exit=reboot")
            .stderr(Stdio::null())
            .spawn()
            .context("spawning qemu-system-x86_64")?;
    let out = child.stdout.take().context("qemu stdout")?;
    let mut at = None;
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        if line.contains("husk-agent: init reached") {
            at = Some(started.elapsed());
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    match at {
        Some(d) => Ok(d.as_secs_f64() * 1000.0),
        None => bail!("the guest never reached the agent"),
    }
}

fn initramfs(
    runs: usize,
    agent: PathBuf,
    kernel: Option<PathBuf>,
    accel: &str,
) -> Result<serde_json::Value> {
    let kernel = kernel.unwrap_or_else(|| install_dir().join("vmlinux"));
    let image = agent_initramfs(&agent).with_context(|| format!("agent {}", agent.display()))?;
    let dir = std::env::temp_dir().join(format!("husk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let variants = [("none", false), ("gzip", true)];
    let mut files = Vec::new();
    for (name, gz) in variants {
        let bytes = image.to_bytes(gz)?;
        let p = dir.join(format!("initramfs-{name}.cpio"));
        std::fs::write(&p, &bytes)?;
        files.push((name, p, bytes.len()));
    }
    let mut samples = vec![Vec::new(); files.len()];
    // Alternate the variants so that drift in machine load hits both alike.
    for _ in 0..runs {
        for (i, (_, p, _)) in files.iter().enumerate() {
            samples[i].push(boot_once(&kernel, p, accel)?);
        }
    }
    std::fs::remove_dir_all(&dir)?;
    println!("| initramfs | size (bytes) | boot to agent, median (ms) | p90 (ms) |");
    println!("|---|---:|---:|---:|");
    let mut rows = Vec::new();
    for ((name, _, size), s) in files.iter().zip(samples.iter_mut()) {
        let (median, p90) = stats(s);
        println!("| {name} | {size} | {median:.0} | {p90:.0} |");
        rows.push(json!({"compression": name, "bytes": size, "median_ms": median, "p90_ms": p90, "runs": runs}));
    }
    Ok(
        json!({"benchmark": "initramfs-compression", "accel": accel, "vmm": "qemu microvm", "results": rows}),
    )
}

/// RSS and PSS of a process in KiB, without its guest RAM: the mappings
/// named `husk-guest-ram` (an anonymous mapping's name, or the memfd's) are
/// what the guest uses, not what the VMM costs. Where the kernel cannot
/// name anonymous mappings (before 5.17, or without CONFIG_ANON_VMA_NAME,
/// as in the test host's Debian kernel), the guest RAM is the one mapping
/// exactly `guest_bytes` long (husk-vmm maps guests below 3 GiB in one).
fn overhead_kib(pid: i32, guest_bytes: u64) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut rss, mut pss, mut guest) = (0, 0, false);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("Rss:") if !guest => {
                rss += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            }
            Some("Pss:") if !guest => {
                pss += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            }
            // A mapping header: "start-end perms offset dev inode [path]".
            Some(range) if range.contains('-') && !range.ends_with(':') => {
                let len = range.split_once('-').and_then(|(a, b)| {
                    u64::from_str_radix(b, 16)
                        .ok()?
                        .checked_sub(u64::from_str_radix(a, 16).ok()?)
                });
                guest = line.contains("husk-guest-ram") || len == Some(guest_bytes);
            }
            _ => {}
        }
    }
    Ok((rss, pss))
}

async fn vmm_boot(runs: usize, cpus: u32, memory: u32) -> Result<serde_json::Value> {
    use husk_runtime::{HuskVmm, NoEvents, Sandbox, SandboxSpec, VmSpec};
    let (mut init_ms, mut ready_ms, mut rss, mut pss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let id = format!("bench-{}-{run}", std::process::id());
        let console = husk_runtime::layout::SandboxLayout::new(&id)?.console_log();
        let spec = SandboxSpec {
            vm: VmSpec {
                vcpus: cpus,
                memory_mib: memory,
                ..VmSpec::default()
            },
            hostname: None,
            forward_vmm_log: false,
            ..Default::default()
        };
        let started = Instant::now();
        // The console is watched while the VM boots: the agent's first line
        // is when the guest reached /init.
        let watch = tokio::spawn(async move {
            loop {
                if std::fs::read_to_string(&console)
                    .is_ok_and(|c| c.contains("husk-agent: init reached"))
                {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let vm = Sandbox::boot(&id, &spec, &HuskVmm, std::sync::Arc::new(NoEvents)).await?;
        let ready = started.elapsed();
        let init = tokio::time::timeout(Duration::from_secs(5), watch).await??;
        let (r, p) = overhead_kib(vm.vmm_pid() as i32, u64::from(memory) << 20)?;
        let status = vm.shutdown().await;
        if !status.success() {
            bail!("run {run}: husk-vmm ended with {status}");
        }
        init_ms.push(init.as_secs_f64() * 1000.0);
        ready_ms.push(ready.as_secs_f64() * 1000.0);
        rss.push(r as f64);
        pss.push(p as f64);
        eprintln!(
            "run {run}: init {:.0} ms, agent ready {:.0} ms, RSS {r} KiB, PSS {p} KiB",
            init_ms[run], ready_ms[run]
        );
    }
    let (i50, i90) = stats(&mut init_ms);
    let (r50, r90) = stats(&mut ready_ms);
    let (rss50, _) = stats(&mut rss);
    let (pss50, _) = stats(&mut pss);
    println!("| measure ({runs} boots, {cpus} vCPU, {memory} MiB) | median | p90 |");
    println!("|---|---:|---:|");
    println!("| husk-vmm start -> guest /init | {i50:.0} ms | {i90:.0} ms |");
    println!("| husk-vmm start -> agent ready | {r50:.0} ms | {r90:.0} ms |");
    println!("| husk-vmm RSS after boot, guest RAM excluded | {rss50:.0} KiB | |");
    println!("| husk-vmm PSS after boot, guest RAM excluded | {pss50:.0} KiB | |");
    Ok(json!({
        "benchmark": "vmm-boot", "runs": runs, "vcpus": cpus, "memory_mib": memory,
        "init_ms": {"median": i50, "p90": i90},
        "agent_ready_ms": {"median": r50, "p90": r90},
        "vmm_rss_kib_median": rss50, "vmm_pss_kib_median": pss50,
    }))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Initramfs {
            runs,
            agent,
            kernel,
            accel,
        } => initramfs(runs, agent, kernel, &accel)?,
        Cmd::VmmBoot {
            runs,
            cpus,
            memory,
            firecracker: Some(fc),
            husk_vmm,
            kernel,
            cmdline,
            husk_args,
        } => compare::run(&compare::Setup {
            firecracker: fc,
            husk_vmm: husk_vmm.unwrap_or_else(compare::default_husk_vmm),
            kernel: kernel.unwrap_or_else(|| install_dir().join("vmlinux")),
            cmdline,
            husk_args: husk_args
                .map(|a| a.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            runs,
            cpus,
            memory,
        })?,
        Cmd::VmmBoot {
            runs, cpus, memory, ..
        } => tokio::runtime::Runtime::new()?.block_on(vmm_boot(runs, cpus, memory))?,
        Cmd::VmmRestore {
            runs,
            cpus,
            memory,
            idle,
            husk_vmm,
        } => tokio::runtime::Runtime::new()?.block_on(restore::run(&restore::Setup {
            husk_vmm: husk_vmm.unwrap_or_else(compare::default_husk_vmm),
            kernel: install_dir().join("vmlinux"),
            initramfs: install_dir().join("initramfs.cpio"),
            runs,
            cpus,
            memory,
            idle,
        }))?,
    };
    if let Some(p) = cli.json {
        std::fs::write(&p, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_flags_need_firecracker_and_runs_need_a_sample() {
        assert!(Cli::try_parse_from(["husk-bench", "vmm-boot"]).is_ok());
        assert!(Cli::try_parse_from(["husk-bench", "vmm-boot", "--kernel", "/k"]).is_err());
        assert!(Cli::try_parse_from(["husk-bench", "vmm-boot", "--runs", "0"]).is_err());
        assert!(Cli::try_parse_from([
            "husk-bench",
            "vmm-boot",
            "--firecracker",
            "/fc",
            "--kernel",
            "/k",
            "--husk-args",
            "--vsock-socket /v",
        ])
        .is_ok());
    }

    #[test]
    fn median_and_p90() {
        let mut s: Vec<f64> = (1..=10).map(f64::from).collect();
        s.reverse();
        assert_eq!(stats(&mut s), (6.0, 9.0));
        assert_eq!(stats(&mut [5.0]), (5.0, 5.0));
    }
}
