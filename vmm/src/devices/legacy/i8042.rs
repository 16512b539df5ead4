//! The i8042 keyboard controller, reduced to what a guest uses it for here: the
//! CPU reset line (command 0xFE on port 0x64), which `reboot=k` makes the guest
//! kernel's way to reboot. A reset ends the VM (see [`crate::exit`]).

use vm_superio::I8042Device;

use crate::devices::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Turns the controller's reset pulse into a VM exit.
pub struct ResetTrigger(pub ExitSignal);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        // Said apart from a triple fault: a reset the guest asked for (its
        // `reboot=k` path) and one it fell into read the same otherwise.
        tracing::warn!("the guest pulsed the i8042 reset line");
        self.0.exit(ExitReason::GuestReset);
        Ok(())
    }
}

/// The controller on ports 0x60..=0x64.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: ExitSignal) -> Self {
        I8042 {
            dev: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || (offset != 0 && offset != 4) {
            data.fill(0xff);
            return;
        }
        data[0] = self.dev.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || (offset != 0 && offset != 4) {
            return;
        }
        // The only failure is the reset trigger's, which is infallible.
        let _ = self.dev.write(offset as u8, data[0]);
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
