//! `/init` of the VMM test initramfs. It is PID 1 in a guest booted by
//! husk-vmm in integration tests, and on the serial console it reports:
//!
//!   test-init: cpus <online list> memory <KiB>
//!   test-init: hwrng <current rng> read <n> bytes
//!   test-init: echo listening on vsock port 5000
//!   test-init: dialed host port 5001
//!
//! With `test_init.fs=TAG` it mounts that virtio-fs share on /share and
//! reports `test-init: fs read <hello.txt>`, writes `from-guest.txt`, and
//! reports what reading `evil/hostname` through a host-made symlink gives.
//!
//! It echoes every stream accepted on vsock port 5000 (one thread each),
//! sends one line to host port 5001, and then waits to be stopped.
//! `test_init.exit=poweroff` on the command line powers off right after the
//! report instead.

use std::io::{Read, Write};

const ECHO_PORT: u32 = 5000;
const DIAL_PORT: u32 = 5001;
const HOST_CID: u32 = 2;

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (s, t, f) = (c(src), c(target), c(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "test-init: {line}");
    let _ = out.flush();
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::park();
    }
}

fn share(tag: &str) {
    mount(tag, "/share", "virtiofs");
    say(&format!("fs read {}", read("/share/hello.txt")));
    match std::fs::write("/share/from-guest.txt", "written in the guest\n") {
        Ok(()) => say("fs wrote from-guest.txt"),
        Err(e) => say(&format!("fs write failed: {e}")),
    }
    // `evil -> /etc` was made on the host; here it must mean the guest's /etc.
    match std::fs::read_to_string("/share/evil/hostname") {
        Ok(c) => say(&format!("fs evil read {:?}", c.trim())),
        Err(e) => say(&format!("fs evil refused: {e}")),
    }
}

fn echo(mut s: vsock::VsockStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn main() {
    // As a container process (not /init): tries to open an AF_VSOCK socket
    // and reach the host's log port, and says what happened.
    if std::env::args().nth(1).as_deref() == Some("vsock-probe") {
        let r = vsock::VsockStream::connect(&vsock::VsockAddr::new(libc::VMADDR_CID_HOST, 1025));
        match r {
            Ok(_) => println!("vsock-probe: connected"),
            Err(e) => println!("vsock-probe: {}", e.raw_os_error().unwrap_or(0)),
        }
        return;
    }
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")
                .map(|v| v.trim().trim_end_matches(" kB").to_string())
        })
        .unwrap_or_default();
    say(&format!(
        "cpus {} memory {mem}",
        read("/sys/devices/system/cpu/online")
    ));
    // virtio-rng: the kernel names it the current hwrng; read from it.
    mount("devtmpfs", "/dev", "devtmpfs");
    let mut buf = [0u8; 64];
    let got = std::fs::File::open("/dev/hwrng")
        .and_then(|mut f| f.read(&mut buf))
        .unwrap_or(0);
    say(&format!(
        "hwrng {} read {got} bytes",
        read("/sys/devices/virtual/misc/hw_random/rng_current")
    ));
    let cmdline = read("/proc/cmdline");
    if let Some(tag) = cmdline
        .split_whitespace()
        .find_map(|p| p.strip_prefix("test_init.fs="))
    {
        share(tag);
    }
    if read("/proc/cmdline")
        .split_whitespace()
        .any(|p| p == "test_init.exit=poweroff")
    {
        power_off();
    }

    match vsock::VsockListener::bind(&vsock::VsockAddr::new(libc::VMADDR_CID_ANY, ECHO_PORT)) {
        Ok(l) => {
            say(&format!("echo listening on vsock port {ECHO_PORT}"));
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    std::thread::spawn(move || echo(s));
                }
            });
        }
        Err(e) => say(&format!("echo: bind failed: {e}")),
    }
    match vsock::VsockStream::connect(&vsock::VsockAddr::new(HOST_CID, DIAL_PORT)) {
        Ok(mut s) => {
            let _ = s.write_all(b"hello from the guest\n");
            say(&format!("dialed host port {DIAL_PORT}"));
        }
        Err(e) => say(&format!("dial host port {DIAL_PORT} failed: {e}")),
    }
    // PID 1 must not exit; reap whatever ends.
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out pointer.
        if unsafe { libc::waitpid(-1, &mut status, 0) } < 0 {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
