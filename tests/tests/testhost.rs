//! The test host itself: KVM works inside it, statuses and output come back,
//! hung VMs are killed on time, and no VM outlives its harness.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::testhost::{self, Mode, RunError, Spec};
use husk_tests::{procs, workspace_root};

fn bin(name: &str) -> String {
    let p = workspace_root().join("target/debug").join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace` first",
        p.display()
    );
    p.display().to_string()
}

/// No QEMU or virtiofsd started by this process is still alive.
fn assert_no_vm_children() {
    let me = std::process::id() as i32;
    let left: Vec<_> = procs::children_of(me)
        .into_iter()
        .filter(|p| p.comm.starts_with("qemu-system") || p.comm == "virtiofsd")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn kvm_works_in_the_test_host() {
    let script = format!(
        "set -e\n\
         test -c /dev/kvm\n\
         if [ -d /sys/module/kvm_amd ]; then echo npt=$(cat /sys/module/kvm_amd/parameters/npt); fi\n\
         {}\n",
        bin("husk-kvm-smoke")
    );
    let o = testhost::run(&Spec::new(script).timeout(Duration::from_secs(240))).unwrap();
    testhost::expect_success(&o).unwrap();
    assert!(
        o.output
            .contains("kvm-smoke: guest wrote \"Husk KVM OK\" and halted"),
        "{}",
        o.output
    );
    if let Mode::Nested { .. } = o.mode {
        // Without nested paging every L3 page fault is a shadow-paging round trip.
        assert!(
            o.output.contains("npt=Y") || o.output.contains("npt=1"),
            "{}",
            o.output
        );
    }
    assert_no_vm_children();
}

#[test]
fn status_and_output_come_back_in_order() {
    let o = testhost::run(&Spec::new(
        "for i in 1 2 3; do echo line $i; done; echo err >&2; exit 7",
    ))
    .unwrap();
    assert_eq!(o.status, 7);
    assert_eq!(o.output, "line 1\nline 2\nline 3\nerr\n");
    assert_no_vm_children();
}

#[test]
fn a_hung_command_is_killed_at_its_deadline() {
    let started = Instant::now();
    let err = testhost::run(&Spec::new("echo started; sleep 600").timeout(Duration::from_secs(60)))
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
    match err {
        RunError::Timeout { output, .. } => assert!(output.contains("started"), "{output}"),
        other => panic!("expected a timeout, got {other}"),
    }
    assert_no_vm_children();
}

/// An L2 whose heartbeat stops (as when QEMU's emulated SVM wedges it) is
/// found well before the script's deadline, started again, and reported
/// once the tries are spent; a script that merely hangs is not (above).
#[test]
fn a_silent_test_host_is_started_again_then_reported() {
    if testhost::detect::mode() == Mode::Direct {
        // No L2 here, so nothing can wedge: the hung-script test covers it.
        println!("direct mode: scripts run on this host, no L2 heartbeat to lose");
        return;
    }
    let started = Instant::now();
    let mut spec = Spec::new("touch /run/husk-testhost-nobeat; echo started; sleep 600")
        .timeout(Duration::from_secs(300));
    spec.wedge_after = Duration::from_secs(15);
    let err = testhost::run(&spec).unwrap_err();
    let took = started.elapsed();
    match err {
        RunError::L2Wedged { output, silent, .. } => {
            assert!(output.contains("started"), "{output}");
            assert!(silent >= spec.wedge_after, "{silent:?}");
        }
        other => panic!("expected a wedged L2, got {other}"),
    }
    // Each try: the L2's start plus the silence, far below the deadline.
    let bound = (Duration::from_secs(60) + spec.wedge_after) * testhost::TRIES as u32;
    assert!(took < bound, "took {took:?}");
    assert_no_vm_children();
}

/// SIGKILL the harness mid-run: its VM must die with it (PR_SET_PDEATHSIG).
#[test]
fn a_killed_harness_leaves_no_vm() {
    let mut h = Command::new(bin("husk-testhost"))
        .args(["run", "-t", "300", "--", "echo up; sleep 600"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let hpid = h.id() as i32;
    // Wait until the harness has started its VM (or its script, in direct mode).
    let deadline = Instant::now() + Duration::from_secs(120);
    let kids = loop {
        let kids = procs::children_of(hpid);
        if !kids.is_empty()
            && (testhost::detect::mode() == Mode::Direct
                || kids.iter().any(|p| p.comm.starts_with("qemu")))
        {
            break kids;
        }
        assert!(Instant::now() < deadline, "the harness started no VM");
        std::thread::sleep(Duration::from_millis(100));
    };
    h.kill().unwrap();
    h.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<_> = kids
            .iter()
            .filter(|k| {
                procs::all()
                    .iter()
                    .any(|p| p.pid == k.pid && p.cmdline == k.cmdline)
            })
            .collect();
        if alive.is_empty() || testhost::detect::mode() == Mode::Direct {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the harness died: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A host directory that the test host's own /tmp would hide (a checkout
/// under /tmp, say) is visible, read-only, when bound.
#[test]
fn bound_host_directories_are_visible_and_read_only() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::write(dir.path().join("hello"), "from the host\n").unwrap();
    let d = dir.path().display();
    let mut spec = Spec::new(format!(
        "cat {d}/hello; touch {d}/new 2>/dev/null && echo writable || echo read-only"
    ));
    spec.binds.push(dir.path().to_path_buf());
    let o = testhost::run(&spec).unwrap();
    testhost::expect_success(&o).unwrap();
    if let Mode::Nested { .. } = o.mode {
        assert_eq!(o.output, "from the host\nread-only\n");
        assert!(!dir.path().join("new").exists());
    } else {
        // Direct mode runs on this machine itself: nothing to bind.
        assert!(o.output.starts_with("from the host\n"), "{}", o.output);
    }
}
