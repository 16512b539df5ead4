//! The `vmm-snapshot` scenario (pulled into husk-scenario with `#[path]`):
//! husk-vmm's snapshot and restore with the VMM test initramfs.
//!
//! A VM boots with `--snapshot-to`; once husk-test-init answers on its state
//! port (a token drawn at boot, a tick counter, fresh random bytes), a
//! `{"op":"snapshot"}` writes the snapshot and ends it. Two VMs restored from
//! it at once (`--restore-from`) answer with the same
//! token and a tick count that went on from the snapshot's (memory and the
//! running threads came back), echo a vsock stream byte-exact (vsock works
//! after the transport reset), and stop on `shutdown`. Restores that do not
//! fit are refused with the reason: other memory size, vsock CID, kernel or
//! command line, a corrupt state file, a truncated memory file.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const STATE_PORT: u32 = 5002;
const ECHO_PORT: u32 = 5000;

/// What husk-test-init's state port answered.
#[derive(Debug)]
struct GuestState {
    token: String,
    ticks: u64,
    random: String,
}

fn parse_state(line: &str) -> Result<GuestState> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_string)
            .with_context(|| format!("no {name} in {line:?}"))
    };
    Ok(GuestState {
        token: field("token=")?,
        ticks: field("ticks=")?.parse()?,
        random: field("random=")?,
    })
}

/// Asks the guest's state port, retrying until it answers or `timeout`.
async fn ask_state(vsock: &Path, timeout: Duration) -> Result<GuestState> {
    let start = Instant::now();
    loop {
        let attempt = async {
            let mut s =
                husk_agent_client::vsock::connect(vsock, STATE_PORT, Duration::from_secs(5))
                    .await?;
            let mut line = String::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut line))
                .await
                .context("no answer")??;
            parse_state(&line)
        };
        match attempt.await {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > timeout => {
                return Err(e).context(format!("the state port did not answer in {timeout:?}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// 1 MiB through the guest's echo port, byte-exact.
async fn echo(vsock: &Path) -> Result<()> {
    let s = husk_agent_client::vsock::connect(vsock, ECHO_PORT, Duration::from_secs(10)).await?;
    let (mut r, mut w) = s.into_split();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move { w.write_all(&sent).await.map(|()| w) });
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(60), r.read_exact(&mut back))
        .await
        .context("echo stalled")??;
    drop(writer.await??);
    ensure!(back == data, "the echo came back different");
    Ok(())
}

/// One line to the control socket, one line back.
async fn control(api: &Path, request: &str, timeout: Duration) -> Result<serde_json::Value> {
    let s = UnixStream::connect(api)
        .await
        .with_context(|| format!("connecting to {}", api.display()))?;
    let (r, mut w) = s.into_split();
    w.write_all(format!("{request}\n").as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(timeout, tokio::io::BufReader::new(r).read_line(&mut answer))
        .await
        .context("no answer")??;
    serde_json::from_str(&answer).with_context(|| format!("answer {answer:?}"))
}

struct Launch<'a> {
    kernel: &'a Path,
    initramfs: &'a Path,
    memory_mib: u32,
    extra: Option<&'a str>,
    dir: &'a Path,
    name: &'a str,
    cid: u32,
}

impl Launch<'_> {
    fn command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(husk_tests::vm::vmm_binary());
        c.arg("--kernel")
            .arg(self.kernel)
            .arg("--initramfs")
            .arg(self.initramfs)
            .args(["--vcpus", "2", "--memory-mib"])
            .arg(self.memory_mib.to_string())
            .arg("--guest-cid")
            .arg(self.cid.to_string())
            .arg("--api-socket")
            .arg(self.api())
            .arg("--vsock-socket")
            .arg(self.vsock())
            .arg("--serial-out")
            .arg(self.dir.join(format!("{}.console", self.name)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(e) = self.extra {
            c.arg("--extra-cmdline").arg(e);
        }
        c
    }

    fn api(&self) -> PathBuf {
        self.dir.join(format!("{}.api", self.name))
    }

    fn vsock(&self) -> PathBuf {
        self.dir.join(format!("{}.vsock", self.name))
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.console", self.name))).unwrap_or_default()
    }
}

/// A restored VM: up, the same guest, vsock working, then stopped.
async fn restored(
    l: Launch<'_>,
    snap: &Path,
    template: &GuestState,
) -> Result<(Duration, GuestState)> {
    let start = Instant::now();
    let mut child = l
        .command()
        .arg("--restore-from")
        .arg(snap)
        .spawn()
        .context("starting husk-vmm --restore-from")?;
    let state = ask_state(&l.vsock(), Duration::from_secs(60))
        .await
        .with_context(|| format!("{}: console:\n{}", l.name, l.console()))?;
    let took = start.elapsed();
    ensure!(
        state.token == template.token,
        "{}: the restored guest has token {}, the template {}",
        l.name,
        state.token,
        template.token
    );
    ensure!(
        state.ticks >= template.ticks,
        "{}: ticks went back: {} after {}",
        l.name,
        state.ticks,
        template.ticks
    );
    echo(&l.vsock()).await.context(l.name.to_string())?;
    let later = ask_state(&l.vsock(), Duration::from_secs(10)).await?;
    ensure!(
        later.ticks > state.ticks,
        "{}: the guest's ticker is not running ({} then {})",
        l.name,
        state.ticks,
        later.ticks
    );
    ensure!(
        control(&l.api(), r#"{"op":"shutdown"}"#, Duration::from_secs(10)).await?["ok"] == true,
        "{}: shutdown refused",
        l.name
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("still running after shutdown")??;
    ensure!(status.success(), "{}: husk-vmm ended with {status}", l.name);
    Ok((took, state))
}

/// A restore that must be refused; returns husk-vmm's last words.
async fn refused(l: Launch<'_>, snap: &Path, expect: &str) -> Result<String> {
    let out = l.command().arg("--restore-from").arg(snap).output().await?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.code() == Some(1),
        "{}: husk-vmm ended with {} (expected 1):\n{err}",
        l.name,
        out.status
    );
    ensure!(
        err.contains(expect),
        "{}: the refusal does not say {expect:?}:\n{err}",
        l.name
    );
    ensure!(
        !l.api().exists() && !l.vsock().exists(),
        "{}: sockets left behind",
        l.name
    );
    Ok(err
        .lines()
        .rev()
        .find(|l| l.contains("error"))
        .unwrap_or_default()
        .to_string())
}

pub async fn vmm_snapshot(kernel: &Path, initramfs: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap)?;
    let base = |name, cid| Launch {
        kernel,
        initramfs,
        memory_mib: 256,
        extra: None,
        dir: dir.path(),
        name,
        cid,
    };

    // The template: boot, wait for the guest, snapshot.
    let t = base("template", 3);
    let start = Instant::now();
    let mut child = t
        .command()
        .arg("--snapshot-to")
        .arg(&snap)
        .spawn()
        .context("starting husk-vmm")?;
    ask_state(&t.vsock(), Duration::from_secs(120))
        .await
        .with_context(|| format!("console:\n{}", t.console()))?;
    let boot = start.elapsed();
    echo(&t.vsock()).await.context("template echo")?;
    let template = ask_state(&t.vsock(), Duration::from_secs(10)).await?;
    let asked = Instant::now();
    let answer = control(&t.api(), r#"{"op":"snapshot"}"#, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| serde_json::json!({ "error": format!("{e:#}") }));
    let snapshot_took = asked.elapsed();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("still running after the snapshot")??;
    if answer["ok"] != true || !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err).await;
        }
        bail!(
            "snapshot: {answer}, husk-vmm {status}:\n{err}\nconsole:\n{}",
            t.console()
        );
    }
    let state_len = std::fs::metadata(snap.join("state"))?.len();
    let memory = std::fs::metadata(snap.join("memory"))?;
    use std::os::unix::fs::MetadataExt;
    println!(
        "vmm-snapshot: booted in {boot:?}, snapshot taken in {snapshot_took:?}: state {} KiB, memory {} MiB ({} MiB allocated)",
        state_len >> 10,
        memory.len() >> 20,
        (memory.blocks() * 512) >> 20
    );

    // One restore alone, then two at once from the same snapshot.
    let (alone, _) = restored(base("clone", 3), &snap, &template).await?;
    println!("vmm-snapshot: a clone restored alone answered in {alone:?} (cold boot: {boot:?})");
    let (a, b) = tokio::join!(
        restored(base("clone-a", 3), &snap, &template),
        restored(base("clone-b", 3), &snap, &template)
    );
    let ((ta, sa), (tb, sb)) = (a?, b?);
    println!(
        "vmm-snapshot: two clones restored at once answered in {ta:?} and {tb:?} (cold boot: {boot:?}); same token, ticks {} -> {} and {}, vsock echo byte-exact",
        template.ticks, sa.ticks, sb.ticks
    );
    // Not asserted here: reseeding a clone's CRNG is the runtime's (through
    // the agent); what the VMM alone gives is said.
    println!(
        "vmm-snapshot: clones' getrandom bytes {}",
        if sa.random == sb.random {
            "equal (the runtime must reseed)"
        } else {
            "differ"
        }
    );

    // Restores that do not fit.
    let mut why = Vec::new();
    why.push(
        refused(
            Launch {
                memory_mib: 512,
                ..base("other-memory", 3)
            },
            &snap,
            "memory",
        )
        .await?,
    );
    why.push(refused(base("other-cid", 4), &snap, "guest CID").await?);
    why.push(
        refused(
            Launch {
                extra: Some("test_init.other=1"),
                ..base("other-cmdline", 3)
            },
            &snap,
            "command line",
        )
        .await?,
    );
    let other_kernel = dir.path().join("vmlinux.other");
    let mut k = std::fs::read(kernel)?;
    k.push(0);
    std::fs::write(&other_kernel, k)?;
    why.push(
        refused(
            Launch {
                kernel: &other_kernel,
                ..base("other-kernel", 3)
            },
            &snap,
            "kernel",
        )
        .await?,
    );
    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir(&corrupt)?;
    let mut state = std::fs::read(snap.join("state"))?;
    let at = state.len() - 100;
    state[at] ^= 0x20;
    std::fs::write(corrupt.join("state"), state)?;
    std::os::unix::fs::symlink(snap.join("memory"), corrupt.join("memory"))?;
    why.push(refused(base("corrupt-state", 3), &corrupt, "checksum").await?);
    let truncated = dir.path().join("truncated");
    std::fs::create_dir(&truncated)?;
    std::fs::copy(snap.join("state"), truncated.join("state"))?;
    let f = std::fs::File::create(truncated.join("memory"))?;
    f.set_len((256 << 20) - 4096)?;
    why.push(refused(base("truncated-memory", 3), &truncated, "bytes of memory").await?);
    println!("vmm-snapshot: refused restores:");
    for w in why {
        println!("  {w}");
    }
    println!("vmm-snapshot: round trip, two clones, refusals: ok");
    Ok(())
}
