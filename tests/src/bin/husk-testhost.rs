//! `husk-testhost`: run a command where a stock guest kernel can boot under
//! KVM: right here on hardware KVM, else in the nested L2 test host.
//!
//!   husk-testhost detect             how tests will run here, and why
//!   husk-testhost prepare            fetch the L2 kernel and modules (setup)
//!   husk-testhost run [-t S] -- CMD  run CMD (a shell command line) there

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use husk_tests::testhost::{self, detect, Mode, Spec};

#[derive(Parser)]
#[command(about = "Run commands in Husk's KVM test host")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Detect,
    Prepare,
    Run {
        /// Seconds before the VM is killed and its console shown.
        #[arg(short, long, default_value_t = 300)]
        timeout: u64,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        #[arg(long, default_value_t = 3072)]
        memory_mib: u32,
        /// The command; joined with spaces and run by /bin/sh.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Detect => {
            let facts = detect::Facts::read();
            println!(
                "/dev/kvm: {}",
                if facts.dev_kvm { "present" } else { "absent" }
            );
            println!("cpu flag: {}", facts.virt_flag.unwrap_or("none"));
            println!(
                "kvm_pvm:  {}",
                if facts.kvm_pvm { "loaded" } else { "absent" }
            );
            match detect::mode() {
                Mode::Direct => println!("mode: direct (hardware KVM)"),
                Mode::Nested { reason } => println!("mode: nested test host ({reason})"),
            }
        }
        Cmd::Prepare => {
            let a = testhost::assets::ensure(&husk_guest_image::kernel::default_cache_root())?;
            println!("{}", a.entry.dir.display());
        }
        Cmd::Run {
            timeout,
            cpus,
            memory_mib,
            command,
        } => {
            let mut spec = Spec::new(format!(
                "cd '{}' || exit 1\n{}\n",
                std::env::current_dir()?.display(),
                command.join(" ")
            ))
            .timeout(Duration::from_secs(timeout));
            spec.cpus = cpus;
            spec.memory_mib = memory_mib;
            let o = testhost::run(&spec)?;
            eprintln!(
                "[testhost] exit {} after {:.1} s ({:?})",
                o.status,
                o.elapsed.as_secs_f64(),
                o.mode
            );
            std::process::exit(o.status);
        }
    }
    Ok(())
}
