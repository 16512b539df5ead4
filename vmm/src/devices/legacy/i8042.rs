//! The i8042 keyboard controller, reduced to what a guest uses it for here: the
//! CPU reset line (command 0xFE on port 0x64), which `reboot=k` makes the guest
//! kernel's way to reboot. A reset ends the VM (see [`crate::exit`]).
//!
//! Everything else reads as "no controller here". The guest has no ACPI to
//! say there is no PS/2 controller, so Linux's i8042 driver probes the ports
//! directly. A controller that never answers (vm-superio's `I8042Device`
//! reads back 0) makes each of its commands wait out a 10000-poll timeout
//! (`i8042_wait_read`, 50 us a poll): measured in the nested test host,
//! 10315 port exits in one boot against 710 under Firecracker, most of the
//! boot-time gap (docs/vmm.md, "Boot time"). The status register reads 0x01
//! instead, "output buffer full, input buffer empty": the driver's flush
//! then drains 16 bytes without the buffer ever emptying and concludes that
//! no controller is present, and the reboot path's wait for an empty input
//! buffer (`kb_wait`) passes at once. Written here rather than taken from a
//! crate because the one it replaced is exactly what cost the time, and
//! there is nothing more to it than this.

use crate::devices::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Port offsets from 0x60: the data port and the status/command port.
const DATA: u64 = 0;
const COMMAND: u64 = 4;
/// Status: output buffer full (bit 0); input buffer full (bit 1) clear.
const STATUS_NO_CONTROLLER: u8 = 0x01;
/// The command that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller on ports 0x60..=0x64.
pub struct I8042 {
    exit: ExitSignal,
}

impl I8042 {
    pub fn new(exit: ExitSignal) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match (offset, data.len()) {
            (COMMAND, 1) => data[0] = STATUS_NO_CONTROLLER,
            (DATA, 1) => data[0] = 0,
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND && data == [CMD_RESET_CPU] {
            // Said apart from a triple fault: a reset the guest asked for (its
            // `reboot=k` path) and one it fell into read the same otherwise.
            crate::warn_limited!("the guest pulsed the i8042 reset line");
            self.exit.exit(ExitReason::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = ExitSignal::new().unwrap();
        let mut kbd = I8042::new(exit.clone());
        kbd.write(0, &[0x00]);
        kbd.write(4, &[0x20]); // read command byte: harmless
        assert_eq!(exit.reason(), None);
        kbd.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn reads_say_no_controller_and_never_a_busy_input_buffer() {
        let exit = ExitSignal::new().unwrap();
        let mut kbd = I8042::new(exit.clone());
        // Linux's i8042_flush: reading while OBF stays set, 16 times, means
        // "no controller"; kb_wait before a reset needs IBF (bit 1) clear.
        for _ in 0..16 {
            let mut st = [0u8; 1];
            kbd.read(4, &mut st);
            assert_eq!(st[0] & 0x01, 0x01);
            assert_eq!(st[0] & 0x02, 0);
            let mut d = [0xaa_u8; 1];
            kbd.read(0, &mut d);
            assert_eq!(d, [0]);
        }
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let exit = ExitSignal::new().unwrap();
        let mut kbd = I8042::new(exit.clone());
        kbd.write(4, &[0xfe, 0]);
        kbd.write(2, &[0xfe]);
        let mut d = [0u8; 1];
        kbd.read(1, &mut d);
        assert_eq!(d, [0xff]);
        assert_eq!(exit.reason(), None);
    }
}
