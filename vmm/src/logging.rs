//! husk-vmm's own log: bounded in size, and rate-limited where the guest can
//! make it speak.
//!
//! The runtime sends husk-vmm's stderr to `vmm.log` on `/run` (a tmpfs), and
//! the guest is hostile: anything it can make husk-vmm say over and over (a
//! malformed ring after each reset, a vsock connect to a full listener, a
//! console write error per byte) could fill the host's memory through that
//! file, or bury the one line that matters. Two bounds, both allocation-free
//! and panic-free on the path of every log line:
//!
//! - [`BoundedLog`], the tracing writer: at most a fixed number of bytes of
//!   whole lines (16 MiB unless `--log-limit-bytes` says otherwise, see
//!   [`crate::config`]), then one line saying the rest is dropped; what is
//!   dropped after that is only counted, like the console's
//!   [`crate::devices::legacy::serial::CONSOLE_LIMIT`].
//! - [`RateLimit`] and the `*_limited!` macros: every log call site a guest can
//!   trigger gets its own token bucket ([`BURST`] lines at once, then
//!   [`PER_SECOND`]); when a line passes after some were held back, it carries
//!   `suppressed=N`.
//!
//! Guest bytes quoted in a log line go through `{:?}` (tracing's `?field`),
//! which escapes newlines and control characters, so a guest cannot forge a
//! host log line or drive the reader's terminal.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tracing_subscriber::fmt::MakeWriter;

/// Log bytes written before the rest is dropped (console.log has the same
/// limit): enough for a VM's whole life at the default `warn` level many times
/// over, small against the tmpfs `/run` lives on.
pub const DEFAULT_LOG_LIMIT: u64 = 16 << 20;

/// Lines a call site may log at once...
pub const BURST: u32 = 5;
/// ...and how many more it earns per second after that.
pub const PER_SECOND: u32 = 1;

/// Locks a mutex even when a thread panicked while holding it: a log must
/// never be the second panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Sink<W> {
    out: W,
    /// Bytes passed to `out` (whole lines only).
    written: u64,
    /// The first line that did not fit was replaced by the note.
    closed: bool,
}

struct Shared<W> {
    sink: Mutex<Sink<W>>,
    limit: u64,
    dropped_lines: AtomicU64,
    dropped_bytes: AtomicU64,
}

/// A [`MakeWriter`] for tracing-subscriber's fmt layer that passes at most
/// `limit` bytes to `out`, then one note, then nothing.
///
/// The fmt layer formats a whole event into its own buffer and hands it over
/// in one `write_all`, so each `write` here is one line: a line that does not
/// fit is dropped whole, never cut. Write errors (a full disk, a closed pipe)
/// are swallowed: the VM must not stop, or panic in `eprintln!`, because its
/// log cannot be written.
pub struct BoundedLog<W> {
    shared: Arc<Shared<W>>,
}

impl<W> Clone for BoundedLog<W> {
    fn clone(&self) -> Self {
        BoundedLog {
            shared: self.shared.clone(),
        }
    }
}

impl<W: Write> BoundedLog<W> {
    pub fn new(out: W, limit: u64) -> Self {
        BoundedLog {
            shared: Arc::new(Shared {
                sink: Mutex::new(Sink {
                    out,
                    written: 0,
                    closed: false,
                }),
                limit,
                dropped_lines: AtomicU64::new(0),
                dropped_bytes: AtomicU64::new(0),
            }),
        }
    }

    /// Lines (writes) and bytes dropped past the limit.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.shared.dropped_lines.load(Ordering::Relaxed),
            self.shared.dropped_bytes.load(Ordering::Relaxed),
        )
    }

    /// Runs `f` on the output, under the same lock as log lines: for a last
    /// word that must be written whatever the limit (the exit reason).
    pub fn with_output<R>(&self, f: impl FnOnce(&mut W) -> R) -> R {
        f(&mut lock(&self.shared.sink).out)
    }

    fn line(&self, buf: &[u8]) {
        let s = &*self.shared;
        let mut sink = lock(&s.sink);
        let len = buf.len() as u64;
        if !sink.closed && sink.written.saturating_add(len) <= s.limit {
            sink.written += len;
            let _ = sink.out.write_all(buf);
            return;
        }
        s.dropped_lines.fetch_add(1, Ordering::Relaxed);
        s.dropped_bytes.fetch_add(len, Ordering::Relaxed);
        if !sink.closed {
            sink.closed = true;
            // write! into the output formats on the stack: no allocation.
            let _ = writeln!(
                sink.out,
                "[husk-vmm: log output past {} bytes is dropped]",
                s.limit
            );
        }
    }
}

/// One event's writer (the fmt layer asks for one per event).
pub struct LineWriter<'a, W: Write>(&'a BoundedLog<W>);

impl<W: Write> Write for LineWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = lock(&self.0.shared.sink).out.flush();
        Ok(())
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for BoundedLog<W> {
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(self)
    }
}

/// A token bucket for one log call site (a `static` made by the `*_limited!`
/// macros): [`BURST`] lines at once, [`PER_SECOND`] after that.
pub struct RateLimit {
    state: Mutex<Bucket>,
}

struct Bucket {
    /// Tokens in thousandths, so refills need no floats.
    milli_tokens: u64,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    pub const fn new() -> Self {
        RateLimit {
            state: Mutex::new(Bucket {
                milli_tokens: BURST as u64 * 1000,
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the number of lines
    /// held back since the last one that passed, or `None` (counted).
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`RateLimit::check`] at a given time (for tests).
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        let mut b = lock(&self.state);
        let full = u64::from(BURST) * 1000;
        match b.last {
            Some(last) => {
                // A clock that went backwards (it cannot, Instant is
                // monotonic) would only refill nothing.
                let ms = now.saturating_duration_since(last).as_millis();
                let earned = u64::try_from(ms)
                    .unwrap_or(u64::MAX)
                    .saturating_mul(u64::from(PER_SECOND));
                b.milli_tokens = b.milli_tokens.saturating_add(earned).min(full);
                // Only whole milliseconds are spent: a flood that calls more
                // than once a millisecond must still earn its line a second.
                let spent = std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX));
                b.last = Some(last.checked_add(spent).unwrap_or(now));
            }
            None => b.last = Some(now),
        }
        if b.milli_tokens >= 1000 {
            b.milli_tokens -= 1000;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed = b.suppressed.saturating_add(1);
            None
        }
    }
}

/// A tracing event at `level` that passes this call site's [`RateLimit`];
/// `suppressed = N` is added when lines were held back before it. Use for
/// every line a guest can trigger repeatedly.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new();
        if ::tracing::enabled!($level) {
            match LIMIT.check() {
                Some(0) => ::tracing::event!($level, $($arg)+),
                Some(suppressed) => ::tracing::event!($level, suppressed, $($arg)+),
                None => {}
            }
        }
    }};
}

/// `tracing::warn!` through this call site's [`RateLimit`].
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!(::tracing::Level::WARN, $($arg)+) };
}

/// `tracing::error!` through this call site's [`RateLimit`].
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!(::tracing::Level::ERROR, $($arg)+) };
}

/// `tracing::debug!` through this call site's [`RateLimit`]: what a guest
/// can trigger at will still cannot flood a debug log.
#[macro_export]
macro_rules! debug_limited {
    ($($arg:tt)+) => { $crate::log_limited!(::tracing::Level::DEBUG, $($arg)+) };
}

/// `tracing::info!` through this call site's [`RateLimit`].
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::log_limited!(::tracing::Level::INFO, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A Write whose bytes the test can read after the log took it.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Failing;
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
    }

    #[test]
    fn log_stops_at_its_limit_with_one_note_and_keeps_counting() {
        let out = Buf::default();
        let log = BoundedLog::new(out.clone(), 100);
        let line = [b'x'; 29];
        for _ in 0..3 {
            log.make_writer().write_all(&line).unwrap();
        }
        // 87 bytes so far; the fourth line would pass 100: dropped whole.
        for _ in 0..10 {
            log.make_writer().write_all(&line).unwrap();
        }
        // A short line that would still fit is dropped too: once closed, closed.
        log.make_writer().write_all(b"y\n").unwrap();
        let text = String::from_utf8(lock(&out.0).clone()).unwrap();
        assert_eq!(
            text,
            format!(
                "{}[husk-vmm: log output past 100 bytes is dropped]\n",
                "x".repeat(87)
            )
        );
        assert_eq!(log.dropped(), (11, 10 * 29 + 2));
        // The exit line bypasses the limit.
        log.with_output(|o| o.write_all(b"bye\n")).unwrap();
        assert!(lock(&out.0).ends_with(b"dropped]\nbye\n"));
    }

    #[test]
    fn a_log_that_cannot_be_written_is_no_error() {
        let log = BoundedLog::new(Failing, 10);
        let mut w = log.make_writer();
        assert_eq!(w.write(b"0123456789").unwrap(), 10);
        assert_eq!(w.write(b"more").unwrap(), 4);
        w.flush().unwrap();
        assert_eq!(log.dropped(), (1, 4));
    }

    #[test]
    fn tracing_lines_go_through_the_bound_and_guest_text_is_escaped() {
        let out = Buf::default();
        let log = BoundedLog::new(out.clone(), 1 << 20);
        let sub = tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let guest = "name\n2026-12-05T00:00:00Z ERROR forged\x1b[2J";
            tracing::warn!(name = ?guest, "refused");
        });
        let text = String::from_utf8(lock(&out.0).clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(r#"name\n2026"#), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
    }

    #[test]
    fn a_call_site_gets_a_burst_then_a_few_per_second() {
        let r = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(r.check_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(r.check_at(t0), None);
        }
        // Half a second earns half a token: still nothing.
        assert_eq!(r.check_at(t0 + Duration::from_millis(500)), None);
        // A second in, one line passes and says how many were held back.
        assert_eq!(r.check_at(t0 + Duration::from_millis(1000)), Some(1001));
        assert_eq!(r.check_at(t0 + Duration::from_millis(1001)), None);
        // A long quiet spell refills the burst, no more.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(r.check_at(later), Some(1));
        for _ in 1..BURST {
            assert_eq!(r.check_at(later), Some(0));
        }
        assert_eq!(r.check_at(later), None);
    }

    #[test]
    fn a_flood_faster_than_a_millisecond_still_gets_a_line_a_second() {
        let r = RateLimit::new();
        let t0 = Instant::now();
        let mut passed = 0;
        // 10 s of calls every 100 us: 5 at once, then one a second.
        for i in 0..100_000u64 {
            if r.check_at(t0 + Duration::from_micros(i * 100)).is_some() {
                passed += 1;
            }
        }
        assert!((BURST + 9..=BURST + 10).contains(&passed), "{passed}");
    }

    #[test]
    fn the_macros_hold_back_a_flood_and_report_it() {
        let out = Buf::default();
        let log = BoundedLog::new(out.clone(), 1 << 20);
        let sub = tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .finish();
        let flood = |n: u32| {
            for i in 0..n {
                crate::warn_limited!(i, "guest did a bad thing");
            }
        };
        tracing::subscriber::with_default(sub, || {
            flood(10_000);
            let text = String::from_utf8(lock(&out.0).clone()).unwrap();
            // The burst, and (on a slow machine) one or two more refilled lines.
            let n = text.lines().count() as u32;
            assert!((BURST..=BURST + 3).contains(&n), "{n} lines:\n{text}");
            assert!(text.lines().all(|l| l.contains("guest did a bad thing")));
            assert!(!text.contains("suppressed"));
            // When the site speaks again, its line says how many were held back.
            std::thread::sleep(Duration::from_millis(1100));
            flood(1);
            let text = String::from_utf8(lock(&out.0).clone()).unwrap();
            let last = text.lines().last().unwrap();
            assert!(last.contains("suppressed=99"), "{last}");
        });
        // Another call site has its own bucket.
        let sub = tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(sub, || {
            crate::error_limited!("another site");
            crate::info_limited!(x = 1, "a third");
        });
        let text = String::from_utf8(lock(&out.0).clone()).unwrap();
        assert!(text.contains("another site") && text.contains("a third"));
    }

    #[test]
    fn a_guest_cannot_flood_a_debug_log_either() {
        let out = Buf::default();
        let log = BoundedLog::new(out.clone(), 1 << 20);
        let sub = tracing_subscriber::fmt()
            .with_writer(log)
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::with_default(sub, || {
            for i in 0..10_000 {
                crate::debug_limited!(i, "MMIO write outside any device");
            }
        });
        let text = String::from_utf8(lock(&out.0).clone()).unwrap();
        let n = text.lines().count() as u32;
        assert!((BURST..=BURST + 3).contains(&n), "{n} lines:\n{text}");
        assert!(text.lines().all(|l| l.contains("DEBUG")));
    }
}
