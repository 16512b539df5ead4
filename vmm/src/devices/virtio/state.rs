//! What every virtio device shares about its life cycle (the part of Cloud
//! Hypervisor's `VirtioCommon` or Firecracker's `DeviceState` Husk needs):
//! inactive until the driver sets `DRIVER_OK`, active with the driver's queues,
//! broken (`DEVICE_NEEDS_RESET`) after a malformed ring until the driver resets
//! it. A device keeps one [`DeviceState`] and runs its queue work through
//! [`DeviceState::process`], so the rules are the same for every device: a
//! broken device never touches its queues again, a fault signals the driver
//! once, used buffers raise the interrupt once per round.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::{ActivateError, Activation, Interrupt};
use crate::memory::GuestMemoryMmap;

/// An activated device's view of the guest: memory, the driver's queues (one
/// per declared queue, in order) and the interrupt line.
pub struct ActiveQueues {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

/// Inactive, active, or broken (active but needing a reset).
#[derive(Default)]
pub struct DeviceState {
    active: Option<ActiveQueues>,
    broken: bool,
}

impl DeviceState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the driver's queues; every queue in `must_be_ready` must be ready
    /// (and exist). A device may declare queues it never uses (vsock's event
    /// queue), which need not be.
    pub fn activate(
        &mut self,
        a: Activation,
        must_be_ready: &[usize],
    ) -> Result<(), ActivateError> {
        for &i in must_be_ready {
            match a.queues.get(i) {
                Some(q) if q.ready() => {}
                _ => return Err(ActivateError::BadQueue(i)),
            }
        }
        self.active = Some(ActiveQueues {
            mem: a.mem,
            queues: a.queues,
            interrupt: a.interrupt,
            features: a.features,
        });
        self.broken = false;
        Ok(())
    }

    /// Back to inactive (the driver wrote 0 to the status register).
    pub fn reset(&mut self) {
        self.active = None;
        self.broken = false;
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// A malformed ring was seen; nothing runs until [`DeviceState::reset`].
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The queues, while active (broken or not).
    pub fn active(&self) -> Option<&ActiveQueues> {
        self.active.as_ref()
    }

    /// Where the device stands in each of its queues (what it has taken
    /// from the available ring and given back in the used ring), for a
    /// snapshot; `None` while inactive.
    pub fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
    }

    /// Runs `f` over the active queues of `dev`, unless the device is inactive
    /// or broken. `f` says whether it used any buffer (then the driver gets one
    /// interrupt); an error breaks the device and tells the driver
    /// (`DEVICE_NEEDS_RESET`), and is returned for the device to log.
    ///
    /// `state` picks the device's [`DeviceState`] out of `dev`, so that `f`
    /// can have both the device and its queues mutably.
    pub fn process<D, E>(
        dev: &mut D,
        state: fn(&mut D) -> &mut DeviceState,
        f: impl FnOnce(&mut D, &mut ActiveQueues) -> Result<bool, E>,
    ) -> Result<(), E> {
        let s = state(dev);
        if s.broken {
            return Ok(());
        }
        let Some(mut a) = s.active.take() else {
            return Ok(());
        };
        let r = f(dev, &mut a);
        let s = state(dev);
        match &r {
            Ok(true) => a.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(_) => {
                s.broken = true;
                a.interrupt.set_needs_reset();
            }
        }
        // `f` may not reset the device (a reset comes from the transport), so
        // the queues go back where they were.
        s.active = Some(a);
        r.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::chain::test_utils::{memory, queue};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Dev {
        state: DeviceState,
        runs: u32,
    }

    fn activation(mem: &GuestMemoryMmap, q: Queue) -> (Activation, Arc<Interrupt>) {
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        (
            Activation {
                mem: mem.clone(),
                queues: vec![q],
                interrupt: irq.clone(),
                features: 0,
            },
            irq,
        )
    }

    #[test]
    fn inactive_active_broken_reset() {
        let mem = memory();
        let (_vq, mut q) = queue(&mem);
        q.set_ready(true);
        let mut d = Dev {
            state: DeviceState::new(),
            runs: 0,
        };
        let run = |d: &mut Dev, r: Result<bool, ()>| {
            DeviceState::process(
                d,
                |d| &mut d.state,
                |d, _| {
                    d.runs += 1;
                    r
                },
            )
        };
        // Inactive: nothing runs.
        assert!(run(&mut d, Ok(true)).is_ok());
        assert_eq!(d.runs, 0);
        let (a, irq) = activation(&mem, q);
        d.state.activate(a, &[0]).unwrap();
        assert!(d.state.is_active() && !d.state.is_broken());
        run(&mut d, Ok(false)).unwrap();
        assert_eq!(irq.status(), 0);
        run(&mut d, Ok(true)).unwrap();
        assert_eq!(irq.status(), crate::devices::virtio::defs::INT_VRING);
        assert_eq!(run(&mut d, Err(())), Err(()));
        assert!(d.state.is_broken() && irq.needs_reset());
        // Broken: nothing runs until reset.
        assert!(run(&mut d, Ok(true)).is_ok());
        assert_eq!(d.runs, 3);
        d.state.reset();
        assert!(!d.state.is_active() && !d.state.is_broken());
    }

    #[test]
    fn activation_needs_its_queues_ready() {
        let mem = memory();
        let (_vq, mut q) = queue(&mem);
        q.set_ready(false);
        let mut s = DeviceState::new();
        let (a, _) = activation(&mem, q);
        assert!(matches!(
            s.activate(a, &[0]),
            Err(ActivateError::BadQueue(0))
        ));
        let (_vq, q) = queue(&mem);
        let (a, _) = activation(&mem, q);
        assert!(matches!(
            s.activate(a, &[1]),
            Err(ActivateError::BadQueue(1))
        ));
        assert!(!s.is_active());
    }
}
