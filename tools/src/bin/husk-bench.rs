//! `husk-bench`: Husk's benchmark harness. Medians and p90 over repeated
//! runs, printed as a markdown table and written as JSON.
//!
//!   husk-bench initramfs --runs 20     boot to /init, gzip vs uncompressed initramfs
//!
//! Later issues add their measurements here as subcommands.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use husk_guest_image::{agent_initramfs, cmdline, install_dir};
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
        #[arg(long, default_value_t = 20)]
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
}

/// Median and 90th percentile of a sample, in milliseconds.
fn stats(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (pick(0.5), pick(0.9))
}

/// Boots once under QEMU and returns milliseconds to the agent's marker.
fn boot_once(kernel: &PathBuf, initrd: &PathBuf, accel: &str) -> Result<f64> {
    let append = format!("{} husk.exit=reboot", cmdline::default_cmdline());
    let cpu = if accel == "kvm" { "host" } else { "max" };
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-machine",
            &format!("microvm,accel={accel}"),
            "-device",
            "i8042",
        ])
        .args(["-cpu", cpu, "-smp", "1", "-m", "256M", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Initramfs {
            runs,
            agent,
            kernel,
            accel,
        } => initramfs(runs, agent, kernel, &accel)?,
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
    fn median_and_p90() {
        let mut s: Vec<f64> = (1..=10).map(f64::from).collect();
        s.reverse();
        assert_eq!(stats(&mut s), (6.0, 9.0));
        assert_eq!(stats(&mut [5.0]), (5.0, 5.0));
    }
}
