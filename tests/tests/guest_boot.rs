//! Our guest kernel and initramfs boot to husk-agent under plain QEMU TCG:
//! the guest image is checked on its own, independently of any VMM or KVM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_guest_image::{agent_initramfs, install_dir};
use husk_tests::workspace_root;

const MARKER: &str = "husk-agent: init reached";

fn kernel(name: &str) -> PathBuf {
    let p = install_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run tools/setup (it builds the guest kernel)",
        p.display()
    );
    p
}

fn agent() -> PathBuf {
    let root = workspace_root().join("target");
    [
        "x86_64-unknown-linux-musl/release/husk-agent",
        "x86_64-unknown-linux-gnu/release/husk-agent",
    ]
    .iter()
    .map(|p| root.join(p))
    .find(|p| p.exists())
    .expect("the static husk-agent is not built: run `make build`")
}

/// Boots `kernel` under TCG and returns the console once the agent reports.
fn boot_tcg(kernel: PathBuf, cpus: u32, mem_mib: u32) -> String {
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(
        &initrd,
        agent_initramfs(&agent()).unwrap().to_bytes(false).unwrap(),
    )
    .unwrap();
    // The agent reboots at once, which ends QEMU (see microvm_command).
    let mut child = husk_guest_image::qemu::microvm_command(
        &kernel,
        &initrd,
        "tcg",
        cpus,
        mem_mib,
        "husk.exit=reboot",
    )
    .stderr(Stdio::inherit())
    .spawn()
    .expect("qemu-system-x86_64 (run tools/setup)");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut console = String::new();
    let mut seen = false;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        console.push_str(&line);
        console.push('\n');
        if line.contains(MARKER) {
            seen = true;
        }
    }
    // Either QEMU exited (the agent rebooted) or the deadline passed; its
    // stdout closes a moment before it can be reaped.
    let exited = (0..100).any(|_| {
        let done = child.try_wait().unwrap().is_some();
        if !done {
            std::thread::sleep(Duration::from_millis(50));
        }
        done
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "the agent never reported; console:\n{console}");
    assert!(
        exited,
        "QEMU did not end after the agent rebooted; console:\n{console}"
    );
    console
}

fn reported(console: &str, field: &str) -> String {
    let line = console.lines().find(|l| l.contains(MARKER)).unwrap();
    line.split(&format!("{field} "))
        .nth(1)
        .unwrap()
        .split([',', ')'])
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn bzimage_boots_to_the_agent() {
    let console = boot_tcg(kernel("bzImage"), 1, 256);
    assert!(
        reported(&console, "kernel").starts_with("6.1."),
        "{console}"
    );
    assert_eq!(reported(&console, "cpus"), "0");
}

#[test]
fn pvh_vmlinux_boots_to_the_agent_with_smp() {
    let console = boot_tcg(kernel("vmlinux"), 2, 512);
    assert_eq!(reported(&console, "cpus"), "0-1", "{console}");
    let kib: u64 = reported(&console, "memory")
        .trim_end_matches(" KiB")
        .parse()
        .unwrap();
    assert!(kib > 400 * 1024 && kib <= 512 * 1024, "{kib} KiB");
}
