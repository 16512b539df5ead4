//! The 8250 UART at COM1 (vm-superio), writing the guest console to a file or pipe.
//!
//! The console is also how Husk learns what the guest meant when it stopped: with
//! no ACPI there is no power-off register, so [`ConsoleWriter`] watches for the
//! kernel's own emergency-level lines ("Kernel panic - not syncing", "reboot:
//! Power down", "reboot: System halted"), which `quiet` does not suppress. A guest
//! can forge these lines, but it can only change its own VM's exit status.
//!
//! Guest input is not wired: the console is for logs; the agent talks over vsock.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Longest line kept for marker matching; longer lines are only passed through.
const MAX_LINE: usize = 256;

/// How much console output reaches `out`: a guest that prints without end
/// must not fill the host's disk (console.log lives on /run, a tmpfs). The
/// head is kept (the boot, the agent's start); past it one line says so and
/// the rest is dropped, still scanned for the stop markers.
pub const CONSOLE_LIMIT: u64 = 16 << 20;

const PANIC_MARKER: &str = "Kernel panic - not syncing";
const POWER_DOWN_MARKERS: [&str; 2] = ["reboot: Power down", "reboot: System halted"];

/// Passes console bytes to `out` and reports the kernel's stop markers.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    exit: Option<ExitSignal>,
    /// Bytes passed to `out` so far, and how many may be.
    written: u64,
    limit: u64,
    /// A failed write is warned about once, not once per guest byte.
    lost: bool,
}

impl ConsoleWriter {
    pub fn new(out: Box<dyn Write + Send>, exit: Option<ExitSignal>) -> Self {
        ConsoleWriter {
            out,
            line: Vec::with_capacity(MAX_LINE),
            exit,
            written: 0,
            limit: CONSOLE_LIMIT,
            lost: false,
        }
    }

    /// At most `limit` bytes of console reach the output.
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    fn pass(&mut self, buf: &[u8]) {
        let room = self.limit.saturating_sub(self.written);
        if room == 0 {
            return;
        }
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let mut res = self.out.write_all(&buf[..take]);
        self.written += take as u64;
        if self.written >= self.limit && res.is_ok() {
            let note = format!(
                "\n[husk-vmm: console output past {} bytes is dropped]\n",
                self.limit
            );
            res = self.out.write_all(note.as_bytes());
            tracing::warn!(
                limit = self.limit,
                "the guest console reached its limit; dropping the rest"
            );
        }
        // A console that cannot be written (full disk, closed pipe) must not
        // stop the guest: drop the bytes and say so once in the VMM log.
        if let Err(e) = res {
            if !self.lost {
                self.lost = true;
                tracing::warn!(error = %e, "console output lost");
            }
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                self.check_line();
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    fn check_line(&self) {
        let Some(exit) = &self.exit else { return };
        let line = String::from_utf8_lossy(&self.line);
        if line.contains(PANIC_MARKER) {
            exit.note_panic();
        } else if POWER_DOWN_MARKERS.iter().any(|m| line.contains(m)) {
            exit.exit(ExitReason::GuestPowerOff);
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scan(buf);
        self.pass(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// COM1 on the port I/O bus.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleWriter>,
}

impl SerialConsole {
    pub fn new(irq: EventFdTrigger, out: ConsoleWriter) -> Self {
        SerialConsole {
            uart: Serial::new(irq, out),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte registers only; wider reads see an absent device.
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            crate::warn_limited!(error = ?e, "serial write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_reach_the_output_and_markers_are_seen() {
        let sink = Sink::default();
        let exit = ExitSignal::new().unwrap();
        let mut serial = SerialConsole::new(
            EventFdTrigger(EventFd::new(0).unwrap()),
            ConsoleWriter::new(Box::new(sink.clone()), Some(exit.clone())),
        );
        for b in b"hello\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n" {
            serial.write(0, &[*b]);
        }
        assert!(sink.0.lock().unwrap().starts_with(b"hello\n"));
        assert_eq!(exit.reason(), None);
        exit.exit(ExitReason::GuestReset);
        assert_eq!(exit.reason(), Some(ExitReason::GuestPanic));
    }

    #[test]
    fn power_down_line_stops_the_vm() {
        let exit = ExitSignal::new().unwrap();
        let mut w = ConsoleWriter::new(Box::new(std::io::sink()), Some(exit.clone()));
        w.write_all(b"[    2.5] reboot: Power do").unwrap();
        assert_eq!(exit.reason(), None);
        w.write_all(b"wn\n").unwrap();
        assert_eq!(exit.reason(), Some(ExitReason::GuestPowerOff));
    }

    #[test]
    fn long_lines_and_bad_accesses_are_harmless() {
        let mut serial = SerialConsole::new(
            EventFdTrigger(EventFd::new(0).unwrap()),
            ConsoleWriter::new(Box::new(std::io::sink()), None),
        );
        for _ in 0..10_000 {
            serial.write(0, b"x");
        }
        let mut d = [0u8; 2];
        serial.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        serial.write(9, &[1]);
        let mut lsr = [0u8; 1];
        serial.read(5, &mut lsr);
        // Transmitter empty: the guest may write again.
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn output_stops_at_the_limit_with_one_note_and_markers_still_count() {
        let sink = Sink::default();
        let exit = ExitSignal::new().unwrap();
        let mut w = ConsoleWriter::new(Box::new(sink.clone()), Some(exit.clone())).with_limit(10);
        for _ in 0..100 {
            w.write_all(b"spam spam\n").unwrap();
        }
        w.write_all(b"reboot: Power down\n").unwrap();
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(
            out.starts_with("spam spam\n\n[husk-vmm: console output past 10 bytes"),
            "{out}"
        );
        assert_eq!(out.matches("husk-vmm:").count(), 1, "{out}");
        assert!(!out.contains("Power down"));
        assert_eq!(exit.reason(), Some(ExitReason::GuestPowerOff));
    }
}
