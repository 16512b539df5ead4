//! Containers built by the agent's code, on this machine: a busybox rootfs in
//! a temporary "share", new namespaces, pivot_root, the user, exec. (In the
//! guest the same code runs as PID 1 over the virtio-fs share.)

use std::io::Read;
use std::path::Path;

use husk_agent::container::process::{self, ContainerError, Stage, Stdio};
use husk_agent::container::spec::{self, ValidSpec};
use nix::sys::wait::{waitpid, WaitStatus};
use serde_json::{json, Value};

/// Held while a test copies an executable and while one clones: a child
/// cloned while a copy's write fd is open holds it until it execs, and the
/// copy's exec then fails with ETXTBSY (tests run on parallel threads).
static CLONES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn clone_lock() -> std::sync::MutexGuard<'static, ()> {
    CLONES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A busybox rootfs under `share/rootfs`, from Debian's busybox-static.
fn busybox_share() -> tempfile::TempDir {
    let _clones = clone_lock();
    let share = tempfile::tempdir().unwrap();
    let root = share.path().join("rootfs");
    for d in ["bin", "proc", "dev", "tmp", "etc", "work"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static: run tools/setup");
    for a in [
        "sh", "echo", "cat", "id", "pwd", "hostname", "touch", "ls", "sleep", "tty", "mkdir",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
    share
}

fn spec_json(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "hostname": "husk-test",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]}
    })
}

fn valid(v: &Value) -> ValidSpec {
    spec::validate(serde_json::to_string(v).unwrap().as_bytes()).unwrap()
}

/// Runs the container to its end: (exit code, stdout, stderr).
fn run(share: &Path, v: &Value) -> Result<(i32, String, String), ContainerError> {
    let (out_r, out_w) = process::pipe().unwrap();
    let (err_r, err_w) = process::pipe().unwrap();
    let stdio = Stdio {
        stdin: process::null_stdin().unwrap(),
        stdout: out_w,
        stderr: err_w,
        console: None,
    };
    let pid = {
        let _clones = clone_lock();
        process::prepare(&valid(v), &share.join("rootfs"), share, stdio, None, &[])?.release()?
    };
    let mut out = String::new();
    let mut err = String::new();
    std::fs::File::from(out_r).read_to_string(&mut out).unwrap();
    std::fs::File::from(err_r).read_to_string(&mut err).unwrap();
    let code = match waitpid(pid, None).unwrap() {
        WaitStatus::Exited(_, c) => c,
        WaitStatus::Signaled(_, s, _) => 128 + s as i32,
        other => panic!("{other:?}"),
    };
    Ok((code, out, err))
}

#[test]
fn exit_codes_output_and_namespaces() {
    let share = busybox_share();
    let (code, out, err) = run(
        share.path(),
        &spec_json(&["sh", "-c", "echo hi; echo oops >&2; echo pid=$$; hostname; ls /proc/1/ >/dev/null && echo proc; exit 3"]),
    )
    .unwrap();
    assert_eq!(code, 3, "{out}{err}");
    assert_eq!(out, "hi\npid=1\nhusk-test\nproc\n");
    assert_eq!(err, "oops\n");
    // The host kept its hostname and its mounts.
    assert_ne!(nix::unistd::gethostname().unwrap(), "husk-test");
}

#[test]
fn user_groups_cwd_and_env() {
    let share = busybox_share();
    // The image's own /etc/passwd and /etc/group add groups 30 and 40 and
    // a HOME, as runc does.
    let etc = share.path().join("rootfs/etc");
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0::/:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        etc.join("group"),
        "root:x:0:\nstaff:x:30:app\ndev:x:40:root,app\nother:x:50:root\n",
    )
    .unwrap();
    let mut v = spec_json(&[
        "sh",
        "-c",
        "id -u; id -g; id -G; pwd; echo $FOO; echo $HOME",
    ]);
    v["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [10, 20]});
    v["process"]["cwd"] = json!("/work");
    v["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    let (code, out, err) = run(share.path(), &v).unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "1000\n1001\n1001 10 20 30 40\n/work\nbar baz\n/home/app\n"
    );
}

#[test]
fn read_only_root_and_a_volume() {
    let share = busybox_share();
    std::fs::create_dir_all(share.path().join("volumes/data")).unwrap();
    std::fs::write(share.path().join("volumes/data/in.txt"), "from the host\n").unwrap();
    let mut v = spec_json(&["sh", "-c", "cat /data/in.txt; echo out > /data/out.txt; touch /rootfs-write 2>/dev/null && echo writable || echo read-only"]);
    v["root"]["readonly"] = json!(true);
    v["mounts"].as_array_mut().unwrap().push(json!({"destination": "/data", "type": "bind", "source": "volumes/data", "options": ["rbind", "rw"]}));
    let (code, out, err) = run(share.path(), &v).unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "from the host\nread-only\n");
    assert_eq!(
        std::fs::read_to_string(share.path().join("volumes/data/out.txt")).unwrap(),
        "out\n"
    );
}

#[test]
fn a_missing_program_is_a_clear_error() {
    let share = busybox_share();
    match run(share.path(), &spec_json(&["/no/such/program"])) {
        Err(ContainerError::Start {
            stage: Stage::Exec,
            errno,
            detail,
        }) => {
            assert_eq!(errno, nix::errno::Errno::ENOENT);
            assert!(detail.unwrap().contains("/no/such/program"));
        }
        other => panic!("{other:?}"),
    }
    let mut v = spec_json(&["sh"]);
    v["process"]["cwd"] = json!("/no/such/dir");
    assert!(matches!(
        run(share.path(), &v),
        Err(ContainerError::Start {
            stage: Stage::Cwd,
            ..
        })
    ));
}

/// A terminal made in the container's own devpts: the master comes back
/// over the console socket, and inside, `tty` names a device that exists
/// there (ttyname works), stdin and stdout are that terminal.
#[test]
fn a_terminal_lives_in_the_containers_devpts() {
    let share = busybox_share();
    let mut v = spec_json(&["sh", "-c", "tty; [ -t 0 ] && [ -t 1 ] && echo both-tty"]);
    v["process"]["terminal"] = json!(true);
    let (ours, theirs) = process::console_pair().unwrap();
    let null = || process::null_stdin().unwrap();
    let stdio = Stdio {
        stdin: null(),
        stdout: null(),
        stderr: null(),
        console: Some(theirs),
    };
    let pid = {
        let _clones = clone_lock();
        process::prepare(
            &valid(&v),
            &share.path().join("rootfs"),
            share.path(),
            stdio,
            None,
            &[],
        )
        .and_then(process::Held::release)
        .unwrap()
    };
    let master = process::receive_console(&ours).unwrap();
    let code = match waitpid(pid, None).unwrap() {
        WaitStatus::Exited(_, c) => c,
        other => panic!("{other:?}"),
    };
    // The slave is closed: read what is buffered until EIO.
    let mut out = Vec::new();
    let mut f = std::fs::File::from(master);
    let mut buf = [0u8; 4096];
    while let Ok(n) = f.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("/dev/pts/0"), "tty inside: {out:?}");
    assert!(out.contains("both-tty"), "{out:?}");
}

/// The spec's seccomp profile applies: an errno rule answers with its errno,
/// the default allows the rest.
#[test]
fn a_seccomp_profile_applies() {
    use husk_agent::container::seccomp;
    let share = busybox_share();
    let mut v = spec_json(&[
        "sh",
        "-c",
        "echo before; touch /tmp/f && echo touched; mkdir /tmp/d || echo mkdir-refused",
    ]);
    v["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]
    });
    let spec = valid(&v);
    let filters = seccomp::compile(spec.seccomp.as_ref().unwrap()).unwrap();
    let (out_r, out_w) = process::pipe().unwrap();
    let (err_r, err_w) = process::pipe().unwrap();
    let stdio = Stdio {
        stdin: process::null_stdin().unwrap(),
        stdout: out_w,
        stderr: err_w,
        console: None,
    };
    let pid = {
        let _clones = clone_lock();
        process::prepare(
            &spec,
            &share.path().join("rootfs"),
            share.path(),
            stdio,
            None,
            &filters,
        )
        .and_then(process::Held::release)
        .unwrap()
    };
    let (mut out, mut err) = (String::new(), String::new());
    std::fs::File::from(out_r).read_to_string(&mut out).unwrap();
    std::fs::File::from(err_r).read_to_string(&mut err).unwrap();
    let _ = waitpid(pid, None).unwrap();
    assert_eq!(out, "before\ntouched\nmkdir-refused\n", "{err}");
    assert!(
        err.contains("Permission denied"),
        "mkdir failed with EACCES: {err}"
    );
}

/// A user namespace: the spec's maps written by the parent before the
/// child goes on; root inside is an unprivileged id outside, and what the
/// host's root owns shows as the overflow id.
#[test]
fn a_user_namespace_maps_ids() {
    let share = busybox_share();
    let mut v = spec_json(&[
        "sh",
        "-c",
        "id -u; cat /proc/self/uid_map; ls -ln /bin/busybox; echo hi > /dev/null && echo dev-ok",
    ]);
    v["linux"]["namespaces"] =
        json!([{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "user"}]);
    v["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    v["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    let (code, out, err) = run(share.path(), &v).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "{out}");
    let map: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(map, ["0", "100000", "65536"], "{out}");
    assert!(
        lines[2].contains(" 65534 "),
        "host root shows as overflow: {out}"
    );
    assert_eq!(lines[3], "dev-ok", "{out}{err}");
    // Without maps a user namespace is refused, naming the field.
    v["linux"]["uidMappings"] = json!([]);
    let e = spec::validate(serde_json::to_string(&v).unwrap().as_bytes()).unwrap_err();
    assert_eq!(e.field, "linux.uidMappings");
}
