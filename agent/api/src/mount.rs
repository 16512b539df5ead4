//! OCI mount options, parsed in one place for the agent (the container's
//! mounts in the guest) and the host (the shim's rootfs mounts).

use nix::mount::MsFlags;

/// The mount types the agent can make in the guest (anything else in a
/// spec is refused, naming the field).
pub const GUEST_MOUNT_TYPES: &[&str] = &[
    "bind", "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "overlay",
];

/// What a list of OCI mount options means to mount(2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// The flags for the mount call itself (MS_BIND, MS_RDONLY, ...).
    pub flags: MsFlags,
    /// The propagation to set afterwards in a call of its own (the kernel
    /// takes no other flags with it): empty if none was asked for,
    /// MS_PRIVATE|MS_REC for "rprivate", and so on. The last one wins.
    pub propagation: MsFlags,
    /// Everything else, for the filesystem (`size=64m`, `mode=755`, ...).
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            flags: MsFlags::empty(),
            propagation: MsFlags::empty(),
            data: Vec::new(),
        }
    }
}

impl MountOptions {
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }

    pub fn is_recursive(&self) -> bool {
        self.flags.contains(MsFlags::MS_REC)
    }

    pub fn is_readonly(&self) -> bool {
        self.flags.contains(MsFlags::MS_RDONLY)
    }
}

/// Parses OCI mount options as runc does: flag options set their bit,
/// their opposites ("rw", "suid", "dev", "exec", "atime", "async") clear
/// it, propagation options go to `propagation`, the rest to `data`.
pub fn parse_options<S: AsRef<str>>(options: &[S]) -> MountOptions {
    let mut o = MountOptions::default();
    for opt in options {
        let (set, clear) = match opt.as_ref() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            p => {
                match propagation(p) {
                    Some(flags) => o.propagation = flags,
                    None => o.data.push(p.to_string()),
                }
                continue;
            }
        };
        o.flags = (o.flags | set) - clear;
    }
    o
}

fn propagation(opt: &str) -> Option<MsFlags> {
    let (rec, kind) = match opt.strip_prefix('r') {
        // "rbind" never reaches here; "r" + a propagation is recursive.
        Some(k) if ["private", "shared", "slave", "unbindable"].contains(&k) => (true, k),
        _ => (false, opt),
    };
    let f = match kind {
        "private" => MsFlags::MS_PRIVATE,
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some(if rec { f | MsFlags::MS_REC } else { f })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_data() {
        let o = parse_options(&["ro", "nosuid", "rbind", "size=64m", "mode=755"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_BIND | MsFlags::MS_REC
        );
        assert!(o.is_bind() && o.is_recursive() && o.is_readonly());
        assert_eq!(o.data, ["size=64m", "mode=755"]);
        assert!(o.propagation.is_empty());
    }

    #[test]
    fn opposites_clear_their_bit() {
        let o = parse_options(&[
            "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime",
            "sync", "async",
        ]);
        assert_eq!(o.flags, MsFlags::empty());
        assert!(!o.is_readonly());
        let o = parse_options(&["rw", "ro", "defaults", "nodiratime", "relatime"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_RDONLY | MsFlags::MS_NODIRATIME | MsFlags::MS_RELATIME
        );
        assert!(o.data.is_empty());
        let o = parse_options(&["bind", "remount", "strictatime"]);
        assert!(o.is_bind() && !o.is_recursive());
        assert!(o
            .flags
            .contains(MsFlags::MS_REMOUNT | MsFlags::MS_STRICTATIME));
    }

    #[test]
    fn propagation_is_apart() {
        for (opt, want) in [
            ("private", MsFlags::MS_PRIVATE),
            ("rprivate", MsFlags::MS_PRIVATE | MsFlags::MS_REC),
            ("shared", MsFlags::MS_SHARED),
            ("rshared", MsFlags::MS_SHARED | MsFlags::MS_REC),
            ("slave", MsFlags::MS_SLAVE),
            ("rslave", MsFlags::MS_SLAVE | MsFlags::MS_REC),
            ("unbindable", MsFlags::MS_UNBINDABLE),
            ("runbindable", MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
        ] {
            let o = parse_options(&[opt]);
            assert_eq!(o.propagation, want, "{opt}");
            assert!(o.flags.is_empty() && o.data.is_empty(), "{opt}");
        }
        // Unknown words, "r"-prefixed or not, are the filesystem's.
        let o = parse_options(&["rsize=8192", "lowerdir=/l"]);
        assert_eq!(o.data, ["rsize=8192", "lowerdir=/l"]);
        let none: [&str; 0] = [];
        assert_eq!(parse_options(&none), MountOptions::default());
    }
}
