//! `husk`: Husk on one machine, without containerd.
//!
//!   husk vm boot [--cpus N] [--memory MIB] [--keep]   boot a VM, show what the guest sees, shut it down
//!   husk vm stop ID                                   stop a VM left running with --keep
//!   husk run --rootfs DIR [-e K=V] [-w DIR] [-u UID[:GID]] [--read-only] -- CMD ARGS
//!                                                     run CMD as a container in a new VM;
//!                                                     exits with its exit code

use std::path::PathBuf;
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
    /// Run a command as a container in its own micro-VM; exit with its code.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The container's root filesystem (a directory).
    #[arg(long)]
    rootfs: PathBuf,
    /// Environment variables, NAME=value.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory in the container.
    #[arg(short = 'w', long = "workdir", default_value = "/")]
    workdir: String,
    /// UID[:GID] to run as.
    #[arg(short = 'u', long = "user", default_value = "0:0")]
    user: String,
    /// Mount the rootfs read-only.
    #[arg(long)]
    read_only: bool,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Seconds to wait for the VM's agent.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

/// Where the agent mounts the sandbox share in the guest.
const GUEST_SHARE: &str = "/run/husk/share";

fn oci_spec(a: &RunArgs, hostname: &str) -> Result<serde_json::Value> {
    let (uid, gid) = match a.user.split_once(':') {
        Some((u, g)) => (u.parse::<u32>()?, g.parse::<u32>()?),
        None => (a.user.parse::<u32>()?, a.user.parse::<u32>()?),
    };
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    for e in &a.env {
        if !e.contains('=') {
            anyhow::bail!("-e {e:?}: expected NAME=value");
        }
        env.push(e.clone());
    }
    Ok(serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": uid, "gid": gid}, "args": a.command, "env": env, "cwd": a.workdir},
        "root": {"path": "rootfs", "readonly": a.read_only},
        "hostname": hostname,
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]}
    }))
}

/// Boots a VM for one container, runs it, relays its output, returns its code.
async fn run(a: RunArgs) -> Result<i32> {
    let spec = VmSpec {
        vcpus: a.cpus,
        memory_mib: a.memory,
        boot_timeout: Duration::from_secs(a.boot_timeout),
        rootfs: Some(
            a.rootfs
                .canonicalize()
                .with_context(|| format!("rootfs {}", a.rootfs.display()))?,
        ),
        ..VmSpec::default()
    };
    let vm = Vm::boot(&spec).await?;
    let result = run_in(&vm, &a).await;
    // Whatever happened, the VM goes.
    let stopped = vm.shutdown(Duration::from_secs(20)).await;
    let code = result?;
    stopped?;
    Ok(code)
}

async fn run_in(vm: &Vm, a: &RunArgs) -> Result<i32> {
    use husk_agent_client::agent::CreateSandboxRequest;
    let hostname = format!("husk-{}", &vm.id[..8.min(vm.id.len())]);
    vm.client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: vm.id.clone(),
            hostname: hostname.clone(),
            shared_fs_tag: "husk-share".into(),
            shared_mount_point: GUEST_SHARE.into(),
            ..Default::default()
        })
        .await?;
    let id = "main";
    vm.client
        .create_container(id, serde_json::to_vec(&oci_spec(a, &hostname)?)?, false)
        .await?;
    let mut out = vm.client.attach(id, "", "stdout").await?;
    let mut err = vm.client.attach(id, "", "stderr").await?;
    let relay_out =
        tokio::spawn(async move { tokio::io::copy(&mut out, &mut tokio::io::stdout()).await });
    let relay_err =
        tokio::spawn(async move { tokio::io::copy(&mut err, &mut tokio::io::stderr()).await });
    vm.client.start_container(id).await?;
    // Ctrl-C and SIGTERM go to the container's process.
    let client = vm.client.clone();
    let forward = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        loop {
            let sig = tokio::select! {
                _ = int.recv() => libc::SIGINT,
                _ = term.recv() => libc::SIGTERM,
            };
            let _ = client.signal_process("main", "", sig).await;
        }
    });
    let code = vm.client.wait_process(id, "").await?;
    forward.abort();
    // The agent answers Wait only after the output is out; drain our side.
    let _ = relay_out.await;
    let _ = relay_err.await;
    vm.client.remove_container(id).await?;
    Ok(code)
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
        Cmd::Run(a) => {
            let code = run(a).await?;
            std::process::exit(code);
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
