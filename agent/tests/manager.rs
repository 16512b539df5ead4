//! The container manager in a process of its own (its reaper's
//! `waitpid(-1)` would take other tests' children), re-run under
//! `unshare --mount` with a cgroup2 hierarchy of its own on /sys/fs/cgroup
//! (the agent's cgroups; the host may have v1 there). Needs root.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use husk_agent::container::manager::{Hooks, Manager, ManagerError};
use husk_agent::container::stdio::Hub;
use husk_agent::reaper::Reaper;
use serde_json::json;

const INNER: &str = "HUSK_MANAGER_TEST_INNER";
const T: Duration = Duration::from_secs(10);

#[test]
fn manager() {
    if std::env::var_os(INNER).is_none() {
        let out = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "manager", "--nocapture", "--test-threads=1"])
            .env(INNER, "1")
            .status()
            .unwrap();
        assert!(out.success(), "the test under unshare: {out}");
        return;
    }
    nix::mount::mount(
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mounting cgroup2");
    // The cgroup2 hierarchy outlives this namespace: clear what a failed
    // earlier run left.
    for id in ["slow", "fast", "leaky", "all", "held", "unstarted"] {
        let dir = Path::new("/sys/fs/cgroup/husk").join(id);
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        let deadline = Instant::now() + T;
        while dir.exists() && std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let share = busybox_share();
            // One reaper for the process, as in the agent.
            let reaper = Reaper::new();
            tokio::spawn(reaper.clone().run());
            slow_start_blocks_nobody_else(share.path(), &reaper).await;
            failure_after_the_child_exists_kills_it(share.path(), &reaper).await;
            signal_all_reaches_orphans(share.path(), &reaper).await;
            created_processes_are_held_until_started(share.path(), &reaper).await;
        });
}

fn busybox_share() -> tempfile::TempDir {
    let share = tempfile::tempdir().unwrap();
    let root = share.path().join("rootfs");
    for d in ["bin", "proc", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static: run tools/setup");
    for a in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    share
}

fn spec(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}]}
    }))
    .unwrap()
}

fn manager_with(share: &Path, reaper: &Reaper, hooks: Hooks) -> Manager {
    let m = Manager::new(reaper.clone(), Hub::default()).with_hooks(hooks);
    m.set_share(Some(share.to_path_buf()));
    m
}

/// Kills the container's processes and removes it once its exit is in.
async fn kill_and_remove(m: &Manager, id: &str) {
    let _ = m.signal(id, "", 9, true);
    let deadline = Instant::now() + T;
    while let Err(e) = m.remove(id).await {
        assert!(Instant::now() < deadline, "removing {id}: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A start held before its clone (a slow exec over virtio-fs, a hung
/// mount) stops neither another container's start and calls nor the reaper.
async fn slow_start_blocks_nobody_else(share: &Path, reaper: &Reaper) {
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let g = gate.clone();
    let hooks = Hooks {
        before_start: Some(Arc::new(move |id: &str, _: &str| {
            if id == "slow" {
                let (open, cv) = &*g;
                let mut o = open.lock().unwrap();
                while !*o {
                    o = cv.wait(o).unwrap();
                }
            }
        })),
        after_start: None,
    };
    let m = manager_with(share, reaper, hooks);
    m.create("slow", &spec(&["sleep", "30"]), false, false)
        .unwrap();
    m.create("fast", &spec(&["sleep", "30"]), false, false)
        .unwrap();
    let slow = tokio::spawn({
        let m = m.clone();
        async move { m.start("slow").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The slow one is starting: calls on it answer at once, refused.
    let e = m.signal("slow", "", 15, false).unwrap_err();
    assert!(
        matches!(
            e,
            ManagerError::State {
                state: "starting",
                ..
            }
        ),
        "{e}"
    );
    assert!(m.remove("slow").await.is_err());
    // The other container starts and answers meanwhile.
    tokio::time::timeout(T, m.start("fast"))
        .await
        .expect("a start waited for another container's")
        .unwrap();
    assert!(!m.pids("fast").unwrap().is_empty());
    assert!(!slow.is_finished());
    // Let it go: it starts.
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    tokio::time::timeout(T, slow)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!m.pids("slow").unwrap().is_empty());
    kill_and_remove(&m, "fast").await;
    kill_and_remove(&m, "slow").await;
}

/// A step failing once the child exists kills it and records its exit:
/// WaitProcess answers (137) and RemoveContainer goes ahead.
async fn failure_after_the_child_exists_kills_it(share: &Path, reaper: &Reaper) {
    let hooks = Hooks {
        before_start: None,
        after_start: Some(Arc::new(|_: &str, _: &str| Err("injected".to_string()))),
    };
    let m = manager_with(share, reaper, hooks);
    m.create("leaky", &spec(&["sleep", "30"]), false, false)
        .unwrap();
    let e = m.start("leaky").await.unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    let code = tokio::time::timeout(T, m.wait("leaky", ""))
        .await
        .expect("the failed start's process was left running")
        .unwrap();
    assert_eq!(code, 137);
    m.remove("leaky").await.unwrap();
}

/// SignalProcess with `all` signals every process in the container's
/// cgroup, an orphan left by a shell that exited included (not SIGKILL:
/// that path is cgroup.kill, used by kill_and_remove).
async fn signal_all_reaches_orphans(share: &Path, reaper: &Reaper) {
    let m = manager_with(share, reaper, Hooks::default());
    let script = "sh -c 'sleep 30 &'; trap 'exit 0' TERM; sleep 30 & wait";
    m.create("all", &spec(&["sh", "-c", script]), false, false)
        .unwrap();
    m.start("all").await.unwrap();
    let deadline = Instant::now() + T;
    while m.pids("all").unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "{:?}", m.pids("all"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m.signal("all", "", 15, true).unwrap();
    while !m.pids("all").unwrap().is_empty() {
        assert!(Instant::now() < deadline, "left: {:?}", m.pids("all"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill_and_remove(&m, "all").await;
}

/// The executable a process runs now, once it is there.
async fn exe_of(pid: u32) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default()
}

/// CreateContainer sets the container's process up and holds it before its
/// exec, as runc's create does: it is in the container's cgroup, still the
/// agent's program, holding nothing of the agent's but its stdio and its two
/// pipes (a pipe of another process kept open there would hold that
/// process's output open for as long as it waits). StartContainer lets it
/// exec; RemoveContainer of one never started kills it and its cgroup goes.
async fn created_processes_are_held_until_started(share: &Path, reaper: &Reaper) {
    let m = manager_with(share, reaper, Hooks::default());
    let held_pid = |id: &'static str| {
        let m = m.clone();
        async move {
            let deadline = Instant::now() + T;
            loop {
                if let Some(pid) = m.pids(id).unwrap().first() {
                    return *pid;
                }
                assert!(
                    Instant::now() < deadline,
                    "{id} has no process after create"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let agent_exe = std::env::current_exe().unwrap();
    for id in ["held", "unstarted"] {
        m.create(id, &spec(&["sleep", "30"]), false, false).unwrap();
    }
    let pid = held_pid("held").await;
    // Set up, not yet exec'd: give it time to go past its hold if it would.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        exe_of(pid).await,
        agent_exe,
        "the held process exec'd before its start"
    );
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds <= 5, "a held process keeps {fds} descriptors");
    let e = m.wait("held", "").await.unwrap_err();
    assert!(
        matches!(
            e,
            ManagerError::State {
                state: "created",
                ..
            }
        ),
        "{e}"
    );
    m.start("held").await.unwrap();
    assert_eq!(
        m.pids("held").unwrap(),
        vec![pid],
        "the started process is the held one"
    );
    assert!(
        exe_of(pid).await.ends_with("busybox"),
        "{:?}",
        exe_of(pid).await
    );
    kill_and_remove(&m, "held").await;

    let unstarted = held_pid("unstarted").await;
    m.remove("unstarted").await.unwrap();
    let deadline = Instant::now() + T;
    while Path::new(&format!("/proc/{unstarted}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the unstarted process outlived its container"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!Path::new("/sys/fs/cgroup/husk/unstarted").exists());
    assert!(matches!(
        m.start("unstarted").await.unwrap_err(),
        ManagerError::NotFound(_)
    ));
}
