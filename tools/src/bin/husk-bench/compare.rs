//! `husk-bench vmm-boot --firecracker PATH`: husk-vmm against Firecracker on
//! the same kernel, the same minimal initramfs and the same command line.
//!
//! The initramfs is static busybox with a two-line `/init` that prints a
//! marker and resets the machine, so nothing of Husk's guest side (the
//! agent, its devices) is in the figure: only what each VMM makes the
//! guest's boot cost. The two are alternated after one warm-up each, so
//! that drift in the machine's load (the nested test host is noisy) falls
//! on both alike.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_guest_image::initramfs::Initramfs;
use serde_json::json;

use crate::stats;

/// The command line the measurement used for both VMMs.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet rdinit=/init";

/// What `/init` prints once the guest reached user space.
const MARKER: &str = "HUSK-BENCH-INIT-REACHED";

/// A boot that takes longer than this is a hang, not a sample.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

pub struct Setup {
    pub firecracker: PathBuf,
    pub husk_vmm: PathBuf,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub husk_args: Vec<String>,
    pub runs: usize,
    pub cpus: u32,
    pub memory: u32,
}

/// The release husk-vmm when one is built, else the one beside this program.
pub fn default_husk_vmm() -> PathBuf {
    let release = PathBuf::from("target/release/husk-vmm");
    if release.exists() {
        return release;
    }
    husk_runtime::hypervisor::vmm_binary()
}

/// The fd husk-vmm writes its ready byte to (`--ready-fd`).
const READY_FD: i32 = 3;

/// One boot's figures, in milliseconds from spawn.
struct Sample {
    /// husk-vmm only: when every vCPU was about to enter the guest, which is
    /// the VMM's own set-up cost (memory, kernel load, devices).
    ready_ms: Option<f64>,
    init_ms: f64,
    exit_ms: f64,
}

#[derive(Clone, Copy)]
enum Vmm {
    Husk,
    Firecracker,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Husk => "husk-vmm",
            Vmm::Firecracker => "firecracker",
        }
    }
}

/// Static busybox as `/bin/busybox`, and an `/init` that prints the marker
/// and resets at once (`reboot -f` with `reboot=k` pulses the i8042 line,
/// which ends both VMMs).
fn minimal_initramfs(busybox: &Path) -> Result<Vec<u8>> {
    let mut i = Initramfs::new();
    i.with_base_layout()?;
    i.dir("bin", 0o755)?;
    i.file_from("bin/busybox", busybox, 0o755)?;
    let init = format!("#!/bin/busybox sh\n/bin/busybox echo {MARKER}\n/bin/busybox reboot -f\n");
    i.file("init", 0o755, init.into_bytes())?;
    Ok(i.to_bytes(false)?)
}

fn firecracker_config(s: &Setup, initrd: &Path) -> serde_json::Value {
    json!({
        "boot-source": {
            "kernel_image_path": s.kernel,
            "initrd_path": initrd,
            "boot_args": s.cmdline,
        },
        "drives": [],
        "machine-config": {"vcpu_count": s.cpus, "mem_size_mib": s.memory, "smt": false},
    })
}

fn spawn(
    s: &Setup,
    vmm: Vmm,
    initrd: &Path,
    fc_config: &Path,
    ready: Option<&OwnedFd>,
) -> Result<Child> {
    let mut cmd = match vmm {
        Vmm::Husk => {
            let mut c = Command::new(&s.husk_vmm);
            if let Some(w) = ready {
                let raw = w.as_raw_fd();
                c.args(["--ready-fd", &READY_FD.to_string()]);
                // SAFETY: pre_exec runs in the child between fork and exec and
                // makes only raw syscalls (dup2, fcntl) on an fd number taken
                // before the fork.
                unsafe {
                    c.pre_exec(move || {
                        let r = if raw == READY_FD {
                            // dup2 onto itself keeps close-on-exec: clear it.
                            libc::fcntl(READY_FD, libc::F_SETFD, 0)
                        } else {
                            libc::dup2(raw, READY_FD)
                        };
                        if r < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            c.arg("--kernel")
                .arg(&s.kernel)
                .arg("--initramfs")
                .arg(initrd)
                .arg("--cmdline")
                .arg(&s.cmdline)
                .arg("--vcpus")
                .arg(s.cpus.to_string())
                .arg("--memory-mib")
                .arg(s.memory.to_string())
                .args(&s.husk_args)
                // husk-vmm's console goes to stderr; its own log would too.
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            c
        }
        Vmm::Firecracker => {
            let mut c = Command::new(&s.firecracker);
            c.arg("--no-api")
                .arg("--config-file")
                .arg(fc_config)
                .arg("--level")
                .arg("Error")
                // Its console goes to stdout.
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            c
        }
    };
    cmd.stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", vmm.name()))
}

/// Boots once; the console is read on a thread so that the wait for the
/// marker has a deadline.
fn boot_once(s: &Setup, vmm: Vmm, initrd: &Path, fc_config: &Path) -> Result<Sample> {
    let (ready_r, ready_w) = match vmm {
        Vmm::Husk => {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            (Some(r), Some(w))
        }
        Vmm::Firecracker => (None, None),
    };
    let started = Instant::now();
    let mut child = spawn(s, vmm, initrd, fc_config, ready_w.as_ref())?;
    drop(ready_w);
    let ready = ready_r.map(|r| {
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let got = std::fs::File::from(r).read(&mut byte).unwrap_or(0);
            (got == 1).then(|| started.elapsed())
        })
    });
    let console: Box<dyn Read + Send> = match vmm {
        Vmm::Husk => Box::new(child.stderr.take().context("husk-vmm stderr")?),
        Vmm::Firecracker => Box::new(child.stdout.take().context("firecracker stdout")?),
    };
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::new();
        for line in BufReader::new(console).lines().map_while(Result::ok) {
            if line.contains(MARKER) {
                let _ = tx.send(started.elapsed());
            }
            if tail.len() == 20 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        Vec::from(tail)
    });
    let init = rx.recv_timeout(BOOT_LIMIT);
    let status = match init {
        Ok(_) => wait_with_deadline(&mut child, started + BOOT_LIMIT)?,
        Err(_) => None,
    };
    let exited = started.elapsed();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let tail = reader.join().unwrap_or_default();
    let ready_ms = ready
        .and_then(|t| t.join().ok().flatten())
        .map(|d| d.as_secs_f64() * 1000.0);
    match (init, status) {
        (Ok(init), Some(st)) if st.success() => Ok(Sample {
            ready_ms,
            init_ms: init.as_secs_f64() * 1000.0,
            exit_ms: exited.as_secs_f64() * 1000.0,
        }),
        (Ok(_), Some(st)) => bail!(
            "{} exited with {st}; console:\n{}",
            vmm.name(),
            tail.join("\n")
        ),
        _ => bail!(
            "{} did not boot to the marker and exit within {BOOT_LIMIT:?}; console:\n{}",
            vmm.name(),
            tail.join("\n")
        ),
    }
}

fn wait_with_deadline(
    child: &mut Child,
    deadline: Instant,
) -> Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn run(s: &Setup) -> Result<serde_json::Value> {
    for (what, p) in [
        ("firecracker", &s.firecracker),
        ("husk-vmm", &s.husk_vmm),
        ("kernel", &s.kernel),
    ] {
        if !p.exists() {
            bail!("{what} {} does not exist", p.display());
        }
    }
    let dir = tempfile::Builder::new().prefix("husk-bench-").tempdir()?;
    // Both VMMs and the kernel run from copies in the temporary directory:
    // in the nested test host the originals are on virtio-fs, whose reads
    // (9 MB of kernel, the binaries' pages) cost seconds and vary from run to
    // run, which would measure the test host's file sharing, not the VMMs.
    let staged = |p: &Path, name: &str| -> Result<PathBuf> {
        let to = dir.path().join(name);
        std::fs::copy(p, &to).with_context(|| format!("copying {}", p.display()))?;
        Ok(to)
    };
    let s = &Setup {
        firecracker: staged(&s.firecracker, "firecracker")?,
        husk_vmm: staged(&s.husk_vmm, "husk-vmm")?,
        kernel: staged(&s.kernel, "vmlinux")?,
        cmdline: s.cmdline.clone(),
        husk_args: s.husk_args.clone(),
        ..*s
    };
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(&initrd, minimal_initramfs(Path::new("/bin/busybox"))?)?;
    let fc_config = dir.path().join("firecracker.json");
    std::fs::write(
        &fc_config,
        serde_json::to_vec_pretty(&firecracker_config(s, &initrd))?,
    )?;
    let order = [Vmm::Husk, Vmm::Firecracker];
    for vmm in order {
        boot_once(s, vmm, &initrd, &fc_config).context("warm-up")?;
    }
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for run in 0..s.runs {
        for (i, vmm) in order.into_iter().enumerate() {
            let x = boot_once(s, vmm, &initrd, &fc_config)?;
            let ready = x
                .ready_ms
                .map(|r| format!("ready {r:.0} ms, "))
                .unwrap_or_default();
            eprintln!(
                "run {run}: {} {ready}init {:.0} ms, exit {:.0} ms",
                vmm.name(),
                x.init_ms,
                x.exit_ms
            );
            samples[i].push(x);
        }
    }
    let summary = |v: &[Sample]| {
        let mut init: Vec<f64> = v.iter().map(|x| x.init_ms).collect();
        let mut exit: Vec<f64> = v.iter().map(|x| x.exit_ms).collect();
        (stats(&mut init), stats(&mut exit))
    };
    let (h_init, h_exit) = summary(&samples[0]);
    let mut ready: Vec<f64> = samples[0].iter().filter_map(|x| x.ready_ms).collect();
    let h_ready = (!ready.is_empty()).then(|| stats(&mut ready));
    let (f_init, f_exit) = summary(&samples[1]);
    println!(
        "| {} runs, {} vCPU, {} MiB, `{}` | husk-vmm median | p90 | firecracker median | p90 | ratio (medians) |",
        s.runs, s.cpus, s.memory, s.cmdline
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (what, h, f) in [
        ("start -> init marker", h_init, f_init),
        ("start -> exit", h_exit, f_exit),
    ] {
        println!(
            "| {what} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.2}x |",
            h.0,
            h.1,
            f.0,
            f.1,
            h.0 / f.0
        );
    }
    if let Some((m, p)) = h_ready {
        println!("| husk-vmm start -> vCPUs enter the guest | {m:.0} ms | {p:.0} ms | | | |");
    }
    Ok(json!({
        "benchmark": "vmm-boot-vs-firecracker", "runs": s.runs, "vcpus": s.cpus,
        "memory_mib": s.memory, "cmdline": s.cmdline, "husk_args": s.husk_args,
        "husk_vmm": {"ready_ms": h_ready.map(|(m, p)| json!({"median": m, "p90": p})),
                     "init_ms": {"median": h_init.0, "p90": h_init.1},
                     "exit_ms": {"median": h_exit.0, "p90": h_exit.1}},
        "firecracker": {"init_ms": {"median": f_init.0, "p90": f_init.1},
                        "exit_ms": {"median": f_exit.0, "p90": f_exit.1}},
        "ratio_init": h_init.0 / f_init.0, "ratio_exit": h_exit.0 / f_exit.0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initramfs_carries_busybox_and_an_init_that_prints_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("busybox");
        std::fs::write(&fake, b"\x7fELF-not-really").unwrap();
        let bytes = minimal_initramfs(&fake).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/busybox"));
        assert!(text.contains(MARKER));
        assert!(text.contains("reboot -f"));
    }

    #[test]
    fn firecracker_gets_the_same_machine() {
        let s = Setup {
            firecracker: "fc".into(),
            husk_vmm: "hv".into(),
            kernel: "/k/vmlinux".into(),
            cmdline: CMDLINE.into(),
            husk_args: vec![],
            runs: 1,
            cpus: 2,
            memory: 512,
        };
        let c = firecracker_config(&s, Path::new("/i.cpio"));
        assert_eq!(c["boot-source"]["kernel_image_path"], "/k/vmlinux");
        assert_eq!(c["boot-source"]["initrd_path"], "/i.cpio");
        assert_eq!(c["boot-source"]["boot_args"], CMDLINE);
        assert_eq!(c["machine-config"]["vcpu_count"], 2);
        assert_eq!(c["machine-config"]["mem_size_mib"], 512);
    }
}
