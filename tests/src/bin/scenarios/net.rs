//! The `vmm-net` scenario (pulled into husk-scenario with `#[path]`; in a
//! folder of its own so cargo does not take it for a binary): a tap in the
//! test host with 10.0.2.1/24, husk-vmm with `--net fd=3,mac=..`, and
//! husk-test-init configuring eth0 as 10.0.2.2 and exchanging 10 MiB each
//! way with a TCP server here, byte-exact; ICMP echo to the guest; the
//! throughput of each direction is printed. A second VM with `tx-bps` and
//! `rx-bps` shows the limiter holding the rate.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST_ADDR: &str = "10.0.2.1";
const GUEST_ADDR: &str = "10.0.2.2";
const MAC: &str = "02:00:0a:00:02:02";

/// `struct ifreq`: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A new tap as the runtime makes one (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR),
/// with HOST_ADDR/24 and up; its name.
fn make_tap() -> Result<(OwnedFd, String)> {
    if !Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun is missing: the test host did not load tun");
    }
    // SAFETY: open(2) of a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    ensure!(
        fd >= 0,
        "opening /dev/net/tun: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just opened and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..10].copy_from_slice(b"husknet%d\0");
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
    let r = unsafe { libc::ioctl(fd, libc::TUNSETIFF as _, &mut req as *mut IfReq) };
    ensure!(r == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    let len = req.name.iter().position(|&b| b == 0).unwrap_or(16);
    let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
    for args in [
        vec!["addr", "add", &format!("{HOST_ADDR}/24"), "dev", &name],
        vec!["link", "set", &name, "up"],
    ] {
        let out = std::process::Command::new("ip").args(&args).output()?;
        ensure!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((owned, name))
}

/// The bytes each side sends: the same function as husk-test-init's.
fn pattern(seed: u8, i: usize) -> u8 {
    (i as u32)
        .wrapping_mul(2_654_435_761)
        .wrapping_add(u32::from(seed)) as u8
        ^ (i >> 13) as u8
}

fn icmp_checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ICMP echo to `addr` `count` times over a raw socket (this runs as root
/// in the test host, which has no ping): the round trips that came back.
fn ping(addr: std::net::Ipv4Addr, count: u16) -> Result<Vec<Duration>> {
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    ensure!(
        fd >= 0,
        "raw ICMP socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just made and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval, which `tv` is.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    let mut rtts = Vec::new();
    for seq in 0..count {
        let mut pkt = [0u8; 64];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&0x4855u16.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        let c = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        let t = Instant::now();
        // SAFETY: sendto(2) from `pkt` to `dst`, both valid for the call.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        ensure!(
            n == pkt.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        // Replies come with their IP header; skip anything not ours.
        let deadline = t + Duration::from_secs(2);
        while Instant::now() < deadline {
            let mut buf = [0u8; 256];
            // SAFETY: recv(2) into `buf`, valid for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                break;
            }
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            let icmp = &buf[ihl.min(n as usize)..n as usize];
            if icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == 0x4855u16.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
                && buf[12..16] == addr.octets()
            {
                rtts.push(t.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(rtts)
}

/// Boots husk-vmm with the tap as fd 3 and `--net fd=3,mac=MAC{extra}`.
fn start_vm(
    kernel: &Path,
    initramfs: &Path,
    tap: &OwnedFd,
    extra: &str,
    bytes: usize,
    console: &Path,
) -> Result<tokio::process::Child> {
    let tap_raw = tap.as_raw_fd();
    let mut cmd = tokio::process::Command::new(husk_tests::vm::vmm_binary());
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .args(["--vcpus", "2", "--memory-mib", "256", "--extra-cmdline"])
        .arg(format!(
            "test_init.net={GUEST_ADDR} test_init.net_bytes={bytes}"
        ))
        .arg("--net")
        .arg(format!("fd=3,mac={MAC},mtu=1500{extra}"))
        .arg("--serial-out")
        .arg(console)
        .kill_on_drop(true);
    // SAFETY: dup2 in the forked child, before exec; async-signal-safe. The
    // copy at 3 has no FD_CLOEXEC, so husk-vmm inherits it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(tap_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().context("starting husk-vmm")
}

/// One exchange with the guest: (guest -> host, host -> guest) durations.
async fn exchange(
    listener: &tokio::net::TcpListener,
    bytes: usize,
    console: &Path,
) -> Result<(Duration, Duration)> {
    let (mut s, peer) =
        match tokio::time::timeout(Duration::from_secs(180), listener.accept()).await {
            Ok(r) => r?,
            Err(_) => bail!(
                "the guest never connected; console:\n{}",
                std::fs::read_to_string(console).unwrap_or_default()
            ),
        };
    ensure!(
        peer.ip().to_string() == GUEST_ADDR,
        "a connection from {peer}, not the guest"
    );
    s.set_nodelay(true)?;
    // The guest starts sending on this byte: the clock covers every byte,
    // however late this process got to accept.
    s.write_all(b"G").await?;
    let t = Instant::now();
    let mut got = vec![0u8; bytes];
    tokio::time::timeout(Duration::from_secs(300), s.read_exact(&mut got))
        .await
        .context("guest -> host stalled")??;
    let up = t.elapsed();
    if let Some(i) = (0..bytes).find(|&i| got[i] != pattern(1, i)) {
        bail!("guest -> host: byte {i} of {bytes} differs");
    }
    let out: Vec<u8> = (0..bytes).map(|i| pattern(2, i)).collect();
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(300), s.write_all(&out))
        .await
        .context("host -> guest stalled")??;
    let mut answer = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(300), s.read_exact(&mut answer))
        .await
        .context("no answer from the guest")??;
    let down = t.elapsed();
    ensure!(
        &answer == b"OK\n",
        "host -> guest: the guest says {answer:?}"
    );
    Ok((up, down))
}

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / f64::from(1u32 << 20) / d.as_secs_f64()
}

pub async fn vmm_net(kernel: &Path, initramfs: &Path, bytes: usize) -> Result<()> {
    let (tap, name) = make_tap()?;
    let listener = tokio::net::TcpListener::bind((HOST_ADDR, 5555)).await?;
    let dir = tempfile::tempdir()?;
    let console = dir.path().join("console.log");
    let mut vm = start_vm(kernel, initramfs, &tap, "", bytes, &console)?;
    let (up, down) = exchange(&listener, bytes, &console).await?;
    vm.wait_console(&console, "test-init: net exchange ok")
        .await?;
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    let nic = out
        .lines()
        .find_map(|l| l.strip_prefix("test-init: net eth0 "))
        .unwrap_or_default();
    ensure!(
        nic == format!("mac {MAC} mtu 1500"),
        "the guest's eth0: {nic:?}"
    );
    println!(
        "vmm-net: {} MiB each way byte-exact over {name}: guest -> host {:.1} MiB/s, host -> guest {:.1} MiB/s",
        bytes >> 20,
        mib_s(bytes, up),
        mib_s(bytes, down)
    );
    let rtts = tokio::task::spawn_blocking(|| ping(GUEST_ADDR.parse().unwrap(), 5)).await??;
    ensure!(rtts.len() >= 4, "ICMP echo: {} of 5 answered", rtts.len());
    let mut sorted = rtts.clone();
    sorted.sort();
    println!(
        "vmm-net: ICMP echo {}/5 answered, median round trip {:?}",
        rtts.len(),
        sorted[sorted.len() / 2]
    );
    stop(vm).await?;

    // The limiter: 2 MB/s each way, a quarter of the bytes.
    let limit = 2_000_000usize;
    let small = bytes / 4;
    let console2 = dir.path().join("console2.log");
    let vm = start_vm(
        kernel,
        initramfs,
        &tap,
        &format!(",rx-bps={limit},tx-bps={limit}"),
        small,
        &console2,
    )?;
    let (up, down) = exchange(&listener, small, &console2).await?;
    let (r_up, r_down) = (
        small as f64 / up.as_secs_f64(),
        small as f64 / down.as_secs_f64(),
    );
    println!(
        "vmm-net: rate limit {limit} B/s each way: guest -> host {:.0} B/s, host -> guest {:.0} B/s",
        r_up, r_down
    );
    // The bucket starts full (a tenth of a second) and TCP adds its own
    // waits: the rate may fall below the limit but never far above it.
    for (what, r) in [("guest -> host", r_up), ("host -> guest", r_down)] {
        ensure!(
            r <= limit as f64 * 1.15,
            "{what}: {r:.0} B/s through a {limit} B/s limit"
        );
    }
    stop(vm).await?;
    drop(tap);
    Ok(())
}

async fn stop(mut vm: tokio::process::Child) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.id().context("pid")? as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = tokio::time::timeout(Duration::from_secs(30), vm.wait())
        .await
        .context("husk-vmm still runs 30 s after SIGTERM")??;
    ensure!(status.success(), "SIGTERM ended husk-vmm with {status}");
    Ok(())
}

trait WaitConsole {
    async fn wait_console(&mut self, console: &Path, what: &str) -> Result<()>;
}

impl WaitConsole for tokio::process::Child {
    async fn wait_console(&mut self, console: &Path, what: &str) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let out = std::fs::read_to_string(console).unwrap_or_default();
            if out.contains(what) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!("husk-vmm ended with {status} before {what:?}:\n{out}");
            }
            ensure!(Instant::now() < end, "no {what:?} on the console:\n{out}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
