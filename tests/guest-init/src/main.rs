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
//! With `test_init.net=ADDR` it brings up `lo` and `eth0` (ADDR/24, by ioctl:
//! this is a test init, not the agent), reports
//! `test-init: net eth0 mac <mac> mtu <mtu>`, connects to ADDR's .1 on TCP
//! port 5555 and runs the host's exchange: once the host sends one byte, it
//! sends `test_init.net_bytes`
//! bytes (10 MiB unless given) of a pattern, reads as many of another
//! pattern back, checks them and answers `OK` or `BAD`, then reports
//! `test-init: net exchange ok` (or what failed).
//!
//! On vsock port 5002 it answers each connection with one line,
//! `token=<hex> ticks=<n> random=<hex>`, and closes it: a token drawn once at
//! boot, a counter a thread advances every 10 ms, and 16 fresh bytes of
//! getrandom (the snapshot tests: a restored guest keeps its memory and its
//! running threads; `test-init: state on vsock port 5002` says it listens).
//!
//! It echoes every stream accepted on vsock port 5000 (one thread each),
//! sends one line to host port 5001, and then waits to be stopped.
//! `test_init.exit=poweroff` on the command line powers off right after the
//! report instead.
//!
//! As a container process it has two more parts: `vsock-probe` (tries
//! AF_VSOCK, says what happened) and `fuse-hang DIR` (makes itself a process
//! no signal ends: see [`fuse_hang`]).

use std::io::{Read, Write};

const ECHO_PORT: u32 = 5000;
const DIAL_PORT: u32 = 5001;
const STATE_PORT: u32 = 5002;
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

/// `struct ifreq`: the name, then a 24-byte union (an address or the flags).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

fn ifreq(name: &str) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

fn ioctl(sock: i32, req: libc::c_ulong, r: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: every request used here reads or writes one `struct ifreq`,
    // which `r` is, for the duration of the call.
    if unsafe { libc::ioctl(sock, req as _, r as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets an IPv4 address (SIOCSIFADDR) or netmask (SIOCSIFNETMASK).
fn set_in_addr(sock: i32, name: &str, req: libc::c_ulong, addr: [u8; 4]) -> std::io::Result<()> {
    let mut r = ifreq(name);
    r.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    r.data[4..8].copy_from_slice(&addr);
    ioctl(sock, req, &mut r)
}

fn link_up(sock: i32, name: &str) -> std::io::Result<()> {
    let mut r = ifreq(name);
    ioctl(sock, libc::SIOCGIFFLAGS, &mut r)?;
    let flags =
        i16::from_ne_bytes([r.data[0], r.data[1]]) | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(sock, libc::SIOCSIFFLAGS, &mut r)
}

/// The exchange's bytes: `seed` tells the two directions apart.
fn net_pattern(seed: u8, i: usize) -> u8 {
    (i as u32)
        .wrapping_mul(2_654_435_761)
        .wrapping_add(u32::from(seed)) as u8
        ^ (i >> 13) as u8
}

fn net(addr: &str, bytes: usize) -> Result<(), String> {
    let ip: std::net::Ipv4Addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    link_up(sock, "lo").map_err(|e| format!("lo up: {e}"))?;
    set_in_addr(sock, "eth0", libc::SIOCSIFADDR, ip.octets())
        .map_err(|e| format!("eth0 address: {e}"))?;
    set_in_addr(sock, "eth0", libc::SIOCSIFNETMASK, [255, 255, 255, 0])
        .map_err(|e| format!("eth0 netmask: {e}"))?;
    link_up(sock, "eth0").map_err(|e| format!("eth0 up: {e}"))?;
    // SAFETY: closing the socket made above.
    unsafe { libc::close(sock) };
    say(&format!(
        "net eth0 mac {} mtu {}",
        read("/sys/class/net/eth0/address"),
        read("/sys/class/net/eth0/mtu")
    ));
    let o = ip.octets();
    let host = std::net::SocketAddr::from(([o[0], o[1], o[2], 1], 5555));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut s = loop {
        match std::net::TcpStream::connect_timeout(&host, std::time::Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(format!("connecting to {host}: {e}"));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    };
    let out: Vec<u8> = (0..bytes).map(|i| net_pattern(1, i)).collect();
    // The host says when to start, so that its clock covers every byte.
    let mut go = [0u8; 1];
    s.read_exact(&mut go)
        .map_err(|e| format!("waiting for the host: {e}"))?;
    s.write_all(&out).map_err(|e| format!("sending: {e}"))?;
    let mut back = vec![0u8; bytes];
    s.read_exact(&mut back)
        .map_err(|e| format!("receiving: {e}"))?;
    let good = back
        .iter()
        .enumerate()
        .all(|(i, &b)| b == net_pattern(2, i));
    s.write_all(if good { b"OK\n" } else { b"BAD\n" })
        .map_err(|e| format!("answering: {e}"))?;
    if !good {
        return Err("the host's bytes arrived changed".into());
    }
    Ok(())
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random16() -> [u8; 16] {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    b
}

/// The state port (see the module comment).
fn serve_state() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let token = hex(&random16());
    let ticks = Arc::new(AtomicU64::new(0));
    let t = ticks.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(10));
        t.fetch_add(1, Ordering::Relaxed);
    });
    match vsock::VsockListener::bind(&vsock::VsockAddr::new(libc::VMADDR_CID_ANY, STATE_PORT)) {
        Ok(l) => {
            say(&format!("state on vsock port {STATE_PORT}"));
            std::thread::spawn(move || {
                for mut s in l.incoming().flatten() {
                    let line = format!(
                        "token={token} ticks={} random={}\n",
                        ticks.load(Ordering::Relaxed),
                        hex(&random16())
                    );
                    let _ = s.write_all(line.as_bytes());
                }
            });
        }
        Err(e) => say(&format!("state: bind failed: {e}")),
    }
}

/// A process that SIGKILL cannot end, made from inside a (privileged)
/// container: what a guest that answers every call but never reports an
/// exit looks like to the host. It mounts a FUSE file system it serves
/// itself, answers the kernel's INIT, then forks a server that reads the
/// next request and never answers it, and looks a file up there. Once a
/// FUSE request has reached its server, the kernel waits for the answer
/// uninterruptibly (fs/fuse/dev.c, `request_wait_answer`), and this process
/// keeps the connection open itself, so killing the server does not abort
/// it: the process stays in D state until the VM ends.
fn fuse_hang(dir: &str) -> Result<(), String> {
    use std::ffi::CString;
    let err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    let dev = c"/dev/fuse";
    // SAFETY: plain syscalls on NUL-terminated strings and owned buffers.
    unsafe {
        if libc::access(dev.as_ptr(), libc::F_OK) != 0
            && libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 229)) != 0
        {
            return Err(err("mknod /dev/fuse"));
        }
        let fd = libc::open(dev.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return Err(err("open /dev/fuse"));
        }
        let target = CString::new(dir).map_err(|e| e.to_string())?;
        libc::mkdir(target.as_ptr(), 0o755);
        let data = CString::new(format!("fd={fd},rootmode=40000,user_id=0,group_id=0"))
            .map_err(|e| e.to_string())?;
        if libc::mount(
            c"hang".as_ptr(),
            target.as_ptr(),
            c"fuse".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        ) != 0
        {
            return Err(err("mount fuse"));
        }
        // FUSE_INIT (opcode 26): answered with protocol 7.31, or nothing
        // else gets to the server.
        let mut buf = vec![0u8; 1 << 17];
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        if n < 40 || u32::from_ne_bytes(buf[4..8].try_into().unwrap_or_default()) != 26 {
            return Err(err("reading FUSE_INIT"));
        }
        let unique = u64::from_ne_bytes(buf[8..16].try_into().unwrap_or_default());
        let mut out = Vec::with_capacity(80);
        out.extend_from_slice(&80u32.to_ne_bytes()); // len
        out.extend_from_slice(&0i32.to_ne_bytes()); // error
        out.extend_from_slice(&unique.to_ne_bytes());
        out.extend_from_slice(&7u32.to_ne_bytes()); // major
        out.extend_from_slice(&31u32.to_ne_bytes()); // minor
        out.extend_from_slice(&0u32.to_ne_bytes()); // max_readahead
        out.extend_from_slice(&0u32.to_ne_bytes()); // flags
        out.extend_from_slice(&1u16.to_ne_bytes()); // max_background
        out.extend_from_slice(&1u16.to_ne_bytes()); // congestion_threshold
        out.extend_from_slice(&4096u32.to_ne_bytes()); // max_write
        out.extend_from_slice(&1u32.to_ne_bytes()); // time_gran
        out.resize(80, 0); // max_pages, map_alignment, flags2, unused
        if libc::write(fd, out.as_ptr().cast(), out.len()) != 80 {
            return Err(err("answering FUSE_INIT"));
        }
        match libc::fork() {
            -1 => return Err(err("fork")),
            0 => {
                // The server: takes every request off the queue, answers none.
                loop {
                    if libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) < 0 {
                        libc::pause();
                    }
                }
            }
            _ => {}
        }
        println!("fuse-hang: looking up a file nobody will answer for");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let file = CString::new(format!("{dir}/x")).map_err(|e| e.to_string())?;
        let mut st: libc::stat = std::mem::zeroed();
        libc::stat(file.as_ptr(), &mut st);
    }
    Err("the lookup was answered".into())
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("fuse-hang") {
        let dir = std::env::args()
            .nth(2)
            .unwrap_or_else(|| "/tmp/hang".into());
        if let Err(e) = fuse_hang(&dir) {
            println!("fuse-hang: {e}");
            std::process::exit(1);
        }
        return;
    }
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
    if let Some(addr) = cmdline
        .split_whitespace()
        .find_map(|p| p.strip_prefix("test_init.net="))
    {
        let bytes = cmdline
            .split_whitespace()
            .find_map(|p| p.strip_prefix("test_init.net_bytes="))
            .and_then(|b| b.parse().ok())
            .unwrap_or(10 << 20);
        match net(addr, bytes) {
            Ok(()) => say("net exchange ok"),
            Err(e) => say(&format!("net failed: {e}")),
        }
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
    serve_state();
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
