//! `husk-guest-image`: build the guest kernel (cached), the initramfs, and
//! print the default command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use husk_guest_image::{agent_initramfs, cmdline, kernel};

#[derive(Parser)]
#[command(about = "Build the Husk guest image")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the guest kernel, or find it in the cache; prints the entry's directory.
    Kernel {
        /// The config fragment merged over tinyconfig.
        #[arg(long)]
        fragment: Option<PathBuf>,
        /// Cache root (default: $HUSK_CACHE_DIR or /var/cache/husk).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Also copy vmlinux, bzImage and config into this directory.
        #[arg(long)]
        install: Option<PathBuf>,
    },
    /// Write an initramfs with AGENT as /init.
    Initramfs {
        #[arg(long)]
        agent: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// gzip the archive (measured slower to boot; see docs/guest-image.md).
        #[arg(long)]
        gzip: bool,
    },
    /// Print the default guest kernel command line, with the reason for each part.
    Cmdline {
        #[arg(long)]
        explain: bool,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Kernel {
            fragment,
            cache,
            install,
        } => {
            let fragment = fragment.unwrap_or_else(kernel::default_fragment);
            let cache = cache.unwrap_or_else(kernel::default_cache_root);
            let spec = kernel::KernelSpec::detect(&fragment)?;
            let entry = kernel::ensure(&spec, &cache)?;
            if let Some(dir) = install {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                for f in kernel::ARTIFACTS {
                    // Copy to a temporary name and rename, so readers never see half a kernel.
                    let tmp = dir.join(format!(".{f}.tmp"));
                    std::fs::copy(entry.path(f), &tmp)?;
                    std::fs::rename(&tmp, dir.join(f))?;
                }
            }
            println!("{}", entry.dir.display());
        }
        Cmd::Initramfs { agent, out, gzip } => {
            let bytes = agent_initramfs(&agent)?.to_bytes(gzip)?;
            let tmp = out.with_extension("tmp");
            std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &out)?;
            eprintln!("wrote {} ({} bytes)", out.display(), bytes.len());
        }
        Cmd::Cmdline { explain } => {
            if explain {
                for (p, why) in cmdline::DEFAULTS {
                    println!("{p:<16} {why}");
                }
            } else {
                println!("{}", cmdline::default_cmdline());
            }
        }
    }
    Ok(())
}
