//! husk-cri: a CRI client that stands in for the kubelet in the tests
//! (crictl and the kubelet are not packaged for Debian 12). It speaks CRI
//! v1 to containerd's socket through the k8s-cri bindings, one call per
//! subcommand, the way crictl's verbs do:
//!
//! ```text
//! husk-cri runp --name web [--handler husk] [--sysctl K=V]   -> pod id
//! husk-cri ip POD                                            -> the pod's IP
//! husk-cri create POD --name app --image IMG [--log-path P] -- CMD...  -> container id
//! husk-cri start|stop|rm ID     husk-cri stopp|rmp POD
//! husk-cri exec [--timeout S] ID -- CMD...   (its stdout, stderr and exit code)
//! husk-cri stats ID             husk-cri update ID --memory BYTES [--cpu-quota Q --cpu-period P]
//! husk-cri pods
//! ```
//!
//! A pod's config is kept in `$HUSK_CRI_STATE` (default `/tmp/husk-cri`),
//! because CreateContainer takes the pod's config again, as the kubelet
//! keeps it.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatsRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, LinuxContainerConfig, LinuxContainerResources,
    LinuxPodSandboxConfig, ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
    UpdateContainerResourcesRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Parser)]
#[command(about = "A CRI client standing in for the kubelet in Husk's tests")]
struct Cli {
    /// containerd's socket.
    #[arg(long, default_value = "/tmp/ctrd/c.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// RunPodSandbox; prints the pod's id.
    Runp {
        #[arg(long)]
        name: String,
        /// The runtime handler (containerd's runtimes.<name>).
        #[arg(long, default_value = "husk")]
        handler: String,
        #[arg(long = "sysctl")]
        sysctls: Vec<String>,
        /// The pod's log directory (containers log below it).
        #[arg(long)]
        log_dir: Option<String>,
    },
    /// The pod's IP, as CRI reports it.
    Ip {
        pod: String,
    },
    /// CreateContainer in POD; prints the container's id.
    Create {
        pod: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        image: String,
        /// Relative to the pod's log directory.
        #[arg(long)]
        log_path: Option<String>,
        #[arg(last = true)]
        command: Vec<String>,
    },
    Start {
        id: String,
    },
    /// ExecSync: the command's stdout and stderr, and its exit code as ours.
    Exec {
        #[arg(long, default_value_t = 60)]
        timeout: i64,
        id: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// ContainerStats: CPU and memory.
    Stats {
        id: String,
    },
    /// UpdateContainerResources.
    Update {
        id: String,
        #[arg(long)]
        memory: Option<i64>,
        #[arg(long)]
        cpu_quota: Option<i64>,
        #[arg(long)]
        cpu_period: Option<i64>,
    },
    Stop {
        #[arg(long, default_value_t = 10)]
        timeout: i64,
        id: String,
    },
    Rm {
        id: String,
    },
    Stopp {
        pod: String,
    },
    Rmp {
        pod: String,
    },
    /// Every pod: id, name, state.
    Pods,
}

async fn connect(socket: PathBuf) -> Result<RuntimeServiceClient<Channel>> {
    // The URI is a placeholder: the connector dials the socket.
    let channel = Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .context("connecting to containerd's CRI socket")?;
    Ok(RuntimeServiceClient::new(channel))
}

fn state_dir() -> PathBuf {
    std::env::var_os("HUSK_CRI_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/husk-cri"))
}

fn pod_config(pod: &str) -> Result<PodSandboxConfig> {
    let p = state_dir().join(format!("{pod}.json"));
    let raw = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_slice(&raw)?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut c = connect(cli.socket).await?;
    match cli.cmd {
        Cmd::Runp {
            name,
            handler,
            sysctls,
            log_dir,
        } => {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
            let mut sys = std::collections::HashMap::new();
            for s in sysctls {
                let (k, v) = s.split_once('=').context("--sysctl KEY=VALUE")?;
                sys.insert(k.to_string(), v.to_string());
            }
            let config = PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: name.clone(),
                    uid: format!("{name}-{nanos}"),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                hostname: name.clone(),
                log_directory: log_dir.unwrap_or_default(),
                linux: Some(LinuxPodSandboxConfig {
                    sysctls: sys,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let id = c
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: handler,
                })
                .await?
                .into_inner()
                .pod_sandbox_id;
            std::fs::create_dir_all(state_dir())?;
            std::fs::write(
                state_dir().join(format!("{id}.json")),
                serde_json::to_vec(&config)?,
            )?;
            println!("{id}");
        }
        Cmd::Ip { pod } => {
            let st = c
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: pod,
                    verbose: false,
                })
                .await?
                .into_inner();
            let ip = st
                .status
                .and_then(|s| s.network)
                .map(|n| n.ip)
                .unwrap_or_default();
            if ip.is_empty() {
                bail!("the pod has no IP");
            }
            println!("{ip}");
        }
        Cmd::Create {
            pod,
            name,
            image,
            log_path,
            command,
        } => {
            let sandbox = pod_config(&pod)?;
            let config = ContainerConfig {
                metadata: Some(ContainerMetadata { name, attempt: 0 }),
                image: Some(ImageSpec {
                    image,
                    ..Default::default()
                }),
                command,
                log_path: log_path.unwrap_or_default(),
                linux: Some(LinuxContainerConfig::default()),
                ..Default::default()
            };
            let id = c
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod,
                    config: Some(config),
                    sandbox_config: Some(sandbox),
                })
                .await?
                .into_inner()
                .container_id;
            println!("{id}");
        }
        Cmd::Start { id } => {
            c.start_container(StartContainerRequest { container_id: id })
                .await?;
        }
        Cmd::Exec {
            timeout,
            id,
            command,
        } => {
            let r = c
                .exec_sync(ExecSyncRequest {
                    container_id: id,
                    cmd: command,
                    timeout,
                })
                .await?
                .into_inner();
            use std::io::Write;
            std::io::stdout().write_all(&r.stdout)?;
            std::io::stderr().write_all(&r.stderr)?;
            std::io::stdout().flush()?;
            std::process::exit(r.exit_code);
        }
        Cmd::Stats { id } => {
            let s = c
                .container_stats(ContainerStatsRequest { container_id: id })
                .await?
                .into_inner()
                .stats
                .context("no stats in the answer")?;
            let mem = s.memory.unwrap_or_default();
            let cpu = s.cpu.unwrap_or_default();
            println!(
                "memory_working_set_bytes={} memory_usage_bytes={} cpu_usage_core_nano_seconds={}",
                mem.working_set_bytes.map(|v| v.value).unwrap_or(0),
                mem.usage_bytes.map(|v| v.value).unwrap_or(0),
                cpu.usage_core_nano_seconds.map(|v| v.value).unwrap_or(0),
            );
        }
        Cmd::Update {
            id,
            memory,
            cpu_quota,
            cpu_period,
        } => {
            c.update_container_resources(UpdateContainerResourcesRequest {
                container_id: id,
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: memory.unwrap_or(0),
                    cpu_quota: cpu_quota.unwrap_or(0),
                    cpu_period: cpu_period.unwrap_or(0),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        }
        Cmd::Stop { timeout, id } => {
            c.stop_container(StopContainerRequest {
                container_id: id,
                timeout,
            })
            .await?;
        }
        Cmd::Rm { id } => {
            c.remove_container(RemoveContainerRequest { container_id: id })
                .await?;
        }
        Cmd::Stopp { pod } => {
            c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await?;
        }
        Cmd::Rmp { pod } => {
            c.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await?;
            let _ = std::fs::remove_file(state_dir().join(format!("{pod}.json")));
        }
        Cmd::Pods => {
            let pods = c
                .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await?
                .into_inner()
                .items;
            for p in pods {
                let name = p.metadata.map(|m| m.name).unwrap_or_default();
                println!("{} {} {}", p.id, name, p.state);
            }
        }
    }
    Ok(())
}
