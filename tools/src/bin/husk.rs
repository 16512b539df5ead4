//! `husk`: Husk on one machine, without containerd.
//!
//!   husk vm boot [--cpus N] [--memory MIB] [--keep]   boot a VM, show what the guest sees, shut it down
//!   husk vm stop ID                                   stop a VM left running with --keep

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use husk_tools::vm::{self, Vm, VmSpec};

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
                .unwrap_or_else(|_| "warn,guest=info".into()),
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
            // Its VMM exits on its own; the next husk call removes the directory.
            let pid: i32 = std::fs::read_to_string(dir.join("pid"))?
                .lines()
                .next()
                .unwrap_or("0")
                .parse()?;
            for _ in 0..200 {
                if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
                    let _ = std::fs::remove_dir_all(&dir);
                    println!("stopped {id}");
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::bail!("VM {id} (husk-vmm {pid}) did not stop within 10 s");
        }
    }
    Ok(())
}
