//! virtio-rng (virtio 1.2, section 5.4): one queue of device-writable buffers that
//! the device fills with random bytes from the host, so the guest's CRNG is seeded
//! from its first moments instead of waiting for interrupt jitter.

mod device;

pub use device::Rng;
