//! The smallest real KVM guest: a few bytes of real-mode code that write a
//! message to an I/O port and halt. If this runs, `/dev/kvm` can create a VM,
//! map memory, run a vCPU and deliver exits; that is what the test host must
//! give every later VM test.

use anyhow::{bail, Context, Result};
use kvm_ioctls::{Kvm, VcpuExit};

/// The port the guest writes to (COM1's data register, by habit).
pub const PORT: u16 = 0x3f8;
/// Where the code sits in guest-physical memory.
const CODE_GPA: u64 = 0x1000;
const MEM_SIZE: usize = 0x1000;

/// Real-mode code: `mov dx, PORT`, then `mov al, b; out dx, al` per byte, then `hlt`.
pub fn guest_code(message: &[u8]) -> Vec<u8> {
    let mut code = vec![0xba, PORT as u8, (PORT >> 8) as u8];
    for b in message {
        code.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    code.push(0xf4);
    code
}

/// Anonymous memory for the guest, unmapped on drop.
struct GuestRam {
    ptr: *mut libc::c_void,
    len: usize,
}

impl GuestRam {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }

    fn write(&mut self, data: &[u8]) {
        assert!(data.len() <= self.len);
        // SAFETY: the mapping is `len` bytes long and writable; data fits.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr as *mut u8, data.len()) };
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Runs the guest and returns what it wrote to [`PORT`] before halting.
pub fn run(message: &[u8]) -> Result<Vec<u8>> {
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let mut ram = GuestRam::new(MEM_SIZE)?;
    ram.write(&guest_code(message));
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: CODE_GPA,
        memory_size: MEM_SIZE as u64,
        userspace_addr: ram.ptr as u64,
        flags: 0,
    };
    // SAFETY: the region points at `ram`, which outlives the VM (dropped after it below).
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_GPA,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;

    let mut out = Vec::new();
    // Each byte is one exit; bound the loop so a broken KVM cannot spin forever.
    for _ in 0..(message.len() + 16) {
        match vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(port, data) if port == PORT => out.extend_from_slice(data),
            VcpuExit::Hlt => {
                drop(vcpu);
                drop(vm);
                return Ok(out);
            }
            other => bail!(
                "unexpected vCPU exit: {other:?} (wrote {:?} so far)",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    bail!(
        "the guest did not halt; wrote {:?}",
        String::from_utf8_lossy(&out)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_layout() {
        assert_eq!(
            guest_code(b"A"),
            vec![0xba, 0xf8, 0x03, 0xb0, b'A', 0xee, 0xf4]
        );
    }
}
