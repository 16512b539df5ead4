//! The reaper in a process of its own: its `waitpid(-1)` would steal the
//! children of any other test running beside it. For the same reason there
//! is one reaper and one test here, in phases.

use std::process::Command;
use std::time::Duration;

use husk_agent::reaper::{ExitStatus, Reaper};

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn reaper_reports_waited_children_and_collects_orphans() {
    let reaper = Reaper::new();
    tokio::spawn(reaper.clone().run());
    waiters_get_exit_codes_and_signals(&reaper).await;
    an_exit_before_registration_is_kept(&reaper).await;
    orphans_are_reaped(&reaper).await;
}

/// A child that ends and is reaped while its spawn is still in flight
/// (no lock is held across it) still reaches its waiter.
async fn an_exit_before_registration_is_kept(reaper: &Reaper) {
    let (_, rx) = reaper
        .register_with(|| {
            let child = Command::new("sh").args(["-c", "exit 7"]).spawn()?;
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            // Reap it ourselves before the registration, as the reaper's
            // task would on SIGCHLD.
            let deadline = std::time::Instant::now() + T;
            while reaper.reap() == 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::io::Result::Ok(pid)
        })
        .unwrap();
    assert_eq!(
        tokio::time::timeout(T, rx).await.unwrap().unwrap(),
        ExitStatus(7)
    );
}

/// Spawned children report their own statuses through the reaper.
async fn waiters_get_exit_codes_and_signals(reaper: &Reaper) {
    let (_, ok) = reaper.spawn(&mut Command::new("true")).unwrap();
    let (_, three) = reaper
        .spawn(Command::new("sh").args(["-c", "exit 3"]))
        .unwrap();
    let (pid, killed) = reaper.spawn(Command::new("sleep").arg("30")).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(
        tokio::time::timeout(T, ok).await.unwrap().unwrap(),
        ExitStatus(0)
    );
    assert_eq!(
        tokio::time::timeout(T, three).await.unwrap().unwrap(),
        ExitStatus(3)
    );
    assert_eq!(
        tokio::time::timeout(T, killed).await.unwrap().unwrap(),
        ExitStatus(137)
    );
}

/// Orphans re-parented to us (as they would be to PID 1) are reaped too:
/// 200 of them, and no zombie is left.
async fn orphans_are_reaped(reaper: &Reaper) {
    // SAFETY: prctl with integer arguments only.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    // The shell starts 200 background children and exits at once; they
    // finish later, as orphans.
    let (_, sh) = reaper
        .spawn(Command::new("sh").args([
            "-c",
            "i=0; while [ $i -lt 200 ]; do sleep 0.3 & i=$((i+1)); done; exit 0",
        ]))
        .unwrap();
    assert_eq!(
        tokio::time::timeout(T, sh).await.unwrap().unwrap(),
        ExitStatus(0)
    );
    let me = std::process::id().to_string();
    let deadline = std::time::Instant::now() + T;
    loop {
        let children: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| {
                let pid = e.ok()?.file_name().into_string().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let after = &stat[stat.rfind(')')? + 2..];
                let mut f = after.split(' ');
                let state = f.next()?;
                (f.next()? == me).then(|| format!("{pid}:{state}"))
            })
            .collect();
        if children.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still children of ours: {children:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
