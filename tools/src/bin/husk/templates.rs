//! `husk template`: the VM templates `husk run` and the shim resume
//! sandboxes from (husk_runtime::template), listed, built ahead of the
//! first run, and removed.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use husk_runtime::config::Config;
use husk_runtime::hypervisor::NetDevice;
use husk_runtime::network::{bridge, tap};
use husk_runtime::template::Templates;
use husk_runtime::{HuskVmm, VmSpec};

use super::images::{ago, human_size};

/// Builds (again) the template `husk run --cpus --memory --network` resumes.
pub async fn build(cfg: &Config, cpus: u32, memory_mib: u32, network: &str) -> Result<()> {
    let nics = match network {
        "bridge" => 1,
        "none" => 0,
        other => bail!("--network {other:?}: \"bridge\" or \"none\""),
    };
    // The shape's NICs: their number and MTU are the template's, the taps
    // only stand in (the build makes its own).
    let scratch = tap::scratch(nics).await.context("placeholder taps")?;
    let spec = VmSpec {
        vcpus: cpus,
        memory_mib,
        // `husk run` always shares the rootfs.
        share: true,
        nics: scratch
            .taps
            .iter()
            .map(|t| {
                Ok(NetDevice {
                    tap: Arc::new(t.try_clone()?),
                    mac: husk_runtime::template::template_mac(0),
                    mtu: bridge::MTU,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?,
        ..cfg.vm_spec(&Default::default())?
    };
    let started = std::time::Instant::now();
    let meta = Templates::default().rebuild(&spec, &HuskVmm).await?;
    println!(
        "{} ({} vCPU, {} MiB, network {network}) built in {} ms",
        &meta.key[..12],
        meta.vcpus,
        meta.memory_mib,
        started.elapsed().as_millis()
    );
    Ok(())
}

/// The templates, newest first.
pub fn ls(quiet: bool) -> Result<()> {
    let t = Templates::default();
    let list = t.list();
    if quiet {
        for (m, _) in &list {
            println!("{}", &m.key[..12]);
        }
        return Ok(());
    }
    println!(
        "{:<14}{:<7}{:<9}{:<7}{:<7}{:<10}{:<22}STATE",
        "TEMPLATE", "VCPUS", "MEMORY", "SHARE", "NICS", "SIZE", "CREATED"
    );
    for (m, stale) in &list {
        println!(
            "{:<14}{:<7}{:<9}{:<7}{:<7}{:<10}{:<22}{}",
            &m.key[..12],
            m.vcpus,
            format!("{}MiB", m.memory_mib),
            if m.share { "yes" } else { "no" },
            m.nics.len(),
            human_size(allocated(&t.dir(&m.key))),
            ago(Some(m.created as i64)),
            if *stale {
                "stale (its husk-vmm, kernel or initramfs changed)"
            } else {
                "ok"
            }
        );
    }
    Ok(())
}

/// Removes templates by key (a unique prefix will do), or all of them, or
/// (`prune`) those no VM can use again.
pub fn rm(keys: &[String], all: bool) -> Result<()> {
    let t = Templates::default();
    let keys: Vec<String> = if all {
        t.list().into_iter().map(|(m, _)| m.key).collect()
    } else {
        keys.to_vec()
    };
    let mut failed = false;
    for k in &keys {
        match t.remove(k) {
            Ok(true) => println!("{}", &k[..k.len().min(12)]),
            Ok(false) => {
                eprintln!("husk: no template {k}");
                failed = true;
            }
            Err(e) => {
                eprintln!("husk: {e}");
                failed = true;
            }
        }
    }
    if failed {
        bail!("some templates were not removed");
    }
    Ok(())
}

pub fn prune() {
    let n = Templates::default().prune();
    println!("removed {n} stale templates");
}

/// Disk a directory's files take (the memory file is sparse).
fn allocated(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}
