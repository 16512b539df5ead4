//! The `template` scenario (pulled into husk-scenario with `#[path]`): the
//! runtime's VM templates (husk_runtime::template) with the real agent, in
//! a template directory of its own (`HUSK_TEMPLATE_DIR`).
//!
//! The first sandbox asking for a template builds it (a VM booted to its
//! agent and snapshotted) and is resumed from it; two more, at once, are
//! resumed from the same one. In each clone a container reports the guest's
//! wall clock, a kernel UUID, fresh random bytes and its hostname: the
//! clock is the host's to within 2 s, and no two clones share the UUID,
//! the random bytes or the hostname. A template whose state file was
//! damaged is refused by husk-vmm: that sandbox boots cold and the template
//! is removed; a kernel that changed gets a template of its own. A cold
//! boot is timed beside them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use husk_agent_client::agent::CreateSandboxRequest;
use husk_tests::vm::{Bind, Vm, VmSpec};

/// What a clone's container saw.
#[derive(Debug)]
struct Seen {
    clock_s: u64,
    /// The host's clock right before the container started.
    host_before_s: u64,
    /// The host's clock right after the container ran.
    host_s: u64,
    uuid: String,
    random: String,
    hostname: String,
}

async fn clone(spec: &VmSpec, hostname: &str) -> Result<(Vm, Duration, Seen)> {
    let started = Instant::now();
    let vm = Vm::boot_from(spec, true).await?;
    let took = started.elapsed();
    let c = vm.client.clone();
    let made = c
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: hostname.into(),
            hostname: hostname.into(),
            shared_fs_tag: "husk-share".into(),
            shared_mount_point: "/run/husk/share".into(),
            ..Default::default()
        })
        .await;
    if let Err(e) = made {
        // What the VMM and the guest's console say, before the VM goes. A
        // call that got no answer is a bounded step that hung: in the
        // nested test host, whose stack wedges a guest's vCPU now and then
        // (docs/testhost.md), the harness runs the scenario once more; on
        // hardware KVM it fails.
        let tail = husk_agent_client::client::file_tail;
        let hung = if e.to_string().contains("no answer within") {
            husk_tests::scenario::STEP_HANG
        } else {
            ""
        };
        anyhow::bail!(
            "{hung}{hostname}: CreateSandbox: {e}\nvmm.log:\n{}\nconsole:\n{}",
            tail(&vm.dir.join("vmm.log"), 40),
            tail(&vm.dir.join("console.log"), 40)
        );
    }
    let script = "date +%s; cat /proc/sys/kernel/random/uuid; \
                  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname";
    let host_before_s = now_s();
    let (code, out) = super::run_container(
        &c,
        "seen",
        super::busybox_spec(&["sh", "-c", script], serde_json::json!({})),
    )
    .await?;
    ensure!(code == 0, "{hostname}: the container exited {code}: {out}");
    let l: Vec<&str> = out.lines().collect();
    ensure!(l.len() == 4, "{hostname}: {out:?}");
    let seen = Seen {
        clock_s: l[0].trim().parse().context("date")?,
        host_before_s,
        host_s: now_s(),
        uuid: l[1].trim().into(),
        random: l[2].trim().into(),
        hostname: l[3].trim().into(),
    };
    Ok((vm, took, seen))
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn template(guest: &Option<PathBuf>) -> Result<()> {
    let templates = tempfile::tempdir()?;
    // Set before anything of ours reads it.
    std::env::set_var("HUSK_TEMPLATE_DIR", templates.path());
    let rootfs = Path::new("target/husk/busybox-rootfs").canonicalize()?;
    let mut spec = super::spec(guest, 1, 256);
    spec.binds.push(Bind {
        source: rootfs,
        target: "rootfs".into(),
        readonly: true,
    });

    // The first builds the template, then is resumed from it.
    let (a, first, seen_a) = clone(&spec, "clone-a").await?;
    let dir = a
        .from_template
        .clone()
        .context("the first sandbox was not resumed from a template")?;
    ensure!(
        dir.join("state").exists() && dir.join("memory").exists(),
        "no template files in {}",
        dir.display()
    );
    // Two more at once, from the same template.
    let (b, c) = tokio::join!(clone(&spec, "clone-b"), clone(&spec, "clone-c"));
    let ((b, tb, seen_b), (c, tc, seen_c)) = (b?, c?);
    ensure!(
        b.from_template.as_deref() == Some(dir.as_path())
            && c.from_template.as_deref() == Some(dir.as_path()),
        "the clones did not come from the template"
    );
    for (name, s) in [("a", &seen_a), ("b", &seen_b), ("c", &seen_c)] {
        // The container read the clock between the host's two reads
        // (whole seconds: a second either way), however slow the run.
        ensure!(
            s.clock_s + 1 >= s.host_before_s && s.clock_s <= s.host_s + 1,
            "clone {name}'s clock said {} where the host's said {} before and {} after",
            s.clock_s,
            s.host_before_s,
            s.host_s
        );
    }
    let all = [&seen_a, &seen_b, &seen_c];
    for (i, x) in all.iter().enumerate() {
        for y in &all[i + 1..] {
            ensure!(
                x.uuid != y.uuid && x.random != y.random,
                "two clones share random output: {x:?} {y:?}"
            );
        }
    }
    ensure!(
        (
            seen_a.hostname.as_str(),
            seen_b.hostname.as_str(),
            seen_c.hostname.as_str()
        ) == ("clone-a", "clone-b", "clone-c"),
        "hostnames: {all:?}"
    );
    println!(
        "template: first sandbox (template built, then resumed) in {first:?}; two clones at once in {tb:?} and {tc:?}; clocks the host's to a second, UUIDs, random bytes and hostnames differ"
    );
    // What the clones wrote to their memory stayed theirs: the template's
    // files are as they were built (a write through the private mapping
    // would have changed the memory file's stamp).
    let stamps = |d: &Path| -> Result<Vec<String>> {
        ["state", "memory"]
            .iter()
            .map(|f| Ok(husk_vmm::snapshot::file_stamp(&d.join(f))?))
            .collect()
    };
    let built = stamps(&dir)?;
    for vm in [a, b, c] {
        vm.shutdown(Duration::from_secs(30)).await?;
    }
    ensure!(
        dir.join("state").exists(),
        "the template went with its clones"
    );
    ensure!(
        stamps(&dir)? == built,
        "the clones changed their template's files"
    );

    // Ten at once from the one template: each agent answers.
    let started = Instant::now();
    let ten: Vec<Result<Vm>> =
        futures_util::future::join_all((0..10).map(|_| Vm::boot_from(&spec, true))).await;
    let ten_took = started.elapsed();
    let ten = ten.into_iter().collect::<Result<Vec<_>>>()?;
    for vm in &ten {
        ensure!(
            vm.from_template.as_deref() == Some(dir.as_path()),
            "one of ten was not resumed from the template"
        );
        vm.client.guest_details().await?;
    }
    futures_util::future::join_all(
        ten.into_iter()
            .map(|vm| vm.shutdown(Duration::from_secs(60))),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    ensure!(
        stamps(&dir)? == built,
        "ten clones changed their template's files"
    );
    println!("template: ten clones at once, all answering, in {ten_took:?}; the template's files unchanged");

    // A cold boot of the same VM, for the figures.
    let started = Instant::now();
    let cold = Vm::boot(&spec).await?;
    let cold_took = started.elapsed();
    ensure!(
        cold.from_template.is_none(),
        "a cold boot came from a template"
    );
    cold.shutdown(Duration::from_secs(30)).await?;

    // A damaged template: husk-vmm refuses it, the sandbox boots cold, the
    // template is removed.
    let state = dir.join("state");
    let mut bytes = std::fs::read(&state)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&state, bytes)?;
    let d = Vm::boot_from(&spec, true).await?;
    ensure!(d.from_template.is_none(), "a damaged template was used");
    ensure!(!dir.exists(), "the damaged template was kept");
    d.shutdown(Duration::from_secs(30)).await?;

    // Another kernel file: another template.
    let kernel = templates.path().join("vmlinux.copy");
    std::fs::copy(&spec.kernel, &kernel)?;
    let other = VmSpec {
        kernel,
        ..spec.clone()
    };
    let e = Vm::boot_from(&other, true).await?;
    let other_dir = e
        .from_template
        .clone()
        .context("no template for the new kernel")?;
    ensure!(
        other_dir != dir,
        "the changed kernel reused the old template"
    );
    e.shutdown(Duration::from_secs(30)).await?;
    println!(
        "template: a cold boot took {cold_took:?}; a damaged template was refused, removed, and its sandbox booted cold; a changed kernel got a template of its own"
    );
    Ok(())
}
