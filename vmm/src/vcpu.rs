//! vCPU threads: run KVM_RUN and route exits to the buses.
//!
//! With the in-kernel irqchip and ioeventfds, the exits that reach us are port
//! I/O to the console and i8042, MMIO to virtio registers, and the ways a VM ends.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::state::{self, VcpuState};
use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};

/// KVM_SYSTEM_EVENT_* (include/uapi/linux/kvm.h).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {index}: {source}")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("spawning the thread of vCPU {index}: {source}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
}

/// The signal that kicks a vCPU thread out of KVM_RUN (the first real-time
/// signal glibc leaves to programs, as Firecracker and Cloud Hypervisor use).
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being delivered is the point (KVM_RUN returns EINTR).
}

/// Installs the kick's handler (without SA_RESTART), process-wide, before
/// any vCPU thread starts; without a handler the signal would end the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Where the vCPU threads leave their state for a snapshot: each thread owns
/// its vCPU fd, so each saves its own and reports here.
pub struct Pause {
    msr_indices: Vec<u32>,
    states: Mutex<Vec<Option<Result<VcpuState, String>>>>,
    reported: Condvar,
}

impl Pause {
    /// For `vcpus` vCPUs whose MSRs to save are `msr_indices` (probed once,
    /// before the vCPUs start: [`state::saved_msr_indices`]).
    pub fn new(vcpus: usize, msr_indices: Vec<u32>) -> Arc<Self> {
        Arc::new(Pause {
            msr_indices,
            states: Mutex::new((0..vcpus).map(|_| None).collect()),
            reported: Condvar::new(),
        })
    }

    fn report(&self, index: u8, r: Result<VcpuState, String>) {
        let mut s = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = s.get_mut(usize::from(index)) {
            *slot = Some(r);
        }
        self.reported.notify_all();
    }

    /// Kicks every vCPU thread until each has saved its state (the exit
    /// reason must already be [`ExitReason::Snapshot`]), and returns the
    /// states in index order. A kick can land just before a thread enters
    /// KVM_RUN, where it does nothing; so it is repeated until every thread
    /// has answered, for at most `timeout`.
    pub fn collect(
        &self,
        threads: &[JoinHandle<()>],
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, String> {
        let start = Instant::now();
        let mut s = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        while s.iter().any(Option::is_none) {
            if start.elapsed() > timeout {
                let missing: Vec<usize> = (0..s.len()).filter(|i| s[*i].is_none()).collect();
                return Err(format!(
                    "vCPUs {missing:?} did not pause within {timeout:?}"
                ));
            }
            for t in threads {
                // A thread that has already ended cannot be signalled; it
                // reported before it did, or it never will (the timeout).
                let _ = t.kill(kick_signal());
            }
            s = self
                .reported
                .wait_timeout(s, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        s.drain(..)
            .enumerate()
            .map(|(i, r)| match r {
                Some(r) => r.map_err(|e| format!("vCPU {i}: {e}")),
                None => Err(format!("vCPU {i}: no state")),
            })
            .collect()
    }
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    Stop(ExitReason),
}

/// One vCPU and what its exits need.
pub struct Vcpu {
    pub fd: VcpuFd,
    pub index: u8,
    pub mmio: Arc<Bus>,
    pub pio: Arc<Bus>,
    pub exit: ExitSignal,
    /// Present when this VM may be snapshotted.
    pub pause: Option<Arc<Pause>>,
}

/// Routes one exit. Split from the loop so it can be tested without KVM.
pub fn handle_exit(exit: VcpuExit<'_>, index: u8, mmio: &Bus, pio: &Bus) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            // Absent ISA devices float the bus high; the guest's probes expect that.
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            // Port 0x80 (POST delay) and probes of absent devices go nowhere.
            pio.write(u64::from(port), data);
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                crate::debug_limited!(vcpu = index, addr, "MMIO read outside any device");
                data.fill(0);
            }
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                crate::debug_limited!(vcpu = index, addr, "MMIO write outside any device");
            }
            Next::Continue
        }
        // Triple fault: Linux's last resort for reboot.
        VcpuExit::Shutdown => Next::Stop(ExitReason::GuestReset),
        // HLT reaches us only without an in-kernel LAPIC; a halted guest is done.
        VcpuExit::Hlt => Next::Stop(ExitReason::GuestPowerOff),
        VcpuExit::SystemEvent(kind, _) => match kind {
            SYSTEM_EVENT_SHUTDOWN => Next::Stop(ExitReason::GuestPowerOff),
            SYSTEM_EVENT_RESET => Next::Stop(ExitReason::GuestReset),
            SYSTEM_EVENT_CRASH => Next::Stop(ExitReason::GuestPanic),
            other => Next::Stop(ExitReason::VcpuFailed(format!(
                "vCPU {index}: system event {other}"
            ))),
        },
        VcpuExit::FailEntry(reason, cpu) => Next::Stop(ExitReason::VcpuFailed(format!(
            "vCPU {index}: VM entry failed, hardware reason {reason:#x} on host CPU {cpu}"
        ))),
        VcpuExit::InternalError => Next::Stop(ExitReason::VcpuFailed(format!(
            "vCPU {index}: KVM internal error (KVM cannot emulate the guest's state)"
        ))),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => Next::Continue,
        other => Next::Stop(ExitReason::VcpuFailed(format!(
            "vCPU {index}: unexpected exit {other:?}"
        ))),
    }
}

impl Vcpu {
    /// The run loop; returns when the VM stops. The thread is not joined: the VMM
    /// process exits once the event loop has a reason, taking every vCPU with it.
    pub fn run(mut self) {
        loop {
            if let Some(reason) = self.exit.reason() {
                if reason == ExitReason::Snapshot {
                    if let Some(p) = self.pause.clone() {
                        let r = self.save(&p.msr_indices);
                        p.report(self.index, r);
                    }
                }
                return;
            }
            let next = match self.fd.run() {
                Ok(exit) => {
                    let triple_fault = matches!(exit, VcpuExit::Shutdown);
                    let next = handle_exit(exit, self.index, &self.mmio, &self.pio);
                    if triple_fault {
                        // Linux reboots through the i8042 here (`reboot=k`), so
                        // a triple fault is a guest that crashed without a
                        // panic message; where it stood is all there is to go on.
                        crate::warn_limited!(
                            vcpu = self.index,
                            state = %self.state(),
                            "triple fault (KVM_EXIT_SHUTDOWN)"
                        );
                    }
                    next
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
                Err(e) => Next::Stop(ExitReason::VcpuFailed(format!(
                    "vCPU {}: KVM_RUN: {e}",
                    self.index
                ))),
            };
            if let Next::Stop(reason) = next {
                self.exit.exit(reason);
                return;
            }
        }
    }

    /// This vCPU's state, out of KVM_RUN. The exit just handled may have
    /// been port or MMIO I/O that KVM completes only on the next KVM_RUN
    /// (Documentation/virt/kvm/api.rst, KVM_RUN): one more entry with
    /// `immediate_exit` set finishes it without running the guest.
    fn save(&mut self, msr_indices: &[u32]) -> Result<VcpuState, String> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(format!("completing the last exit: {e}")),
            Ok(()) => return Err("KVM_RUN with immediate_exit entered the guest".into()),
        }
        state::save_vcpu(&self.fd, msr_indices).map_err(|e| e.to_string())
    }

    /// The registers that say where a vCPU stopped, for a crash report.
    fn state(&self) -> String {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        match (regs, sregs) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::I8042;
    use std::sync::Mutex;

    fn buses(exit: &ExitSignal) -> (Bus, Bus) {
        let mut pio = Bus::new();
        pio.insert(0x60, 5, Arc::new(Mutex::new(I8042::new(exit.clone()))))
            .unwrap();
        (Bus::new(), pio)
    }

    #[test]
    fn io_exits_route_and_absent_ports_float_high() {
        let exit = ExitSignal::new().unwrap();
        let (mmio, pio) = buses(&exit);
        let mut d = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x2f8, &mut d), 0, &mmio, &pio),
            Next::Continue
        );
        assert_eq!(d, [0xff]);
        let mut m = [0xaau8; 4];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut m), 0, &mmio, &pio),
            Next::Continue
        );
        assert_eq!(m, [0; 4]);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x64, &[0xfe]), 0, &mmio, &pio),
            Next::Continue
        );
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    /// vCPU threads that never report are named once the pause times out;
    /// the kicks reach them harmlessly (the handler does nothing).
    #[test]
    fn a_pause_that_no_vcpu_answers_times_out_naming_them() {
        install_kick_handler().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let p = Pause::new(2, Vec::new());
        let started = Instant::now();
        let e = p
            .collect(std::slice::from_ref(&t), Duration::from_millis(50))
            .unwrap_err();
        assert!(e.contains("[0, 1]"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // One that reports is collected, the other still missing.
        p.report(1, Err("unreadable".into()));
        let e = p
            .collect(std::slice::from_ref(&t), Duration::from_millis(50))
            .unwrap_err();
        assert!(e.contains("[0]"), "{e}");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        t.join().unwrap();
    }

    #[test]
    fn ending_exits() {
        let exit = ExitSignal::new().unwrap();
        let (mmio, pio) = buses(&exit);
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, 0, &mmio, &pio),
            Next::Stop(ExitReason::GuestReset)
        );
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(SYSTEM_EVENT_CRASH, &[]),
                0,
                &mmio,
                &pio
            ),
            Next::Stop(ExitReason::GuestPanic)
        );
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, 1, &mmio, &pio),
            Next::Stop(ExitReason::VcpuFailed(_))
        ));
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(0x21, 3), 1, &mmio, &pio),
            Next::Stop(ExitReason::VcpuFailed(_))
        ));
    }
}
