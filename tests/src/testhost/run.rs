//! Running one script in the test host: virtiofsd + QEMU, streamed output,
//! exit status, a deadline, and no process left behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{assets, detect::Mode, initrd};

/// The line `init.sh` writes after the script, with its status.
const EXIT_MARKER: &str = "@@HUSK-TESTHOST-EXIT=";
/// The line `init.sh` writes first, once the L2 runs userspace.
const UP_MARKER: &str = "@@HUSK-TESTHOST-UP@@";

/// `virtiofsd` installed by `cargo install virtiofsd` (Debian 12 has no package).
pub fn virtiofsd_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HUSK_VIRTIOFSD") {
        return p.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    for p in [
        Path::new(&home).join(".cargo/bin/virtiofsd"),
        "/usr/libexec/virtiofsd".into(),
    ] {
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("virtiofsd")
}

/// What to run and under which limits.
#[derive(Debug, Clone)]
pub struct Spec {
    /// A shell script, run by `/bin/sh` in the test host.
    pub script: String,
    pub timeout: Duration,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Stream each output line to stderr as it arrives.
    pub echo: bool,
    /// Host directories to show read-only at the same path inside, beyond
    /// what the test host shows anyway; the current directory is always added.
    pub binds: Vec<PathBuf>,
    /// No heartbeat from the L2 for this long: it has wedged; start it again.
    pub wedge_after: Duration,
    /// A host directory shown writable at `/var/lib/husk/templates` inside
    /// (the runtime's VM templates): one test host's templates serve the
    /// next, as they would on one machine, instead of each L2 building its
    /// own. `None`: the L2's own, gone with it.
    pub templates: Option<PathBuf>,
}

/// Where test hosts keep the VM templates they share: beside the kernel
/// cache. Templates are keyed by the files they were made from, so
/// checkouts never use each other's, and those of a checkout that has gone
/// are pruned by the next template build.
pub fn default_templates_dir() -> PathBuf {
    husk_guest_image::kernel::default_cache_root().join("testhost-templates")
}

impl Spec {
    pub fn new(script: impl Into<String>) -> Self {
        Self {
            script: script.into(),
            timeout: Duration::from_secs(300),
            cpus: 2,
            memory_mib: 3072,
            echo: true,
            binds: Vec::new(),
            wedge_after: WEDGE_AFTER,
            templates: Some(default_templates_dir()),
        }
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
}

/// How a script ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The script's exit status.
    pub status: i32,
    /// Its stdout and stderr, merged, in order.
    pub output: String,
    /// Where it ran.
    pub mode: Mode,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the test host did not finish within {timeout:?}; output so far:\n{output}\n--- L2 console (last lines) ---\n{console}")]
    Timeout {
        timeout: Duration,
        output: String,
        console: String,
    },
    #[error("the test host VM ended without reporting an exit status ({status}); output:\n{output}\n--- L2 console (last lines) ---\n{console}\n--- qemu stderr ---\n{stderr}")]
    VmDied {
        status: String,
        output: String,
        console: String,
        stderr: String,
    },
    #[error("the test host never started ({TRIES} tries, {waited:?} each); L2 console:\n{console}\n--- qemu stderr ---\n{stderr}")]
    NeverStarted {
        waited: Duration,
        console: String,
        stderr: String,
    },
    #[error("the test host's kernel locked up ({TRIES} tries); output:\n{output}\n--- L2 console (last lines) ---\n{console}")]
    L2Lockup { output: String, console: String },
    #[error("the test host's kernel panicked ({TRIES} tries); output:\n{output}\n--- L2 console (last lines) ---\n{console}")]
    L2Panic { output: String, console: String },
    #[error("the test host stopped its heartbeat for {silent:?} ({TRIES} tries): the L2 wedged; output:\n{output}\n--- L2 console (last lines) ---\n{console}")]
    L2Wedged {
        silent: Duration,
        output: String,
        console: String,
    },
    #[error(transparent)]
    Setup(#[from] anyhow::Error),
}

/// A child that is killed and reaped when dropped, and dies with its parent.
struct Guard {
    name: &'static str,
    child: Child,
}

impl Guard {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        // SAFETY: pre_exec runs in the forked child before exec; prctl is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // If the harness dies (even by SIGKILL), the VM dies with it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name} ({cmd:?})"))?;
        Ok(Self { name, child })
    }

    fn wait_timeout(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + t;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            tracing::debug!(name = self.name, pid = self.child.id(), "killing");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let beat = std::str::from_utf8(BEAT).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.contains(beat)).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `spec` in the mode this machine needs.
pub fn run(spec: &Spec) -> Result<Outcome, RunError> {
    match super::detect::mode() {
        Mode::Direct => run_direct(spec),
        mode @ Mode::Nested { .. } => run_nested(spec, mode),
    }
}

fn run_direct(spec: &Spec) -> Result<Outcome, RunError> {
    let started = Instant::now();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(&spec.script).stdin(Stdio::null());
    let (status, output) = stream_child(cmd, spec)?;
    Ok(Outcome {
        status,
        output,
        mode: Mode::Direct,
        elapsed: started.elapsed(),
    })
}

/// Direct mode: merge stdout and stderr through one pipe, honour the deadline.
fn stream_child(mut cmd: Command, spec: &Spec) -> Result<(i32, String), RunError> {
    let (r, w) = std::io::pipe().context("pipe")?;
    cmd.stdout(w.try_clone().context("pipe")?).stderr(w);
    // The script runs in its own process group so a timeout kills all of it.
    cmd.process_group(0);
    let mut guard = Guard::spawn("script", &mut cmd)?;
    drop(cmd);
    let lines = spawn_reader(r, spec.echo);
    let deadline = Instant::now() + spec.timeout;
    let mut output = String::new();
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => output.push_str(&l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // SAFETY: plain kill(2) on the script's process group.
                unsafe { libc::kill(-(guard.child.id() as i32), libc::SIGKILL) };
                return Err(RunError::Timeout {
                    timeout: spec.timeout,
                    output,
                    console: String::new(),
                });
            }
        }
    }
    let status = guard.child.wait().context("waiting for the script")?;
    Ok((status.code().unwrap_or(128 + 9), output))
}

fn spawn_reader<R: Read + Send + 'static>(r: R, echo: bool) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    // The serial line discipline may add \r; drop it.
                    let line = String::from_utf8_lossy(&buf).replace('\r', "");
                    if echo && !line.starts_with(EXIT_MARKER) && !line.starts_with(UP_MARKER) {
                        let _ = std::io::stderr().write_all(line.as_bytes());
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// The binds for the kernel command line: the spec's, the current directory
/// and the workspace, absolute and free of the separators the line uses.
fn bind_list(spec: &Spec) -> Result<String> {
    let mut all: Vec<PathBuf> = spec.binds.clone();
    all.push(std::env::current_dir().context("current directory")?);
    all.push(crate::workspace_root());
    let mut out: Vec<String> = Vec::new();
    for p in all {
        let p = p
            .canonicalize()
            .with_context(|| format!("bind {}", p.display()))?;
        let s = p
            .to_str()
            .with_context(|| format!("bind {} is not UTF-8", p.display()))?
            .to_string();
        if s.contains([' ', ',', '\t', '\n', '"']) {
            bail!("bind {s:?}: paths with spaces, commas or quotes cannot pass the kernel command line");
        }
        if s != "/" && !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out.join(","))
}

/// One test host at a time on this machine: two TCG VMs on two cores would
/// each crawl past their deadlines. Held for the whole run.
const HOST_LOCK: &str = "/tmp/husk-testhost.lock";

/// Each run's directory in /tmp: its script, initrd, sockets and console.
const RUN_DIR_PREFIX: &str = "husk-testhost-";

/// Removes the run directories that runs killed before their cleanup left
/// (the harness SIGKILLed: its QEMU and virtiofsd die with it, by
/// PR_SET_PDEATHSIG, but the directory stays). Only under [`HOST_LOCK`],
/// where no other run can own one. Only directories of this user, never
/// through a symlink (/tmp is everyone's); what cannot be removed is left.
fn sweep_stale_run_dirs(parent: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to this process's effective uid.
    let (Ok(me), Ok(entries)) = (std::fs::metadata("/proc/self"), std::fs::read_dir(parent)) else {
        return 0;
    };
    let me = me.uid();
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(RUN_DIR_PREFIX) {
            continue;
        }
        let path = e.path();
        let ours =
            std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_dir() && m.uid() == me);
        if ours && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn run_nested(spec: &Spec, mode: Mode) -> Result<Outcome, RunError> {
    let _lock = husk_guest_image::cache::lock_file(Path::new(HOST_LOCK))
        .with_context(|| format!("locking {HOST_LOCK}"))?;
    let swept = sweep_stale_run_dirs(Path::new("/tmp"));
    if swept > 0 {
        tracing::info!(
            swept,
            "removed run directories that killed runs left in /tmp"
        );
    }
    let started = Instant::now();
    let cache = husk_guest_image::kernel::default_cache_root();
    let assets = assets::ensure(&cache)?;
    let dir = tempfile::Builder::new()
        .prefix(RUN_DIR_PREFIX)
        .tempdir_in("/tmp")
        .context("creating the run directory")?;
    let script = dir.path().join("run.sh");
    std::fs::write(&script, &spec.script).context("writing the script")?;
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, initrd::build(&assets)?).context("writing the initrd")?;
    let sock = dir.path().join("virtiofsd.sock");
    let console = dir.path().join("console.log");
    let ctx = Attempt {
        assets: &assets,
        script: &script,
        initrd: &initrd,
        sock: &sock,
        console: &console,
    };
    // The L2 says it is up before anything else, then beats every few
    // seconds. One that never comes up (a QEMU start that stalls on a loaded
    // machine, a hung L2 boot), whose kernel reports a soft lockup, or whose
    // heartbeat stops (the whole L2 wedged: QEMU 7.2's emulated SVM under
    // load) failed for this setup's reasons, not the test's: run the script
    // again in a new L2, loudly. A script that is slow or stuck while the L2
    // beats on is the test's failure and is not retried.
    for tries_left in (0..TRIES).rev() {
        let result = attempt(spec, &mode, &ctx, started);
        let why = match &result {
            Err(RunError::NeverStarted {
                waited,
                console,
                stderr,
            }) => format!("did not start within {waited:?}\n{console}\n{stderr}"),
            Err(RunError::L2Lockup { output, console }) => {
                format!("kernel reported a soft lockup\n{output}\n{console}")
            }
            Err(RunError::L2Panic { output, console }) => {
                format!("kernel panicked\n{output}\n{console}")
            }
            Err(RunError::L2Wedged {
                silent,
                output,
                console,
            }) => format!("stopped its heartbeat for {silent:?}\n{output}\n{console}"),
            _ => return result,
        };
        if tries_left == 0 {
            return result;
        }
        eprintln!("[testhost] the L2 {why}\n[testhost] running the script again in a new L2 ({tries_left} tries left)");
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&console);
    }
    unreachable!("the loop returns on its last try")
}

/// What one start of the L2 needs.
struct Attempt<'a> {
    assets: &'a assets::Assets,
    script: &'a Path,
    initrd: &'a Path,
    sock: &'a Path,
    console: &'a Path,
}

/// virtiofsd serving `dir` on `sock`; up once its socket is.
fn spawn_virtiofsd(sock: &Path, dir: &Path, readonly: bool) -> Result<Guard, RunError> {
    let mut vfs = Command::new(virtiofsd_path());
    vfs.arg("--socket-path")
        .arg(sock)
        .arg("--shared-dir")
        .arg(dir)
        // `always`: the L2 keeps file data in its page cache across opens.
        // With `auto` every open drops it, so each exec of a (65 MB debug)
        // husk binary and each restore of a template's memory file reads
        // it again through FUSE. Nothing changes these trees behind the
        // L2's back while it runs: the host root is read-only to it and
        // built before it starts, and the templates directory has no
        // writer but the L2 (test hosts take turns, HOST_LOCK).
        .args(["--sandbox", "none", "--cache", "always"])
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if readonly {
        vfs.arg("--readonly");
    }
    let mut guard = Guard::spawn("virtiofsd", &mut vfs)?;
    let sock_deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(s)) = guard.child.try_wait() {
            return Err(RunError::Setup(anyhow::anyhow!(
                "virtiofsd ({}) exited at start: {s}",
                dir.display()
            )));
        }
        if Instant::now() > sock_deadline {
            return Err(RunError::Setup(anyhow::anyhow!(
                "virtiofsd ({}) made no socket in 10 s",
                dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(guard)
}

/// How long the L2 may take to say it is up (it takes ~3-10 s).
const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// What the L2 kernel prints when a CPU is stuck: seen when a nested guest
/// wedges the L2's emulated SVM under load (with runc as well as husk-vmm,
/// so it is this setup's, not the code under test's).
const LOCKUP: &[u8] = b"soft lockup - CPU#";
/// What the L2 kernel prints as it dies. Seen once (CI, 2026-12-07) inside
/// the L2's kvm_amd, in `svm_vcpu_run` under QEMU's emulated SVM: a stack
/// overflow in the L2 kernel's page-fault entry while it ran a nested guest.
/// A KVM_RUN from user space must not panic a sound kernel, so this is the
/// emulation's failure and the script is run again, loudly.
const PANIC: &[u8] = b"Kernel panic - not syncing";
const LOCKUP_POLL: Duration = Duration::from_secs(5);
/// What `init.sh` writes to the console every 5 s once up.
const BEAT: &[u8] = b"@@HUSK-TESTHOST-BEAT@@";
/// No beat for this long: the L2 is wedged, not busy (a loaded L2 still
/// runs a shell loop every few seconds; wedges seen here were total).
pub const WEDGE_AFTER: Duration = Duration::from_secs(90);
/// Starts of the L2 per script, for this setup's own failures.
pub const TRIES: usize = 3;

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// What a look at the L2's console can find wrong with the L2 itself.
enum Sign {
    Lockup,
    Panic,
    Wedged(Duration),
}

impl Sign {
    fn into_error(self, output: String, console: String) -> RunError {
        match self {
            Sign::Lockup => RunError::L2Lockup { output, console },
            Sign::Panic => RunError::L2Panic { output, console },
            Sign::Wedged(silent) => RunError::L2Wedged {
                silent,
                output,
                console,
            },
        }
    }
}

/// Looks at the L2's console for a soft lockup and for the heartbeat.
fn look(
    console: &Path,
    wedge_after: Duration,
    up: bool,
    beats: &mut usize,
    last_beat: &mut Instant,
) -> Option<Sign> {
    let log = std::fs::read(console).unwrap_or_default();
    if count(&log, PANIC) > 0 {
        return Some(Sign::Panic);
    }
    if count(&log, LOCKUP) > 0 {
        return Some(Sign::Lockup);
    }
    let seen = count(&log, BEAT);
    if seen > *beats {
        (*beats, *last_beat) = (seen, Instant::now());
    } else if up && last_beat.elapsed() > wedge_after {
        return Some(Sign::Wedged(last_beat.elapsed()));
    }
    None
}

fn attempt(spec: &Spec, mode: &Mode, ctx: &Attempt, started: Instant) -> Result<Outcome, RunError> {
    let Attempt {
        assets,
        script,
        initrd,
        sock,
        console,
    } = *ctx;
    let virtiofsd = spawn_virtiofsd(sock, Path::new("/"), true)?;
    // The shared templates, writable (made here first: virtiofsd serves
    // only a directory that exists).
    let templates_sock = sock.with_file_name("templates.sock");
    let templates = match &spec.templates {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating {}", dir.display()))
                .map_err(RunError::Setup)?;
            Some(spawn_virtiofsd(&templates_sock, dir, false)?)
        }
        None => None,
    };
    let binds = bind_list(spec)?;
    let mem = format!("{}M", spec.memory_mib);
    let append = format!(
        "console=ttyS0 loglevel=4 panic=-1 mitigations=off husk_testhost.script={} husk_testhost.binds={binds} husk_testhost.templates={}",
        script.display(),
        u8::from(templates.is_some())
    );
    let mut q = husk_guest_image::qemu::base_command();
    q
        // -cpu max under TCG emulates SVM with nested paging: KVM works inside.
        .args([
            "-machine",
            "q35,accel=tcg,memory-backend=mem",
            "-cpu",
            "max",
        ])
        .args(["-smp", &spec.cpus.to_string(), "-m", &mem])
        // vhost-user needs guest memory that virtiofsd can map: a shared memfd.
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ])
        .arg("-kernel")
        .arg(assets.vmlinuz())
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .args([
            "-chardev",
            &format!("socket,id=vfs,path={}", sock.display()),
        ])
        .args(["-device", "vhost-user-fs-pci,chardev=vfs,tag=hostroot"]);
    if templates.is_some() {
        q.args([
            "-chardev",
            &format!("socket,id=tpl,path={}", templates_sock.display()),
        ])
        .args(["-device", "vhost-user-fs-pci,chardev=tpl,tag=templates"]);
    }
    q.args(["-serial", &format!("file:{}", console.display())])
        .args([
            "-chardev",
            "stdio,id=out,signal=off",
            "-serial",
            "chardev:out",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut qemu = Guard::spawn("qemu", &mut q)?;
    let lines = spawn_reader(qemu.child.stdout.take().context("qemu stdout")?, spec.echo);
    let mut stderr_pipe = qemu.child.stderr.take().context("qemu stderr")?;
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });

    let deadline = Instant::now() + spec.timeout;
    let up_deadline = Instant::now() + UP_TIMEOUT.min(spec.timeout);
    let mut up = false;
    let mut output = String::new();
    let mut status = None;
    let (mut beats, mut last_beat) = (0, Instant::now());
    let mut looked: Option<Instant> = None;
    loop {
        let until = if up { deadline } else { up_deadline };
        // Wake at least every few seconds to look at the L2's console.
        let wait = until
            .saturating_duration_since(Instant::now())
            .min(LOCKUP_POLL);
        if looked.is_some_and(|t| t.elapsed() < LOCKUP_POLL) {
            // Output lines arrive faster than the console needs a look.
        } else if let Some(sign) = look(console, spec.wedge_after, up, &mut beats, &mut last_beat) {
            drop(qemu);
            drop((virtiofsd, templates));
            return Err(sign.into_error(output, tail(console, 40)));
        } else {
            looked = Some(Instant::now());
        }
        match lines.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < until => continue,
            Ok(l) => {
                if l.trim() == UP_MARKER {
                    up = true;
                    last_beat = Instant::now();
                    continue;
                }
                if let Some(rest) = l.trim().strip_prefix(EXIT_MARKER) {
                    status = rest.trim_end_matches("@@").parse::<i32>().ok();
                    break;
                }
                output.push_str(&l);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if !up => {
                drop(qemu);
                drop((virtiofsd, templates));
                return Err(RunError::NeverStarted {
                    waited: UP_TIMEOUT.min(spec.timeout),
                    console: tail(console, 40),
                    stderr: stderr_reader.join().unwrap_or_default(),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                drop(qemu);
                drop((virtiofsd, templates));
                return Err(RunError::Timeout {
                    timeout: spec.timeout,
                    output,
                    console: tail(console, 40),
                });
            }
        }
    }
    // The VM powers itself off after the marker; give it a moment, then insist.
    let vm_status = qemu.wait_timeout(Duration::from_secs(10));
    drop(qemu);
    drop((virtiofsd, templates));
    let stderr = stderr_reader.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Outcome {
            status,
            output,
            mode: mode.clone(),
            elapsed: started.elapsed(),
        }),
        // panic=-1: a panicking L2 reboots, and -no-reboot ends QEMU.
        None if count(&std::fs::read(console).unwrap_or_default(), PANIC) > 0 => {
            Err(RunError::L2Panic {
                output,
                console: tail(console, 40),
            })
        }
        None => Err(RunError::VmDied {
            status: vm_status.map_or("killed".into(), |s| s.to_string()),
            output,
            console: tail(console, 40),
            stderr,
        }),
    }
}

/// Fails unless the outcome's status is 0, showing the output.
pub fn expect_success(o: &Outcome) -> Result<()> {
    if !o.success() {
        bail!("script exited {} in {:?}:\n{}", o.status, o.mode, o.output);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_run_dirs_go_and_nothing_is_followed_or_taken_beside_them() {
        let tmp = tempfile::tempdir().unwrap();
        let stale = tmp.path().join(format!("{RUN_DIR_PREFIX}abc"));
        std::fs::create_dir_all(stale.join("sub")).unwrap();
        std::fs::write(stale.join("initrd.cpio"), b"x").unwrap();
        // A link with the prefix to someone's directory: the link may go,
        // what it points at stays.
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep"), b"k").unwrap();
        let link = tmp.path().join(format!("{RUN_DIR_PREFIX}link"));
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let file = tmp.path().join(format!("{RUN_DIR_PREFIX}file"));
        std::fs::write(&file, b"f").unwrap();
        let other = tmp.path().join("other-dir");
        std::fs::create_dir(&other).unwrap();

        assert_eq!(sweep_stale_run_dirs(tmp.path()), 1);
        assert!(!stale.exists());
        assert!(elsewhere.join("keep").exists());
        assert!(file.exists() && other.exists());
        assert_eq!(sweep_stale_run_dirs(tmp.path()), 0);
        assert_eq!(sweep_stale_run_dirs(&tmp.path().join("missing")), 0);
    }
}
