//! Architecture support. Husk runs x86_64 guests only; the module split keeps the
//! CPU-specific setup (CPUID, MSRs, registers, boot tables) out of the generic VMM.

pub mod x86_64;
