//! The `--net` flag as the runtime uses it, through the husk-vmm binary:
//! bad specs and fds that are not taps end husk-vmm with 1 and a message
//! naming the problem, before any KVM work. (A VM with a NIC runs in the
//! test host: `tests/tests/vmm.rs`, `vmm_net_carries_tcp_both_ways_byte_exact`.)

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// husk-vmm with `args`, `fd` inherited as fd 900 when given: (status, stderr).
fn vmm(args: &[&str], fd: Option<&OwnedFd>) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_husk-vmm"));
    cmd.args(["--kernel", "/nonexistent/vmlinux", "--no-seccomp"])
        .args(args);
    if let Some(fd) = fd {
        let raw = fd.as_raw_fd();
        // SAFETY: dup2 in the forked child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 900) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_net_specs_are_refused_with_the_reason() {
    for (spec, why) in [
        ("fd=5", "mac=AA:BB:CC:DD:EE:FF is required"),
        ("fd=1,mac=02:00:00:00:00:01", "3 or more"),
        ("fd=5,mac=ff:ff:ff:ff:ff:ff", "multicast"),
        ("fd=5,mac=02:00:00:00:00:01,mtu=40", "68..=65535"),
    ] {
        let (code, err) = vmm(&["--net", spec], None);
        assert_ne!(code, Some(0), "{spec}");
        assert!(err.contains(why), "{spec}: {err}");
    }
    // The same fd twice.
    let (code, err) = vmm(
        &[
            "--net",
            "fd=5,mac=02:00:00:00:00:01",
            "--net",
            "fd=5,mac=02:00:00:00:00:02",
        ],
        None,
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("fd 5 is named twice"), "{err}");
}

#[test]
fn an_fd_that_is_not_a_tap_is_refused_before_anything_runs() {
    let (r, _w) = nix::unistd::pipe().unwrap();
    let (code, err) = vmm(&["--net", "fd=900,mac=02:00:00:00:00:01"], Some(&r));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("fd 900 is not a tap"), "{err}");
    // Not inherited at all (a number no runner hands down).
    let (code, err) = vmm(&["--net", "fd=900,mac=02:00:00:00:00:01"], None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("fd 900 is not open"), "{err}");
}
