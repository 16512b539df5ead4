//! Legacy PC devices: the 8250 console and the i8042 reset line.

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{ConsoleWriter, SerialConsole};

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line driven through an eventfd (a KVM irqfd in a VM).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
