//! The control socket: a Unix stream listener served from the event loop.
//!
//! Like the vsock device, the server keeps its sockets in its own epoll set and
//! registers only that set's fd with the VMM loop, so it can be driven directly
//! in tests. Client sockets are non-blocking; responses that the socket cannot
//! take at once wait in a bounded per-client buffer.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::request::{self, Action, Response, VmInfo, MAX_LINE};
use crate::exit::{ExitReason, ExitSignal};

/// Most clients at once (the shim needs one; a few more for tools).
pub const MAX_CLIENTS: usize = 16;
/// Most response bytes held for a client that does not read them; past this
/// the client is dropped.
pub const MAX_OUTPUT: usize = 1 << 20;
/// Bytes read from one client per wake-up, so a client streaming garbage
/// cannot monopolise the event loop (level-triggered epoll brings us back).
const READ_BUDGET: usize = 64 * 1024;

const LISTENER_TOKEN: u64 = u64::MAX;

/// The reason recorded when the shim asks the VM to stop.
pub const SHUTDOWN_REASON: &str = "control socket";

struct Client {
    stream: UnixStream,
    /// The current, unfinished line.
    line: Vec<u8>,
    /// Discarding an oversized line up to its newline.
    skipping: bool,
    out: Vec<u8>,
}

/// Where the server leaves the connection that asked for a snapshot, for
/// the VMM to answer once the snapshot is written (the event loop has
/// stopped by then).
pub type SnapshotReply = Arc<Mutex<Option<UnixStream>>>;

/// Answers a snapshot request after the event loop has ended: one line on
/// the (non-blocking) stream, retried for at most a few seconds, so a
/// client that never reads cannot hold husk-vmm's exit. No socket options:
/// the main thread's seccomp filter has no setsockopt.
pub fn answer_late(mut stream: UnixStream, r: &Response) {
    let line = r.to_line();
    let mut done = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while done < line.len() {
        match stream.write(&line[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(_) => break,
        }
    }
    if done < line.len() {
        tracing::warn!("control socket: the snapshot's answer was not delivered");
    }
}

/// The control socket server.
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    clients: HashMap<RawFd, Client>,
    info: VmInfo,
    exit: ExitSignal,
    /// Present when snapshots are configured (`--snapshot-to`).
    snapshot_reply: Option<SnapshotReply>,
}

impl ControlServer {
    /// Listens on `path` (replacing a stale socket file from a killed VMM).
    pub fn new(path: &Path, info: VmInfo, exit: ExitSignal) -> std::io::Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener,
            epoll,
            clients: HashMap::new(),
            info,
            exit,
            snapshot_reply: None,
        })
    }

    /// Accepts `{"op":"snapshot"}`, leaving the asking connection in `reply`.
    pub fn take_snapshots(&mut self, reply: SnapshotReply) {
        self.snapshot_reply = Some(reply);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Handles everything ready now, without blocking.
    pub fn poll(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "control socket: epoll_wait failed");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == LISTENER_TOKEN {
                    self.accept();
                } else {
                    let fd = ev.data() as RawFd;
                    let set = ev.event_set();
                    if set.contains(EventSet::OUT) {
                        self.flush(fd);
                    }
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                        self.read(fd);
                    }
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                // Best effort: tell the client why, then close.
                let mut s = stream;
                let _ = s.set_nonblocking(true);
                let _ = s.write_all(&Response::error("too many control clients").to_line());
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, fd as u64),
            ) {
                tracing::warn!(error = %e, "control socket: watching a client failed");
                continue;
            }
            self.clients.insert(
                fd,
                Client {
                    stream,
                    line: Vec::new(),
                    skipping: false,
                    out: Vec::new(),
                },
            );
        }
    }

    fn drop_client(&mut self, fd: RawFd) {
        if self.clients.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Reads what the client sent and answers every complete line.
    fn read(&mut self, fd: RawFd) {
        let mut buf = [0u8; 4096];
        let mut budget = READ_BUDGET;
        let mut eof = false;
        while budget > 0 {
            let Some(c) = self.clients.get_mut(&fd) else {
                return;
            };
            let n = match c.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            };
            budget = budget.saturating_sub(n);
            for chunk in buf[..n].split_inclusive(|b| *b == b'\n') {
                self.take(fd, chunk);
            }
        }
        if eof {
            // The client is done sending; answers already queued are lost if the
            // socket cannot take them now, which only a client that half-closed
            // and stopped reading can cause.
            self.flush(fd);
            self.drop_client(fd);
        } else {
            self.flush(fd);
        }
    }

    /// Adds `chunk` (which ends at the first newline, if it has one) to the
    /// client's line, and answers the line once complete.
    fn take(&mut self, fd: RawFd, chunk: &[u8]) {
        let Some(c) = self.clients.get_mut(&fd) else {
            return;
        };
        let (data, complete) = match chunk.strip_suffix(b"\n") {
            Some(d) => (d, true),
            None => (chunk, false),
        };
        if c.skipping {
            c.skipping = !complete;
            return;
        }
        // MAX_LINE plus a possible '\r' before the newline.
        if c.line.len() + data.len() > MAX_LINE + 1 {
            tracing::debug!("control socket: oversized request line refused");
            c.line.clear();
            c.skipping = !complete;
            let r = Response::error(format!("request line longer than {MAX_LINE} bytes"));
            c.out.extend_from_slice(&r.to_line());
            return;
        }
        c.line.extend_from_slice(data);
        if !complete {
            return;
        }
        let line = std::mem::take(&mut c.line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return; // blank lines (a person at socat) get no answer
        }
        let (resp, action) = request::handle(&line, &self.info);
        if action == Action::Snapshot {
            let handed = match (&self.snapshot_reply, c.stream.try_clone()) {
                (None, _) => Err(
                    "this VM takes no snapshots (husk-vmm was started without --snapshot-to)"
                        .to_string(),
                ),
                (Some(_), Err(e)) => Err(format!("snapshot: {e}")),
                (Some(slot), Ok(stream)) => {
                    let mut slot = slot
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if slot.is_some() {
                        Err("a snapshot is already being taken".to_string())
                    } else {
                        *slot = Some(stream);
                        Ok(())
                    }
                }
            };
            match handed {
                // Answered by the VMM once written; the loop stops now.
                Ok(()) => self.exit.exit(ExitReason::Snapshot),
                Err(e) => c.out.extend_from_slice(&Response::error(e).to_line()),
            }
            return;
        }
        c.out.extend_from_slice(&resp.to_line());
        if action == Action::Shutdown {
            // Answer first, so the client sees its request accepted before the
            // VMM exits.
            self.flush(fd);
            self.exit
                .exit(ExitReason::Stopped(SHUTDOWN_REASON.to_string()));
        }
    }

    /// Writes queued responses; watches for EPOLLOUT while some remain.
    fn flush(&mut self, fd: RawFd) {
        let Some(c) = self.clients.get_mut(&fd) else {
            return;
        };
        let had_output = !c.out.is_empty();
        let mut broken = false;
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken || c.out.len() > MAX_OUTPUT {
            tracing::debug!("control socket: client gone or not reading; dropped");
            self.drop_client(fd);
            return;
        }
        if had_output {
            let mut set = EventSet::IN | EventSet::READ_HANG_UP;
            if !c.out.is_empty() {
                set |= EventSet::OUT;
            }
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(set, fd as u64),
            );
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.epoll, EventSet::IN)) {
            tracing::error!(error = ?e, "registering the control socket failed");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.poll();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::time::Duration;

    struct Rig {
        server: ControlServer,
        exit: ExitSignal,
        _dir: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let exit = ExitSignal::new().unwrap();
        let info = VmInfo {
            vcpus: 2,
            memory_mib: 256,
            pid: std::process::id(),
            vsock_socket: Some("/run/husk/x/vsock.sock".into()),
            jail: "off".into(),
        };
        let server = ControlServer::new(&dir.path().join("api.sock"), info, exit.clone()).unwrap();
        Rig {
            server,
            exit,
            _dir: dir,
        }
    }

    struct Client {
        w: UnixStream,
        r: BufReader<UnixStream>,
    }

    impl Client {
        fn connect(rig: &mut Rig) -> Client {
            let s = UnixStream::connect(rig.server.path()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            rig.server.poll();
            Client {
                w: s.try_clone().unwrap(),
                r: BufReader::new(s),
            }
        }

        fn ask(&mut self, rig: &mut Rig, req: &[u8]) -> serde_json::Value {
            self.w.write_all(req).unwrap();
            rig.server.poll();
            self.answer()
        }

        fn answer(&mut self) -> serde_json::Value {
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            assert!(line.ends_with('\n'), "{line:?}");
            serde_json::from_str(&line).unwrap()
        }
    }

    #[test]
    fn ping_info_and_errors_on_one_connection() {
        let mut rig = rig();
        let mut c = Client::connect(&mut rig);
        assert_eq!(
            c.ask(&mut rig, b"{\"op\":\"ping\"}\n"),
            serde_json::json!({"ok": true})
        );
        let v = c.ask(&mut rig, b"{\"op\":\"info\"}\r\n");
        assert_eq!(v["vcpus"], 2);
        assert_eq!(v["memory_mib"], 256);
        assert_eq!(v["pid"], std::process::id());
        assert_eq!(v["vsock_socket"], "/run/husk/x/vsock.sock");
        // Garbage and unknown ops: an error, and the connection still works.
        for bad in [&b"garbage\n"[..], b"{\"op\":\"reboot\"}\n", b"\xff\xfe\n"] {
            let v = c.ask(&mut rig, bad);
            assert_eq!(v["ok"], false);
            assert!(v["error"].is_string());
        }
        assert_eq!(c.ask(&mut rig, b"{\"op\":\"ping\"}\n")["ok"], true);
        assert_eq!(rig.exit.reason(), None);
    }

    #[test]
    fn requests_split_and_batched_across_reads() {
        let mut rig = rig();
        let mut c = Client::connect(&mut rig);
        c.w.write_all(b"{\"op\":").unwrap();
        rig.server.poll();
        c.w.write_all(b"\"ping\"}\n\n{\"op\":\"info\"}\n{\"op\":\"ping\"}\n")
            .unwrap();
        rig.server.poll();
        assert_eq!(c.answer()["ok"], true);
        assert_eq!(c.answer()["vcpus"], 2);
        assert_eq!(c.answer(), serde_json::json!({"ok": true}));
    }

    /// Writes `data` from a thread while the server polls (it may exceed what
    /// the socket buffers hold).
    fn send_while_polling(rig: &mut Rig, c: &Client, data: Vec<u8>) {
        let mut w = c.w.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&data).unwrap());
        while !writer.is_finished() {
            rig.server.poll();
            std::thread::sleep(Duration::from_millis(1));
        }
        writer.join().unwrap();
        // Each poll reads at most READ_BUDGET from a client.
        for _ in 0..16 {
            rig.server.poll();
        }
    }

    #[test]
    fn oversized_lines_are_refused_and_skipped() {
        let mut rig = rig();
        let mut c = Client::connect(&mut rig);
        let mut big = vec![b'x'; MAX_LINE + 100];
        big.extend_from_slice(b"\n{\"op\":\"ping\"}\n");
        send_while_polling(&mut rig, &c, big);
        let v = c.answer();
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("longer"), "{v}");
        // The rest of the long line is skipped; the next request is answered.
        assert_eq!(c.answer(), serde_json::json!({"ok": true}));
        // A line of exactly MAX_LINE bytes is parsed (and is bad JSON, not too long).
        let mut exact = vec![b' '; MAX_LINE - 2];
        exact.extend_from_slice(b"{}\n");
        send_while_polling(&mut rig, &c, exact);
        let v = c.answer();
        assert!(!v["error"].as_str().unwrap().contains("longer"), "{v}");
        assert_eq!(c.ask(&mut rig, b"{\"op\":\"ping\"}\n")["ok"], true);
    }

    /// Without `--snapshot-to` a snapshot is refused and the VM runs on;
    /// with it, the asking connection is kept for the answer, the VM stops
    /// for the snapshot, and a second request is refused meanwhile.
    #[test]
    fn snapshot_needs_a_directory_and_is_answered_late() {
        let mut rig = rig();
        let mut c = Client::connect(&mut rig);
        let r = c.ask(&mut rig, b"{\"op\":\"snapshot\"}\n");
        assert_eq!(r["ok"], false);
        assert!(
            r["error"].as_str().unwrap().contains("--snapshot-to"),
            "{r}"
        );
        assert_eq!(rig.exit.reason(), None);

        let slot = SnapshotReply::default();
        rig.server.take_snapshots(slot.clone());
        c.w.write_all(b"{\"op\":\"snapshot\"}\n").unwrap();
        rig.server.poll();
        assert_eq!(rig.exit.reason(), Some(ExitReason::Snapshot));
        let kept = slot.lock().unwrap().take().expect("the connection is kept");
        *slot.lock().unwrap() = Some(kept.try_clone().unwrap());
        let mut other = Client::connect(&mut rig);
        let r = other.ask(&mut rig, b"{\"op\":\"snapshot\"}\n");
        assert!(r["error"].as_str().unwrap().contains("already"), "{r}");
        answer_late(kept, &Response::ok());
        assert_eq!(c.answer()["ok"], true);
    }

    #[test]
    fn shutdown_answers_then_stops_the_vm() {
        let mut rig = rig();
        let mut c = Client::connect(&mut rig);
        assert_eq!(c.ask(&mut rig, b"{\"op\":\"shutdown\"}\n")["ok"], true);
        let r = rig.exit.reason().unwrap();
        assert_eq!(r, ExitReason::Stopped(SHUTDOWN_REASON.into()));
        assert_eq!(r.exit_code(), 0);
        assert!(rig.exit.eventfd().read().unwrap() >= 1);
    }

    #[test]
    fn clients_come_and_go_and_are_bounded() {
        let mut rig = rig();
        let clients: Vec<_> = (0..MAX_CLIENTS)
            .map(|_| Client::connect(&mut rig))
            .collect();
        assert_eq!(rig.server.clients.len(), MAX_CLIENTS);
        let mut extra = Client::connect(&mut rig);
        let v = extra.answer();
        assert_eq!(v["ok"], false);
        drop(clients);
        rig.server.poll();
        assert!(rig.server.clients.is_empty());
        let mut c = Client::connect(&mut rig);
        assert_eq!(c.ask(&mut rig, b"{\"op\":\"ping\"}\n")["ok"], true);
    }

    #[test]
    fn a_client_that_never_reads_is_dropped() {
        let mut rig = rig();
        let c = Client::connect(&mut rig);
        let mut w = c.w.try_clone().unwrap();
        w.set_nonblocking(true).unwrap();
        let req = b"{\"op\":\"info\"}\n".repeat(256);
        let mut sent = 0usize;
        // ~100 bytes of answer per 14 bytes asked: the server's buffer fills first.
        while !rig.server.clients.is_empty() {
            match w.write(&req) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            rig.server.poll();
            assert!(sent < 64 << 20, "never dropped");
        }
    }
}
