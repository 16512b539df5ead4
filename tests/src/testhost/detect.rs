//! Can this machine's KVM boot a stock guest kernel, or do VM tests need the
//! nested test host?
//!
//! KVM-PVM (a paravirtualized, shadow-paging KVM) exposes `/dev/kvm` but runs
//! only PVM-aware guest kernels: a stock kernel crawls and then dies with
//! `KVM_EXIT_INTERNAL_ERROR`. Such hosts show no `vmx`/`svm` CPU flag and have
//! a `kvm_pvm` module in sysfs. Hardware KVM shows the flag and no `kvm_pvm`.

use std::path::Path;

/// How VM tests run on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Hardware KVM: run the tests right here.
    Direct,
    /// No usable KVM: run them in an L2 VM under QEMU TCG with emulated SVM.
    Nested { reason: String },
}

/// What detection looked at, so that the decision can be shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub dev_kvm: bool,
    pub virt_flag: Option<&'static str>,
    pub kvm_pvm: bool,
}

impl Facts {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            dev_kvm: Path::new("/dev/kvm").exists(),
            virt_flag: virt_flag(&cpuinfo),
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }

    pub fn mode(&self) -> Mode {
        match (self.dev_kvm, self.virt_flag, self.kvm_pvm) {
            (_, _, true) => Mode::Nested {
                reason: "/dev/kvm is KVM-PVM (kvm_pvm is loaded): it boots only PVM-aware guests"
                    .into(),
            },
            (false, _, _) => Mode::Nested {
                reason: "no /dev/kvm".into(),
            },
            (true, None, _) => Mode::Nested {
                reason: "the CPU shows no vmx/svm flag: /dev/kvm is not hardware virtualization"
                    .into(),
            },
            (true, Some(_), false) => Mode::Direct,
        }
    }
}

fn virt_flag(cpuinfo: &str) -> Option<&'static str> {
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let mut words = flags.split_whitespace();
    if words.clone().any(|w| w == "vmx") {
        Some("vmx")
    } else if words.any(|w| w == "svm") {
        Some("svm")
    } else {
        None
    }
}

/// The mode for this machine; `HUSK_TESTHOST=nested|direct` overrides it.
pub fn mode() -> Mode {
    match std::env::var("HUSK_TESTHOST").as_deref() {
        Ok("nested") => Mode::Nested {
            reason: "HUSK_TESTHOST=nested".into(),
        },
        Ok("direct") => Mode::Direct,
        _ => Facts::read().mode(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let f = |dev_kvm, virt_flag, kvm_pvm| {
            Facts {
                dev_kvm,
                virt_flag,
                kvm_pvm,
            }
            .mode()
        };
        assert_eq!(f(true, Some("vmx"), false), Mode::Direct);
        assert_eq!(f(true, Some("svm"), false), Mode::Direct);
        assert!(matches!(f(true, None, true), Mode::Nested { .. }));
        assert!(matches!(f(true, Some("svm"), true), Mode::Nested { .. }));
        assert!(matches!(f(true, None, false), Mode::Nested { .. }));
        assert!(matches!(f(false, Some("vmx"), false), Mode::Nested { .. }));
    }

    #[test]
    fn flags_are_whole_words() {
        assert_eq!(virt_flag("flags\t: fpu svm sse\n"), Some("svm"));
        assert_eq!(virt_flag("flags\t: fpu vmx\n"), Some("vmx"));
        assert_eq!(virt_flag("flags\t: fpu svm_lock sse\n"), None);
        assert_eq!(virt_flag(""), None);
    }
}
