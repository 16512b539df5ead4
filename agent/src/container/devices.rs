//! The device cgroup: which device nodes a container may create (mknod),
//! read and write, from the spec's `linux.resources.devices` and runc's
//! default allowlist.
//!
//! cgroup v2 has no `devices.allow` file: the kernel asks an eBPF program
//! of type `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the cgroup, with the
//! device's type, major, minor and the access asked for, and the program
//! answers 1 (allow) or 0. The program is generated here by hand, as runc
//! and crun generate theirs: it is a straight run of compares, at most ten
//! instructions a rule, and the crates that load eBPF (aya, libbpf-rs) bring
//! an ELF toolchain or a C library for what two `bpf(2)` calls do.
//!
//! Semantics (runc's): the spec's rules, then the default allowlist, and the
//! last rule that matches a request decides; a request that no rule matches
//! is denied. A rule matches when its type (or `a`), major and minor (or
//! wildcards) match and it grants every access asked for. Containers get no
//! `mknod` of anything the list does not name, so a container with
//! CAP_MKNOD cannot make the console husk-vmm reads (`ttyS0`) or `kmsg`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

/// At most this many rules (the spec's and the defaults): a bound on the
/// program's size far above what any runtime sends.
pub const MAX_RULES: usize = 1024;

/// The access bits the kernel passes (`BPF_DEVCG_ACC_*`).
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;
/// The device types the kernel passes (`BPF_DEVCG_DEV_*`).
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("linux.resources.devices: {0}")]
    Invalid(String),
    #[error("loading the device cgroup program: {source}{}", if log.is_empty() { String::new() } else { format!("; verifier: {log}") })]
    Load { source: std::io::Error, log: String },
    #[error("attaching the device cgroup program to {path}: {source}")]
    Attach {
        path: String,
        source: std::io::Error,
    },
}

/// One rule, decoded: `None` is a wildcard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

impl Rule {
    const fn chr(major: u32, minor: Option<u32>) -> Rule {
        Rule {
            allow: true,
            kind: Some(DEV_CHAR),
            major: Some(major),
            minor,
            access: ACC_ALL,
        }
    }
}

/// What every container may use whatever its spec says, as runc allows it
/// (less runc's `mknod` of any node and `/dev/net/tun`): the nodes the agent
/// binds into its `/dev` and the ptys of its devpts.
const DEFAULT_ALLOWED: [Rule; 9] = [
    Rule::chr(1, Some(3)), // null
    Rule::chr(1, Some(5)), // zero
    Rule::chr(1, Some(7)), // full
    Rule::chr(1, Some(8)), // random
    Rule::chr(1, Some(9)), // urandom
    Rule::chr(5, Some(0)), // tty
    Rule::chr(5, Some(1)), // console
    Rule::chr(5, Some(2)), // ptmx
    Rule::chr(136, None),  // pts/*
];

fn decode(d: &LinuxDeviceCgroup) -> Result<Rule, DeviceError> {
    let kind = match d.typ().unwrap_or(LinuxDeviceType::A) {
        LinuxDeviceType::A => None,
        LinuxDeviceType::B => Some(DEV_BLOCK),
        LinuxDeviceType::C | LinuxDeviceType::U => Some(DEV_CHAR),
        LinuxDeviceType::P => {
            return Err(DeviceError::Invalid(
                "type p (FIFO) is not a device type".into(),
            ))
        }
    };
    let number = |n: Option<i64>, what: &str| -> Result<Option<u32>, DeviceError> {
        match n {
            None | Some(-1) => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| DeviceError::Invalid(format!("{what} {n} is out of range"))),
        }
    };
    let access = match d.access().as_deref() {
        None | Some("") => ACC_ALL,
        Some(s) => s.chars().try_fold(0, |acc, c| match c {
            'r' => Ok(acc | ACC_READ),
            'w' => Ok(acc | ACC_WRITE),
            'm' => Ok(acc | ACC_MKNOD),
            _ => Err(DeviceError::Invalid(format!(
                "access {s:?}: only r, w and m"
            ))),
        })?,
    };
    Ok(Rule {
        allow: d.allow(),
        kind,
        major: number(d.major(), "major")?,
        minor: number(d.minor(), "minor")?,
        access,
    })
}

/// The rules for a container: the spec's (all denied when it has none),
/// then the defaults.
pub fn rules(spec: Option<&[LinuxDeviceCgroup]>) -> Result<Vec<Rule>, DeviceError> {
    let spec = spec.unwrap_or_default();
    if spec.len() + DEFAULT_ALLOWED.len() > MAX_RULES {
        return Err(DeviceError::Invalid(format!(
            "{} rules; at most {}",
            spec.len(),
            MAX_RULES - DEFAULT_ALLOWED.len()
        )));
    }
    let mut v = spec.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    v.extend(DEFAULT_ALLOWED);
    Ok(v)
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// The opcodes used (include/uapi/linux/bpf_common.h, bpf.h).
const LDX_MEM_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const MOV64_X: u8 = 0xbf; // dst = src
const MOV64_K: u8 = 0xb7; // dst = imm
const AND32_K: u8 = 0x54; // dst = (u32)dst & imm
const RSH32_K: u8 = 0x74; // dst = (u32)dst >> imm
const JNE_K: u8 = 0x55; // if dst != imm: pc += off
const EXIT: u8 = 0x95;

/// The program for `rules`: registers r2 = access, r3 = type, r4 = major,
/// r5 = minor, then one block per rule, last rule first, each ending in an
/// answer; no rule matching: deny. A rule that matches everything ends the
/// program (the rules before it can never decide).
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0), // access_type
        insn(MOV64_X, 3, 2, 0, 0),
        insn(AND32_K, 3, 0, 0, 0xffff), // type: low half
        insn(RSH32_K, 2, 0, 0, 16),     // access: high half
        insn(LDX_MEM_W, 4, 1, 4, 0),    // major
        insn(LDX_MEM_W, 5, 1, 8, 0),    // minor
    ];
    for r in rules.iter().rev() {
        let mut checks: Vec<Insn> = Vec::new();
        for (reg, want) in [(3, r.kind), (4, r.major), (5, r.minor)] {
            if let Some(w) = want {
                // The kernel compares the register as 64 bits with the
                // immediate sign-extended: values above i32::MAX (a major
                // that large does not exist) would never match.
                checks.push(insn(JNE_K, reg, 0, 0, w as i32));
            }
        }
        if r.access != ACC_ALL {
            // Asked for anything the rule does not grant: not this rule.
            checks.push(insn(MOV64_X, 1, 2, 0, 0));
            checks.push(insn(AND32_K, 1, 0, 0, (!r.access & ACC_ALL) as i32));
            checks.push(insn(JNE_K, 1, 0, 0, 0));
        }
        let answer = [
            insn(MOV64_K, 0, 0, 0, i32::from(r.allow)),
            insn(EXIT, 0, 0, 0, 0),
        ];
        // Every check jumps past the rest of the block.
        let n = checks.len();
        for (i, c) in checks.iter_mut().enumerate() {
            if c.code == JNE_K {
                c.off = (n - i - 1 + answer.len()) as i16;
            }
        }
        let unconditional = checks.is_empty();
        p.extend(checks);
        p.extend(answer);
        if unconditional {
            // It answers every request that reaches it: what would follow
            // is unreachable, which the verifier refuses.
            return p;
        }
    }
    p.extend([insn(MOV64_K, 0, 0, 0, 0), insn(EXIT, 0, 0, 0, 0)]);
    p
}

/// `bpf(2)` commands, program and attach types used.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Programs of the cgroup's ancestors run too, and all must allow.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `union bpf_attr` as BPF_PROG_LOAD reads it, up to the fields set here.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `union bpf_attr` as BPF_PROG_ATTACH reads it.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// Loads `prog` into the kernel (the verifier checks it).
pub fn load(prog: &[Insn]) -> Result<OwnedFd, DeviceError> {
    // Without the verifier's log first: asking for it makes the verifier
    // print every instruction's state, which costs more than the check
    // itself. Only a refusal is loaded again, for the log to say why.
    load_with_log(prog, false).or_else(|_| load_with_log(prog, true))
}

fn load_with_log(prog: &[Insn], with_log: bool) -> Result<OwnedFd, DeviceError> {
    let mut log = vec![0u8; if with_log { 64 * 1024 } else { 0 }];
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"husk_device");
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: c"Apache-2.0".as_ptr() as u64,
        log_level: u32::from(with_log),
        log_size: log.len() as u32,
        log_buf: if with_log { log.as_mut_ptr() as u64 } else { 0 },
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
    };
    // SAFETY: bpf(BPF_PROG_LOAD) reads `attr` (size given) and the
    // instructions, license string and log buffer it points to (none when
    // the log size is 0), all alive and of the stated sizes until the call
    // returns; it writes only into the log buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>() as u32,
        )
    };
    if fd < 0 {
        let source = std::io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let log = String::from_utf8_lossy(&log[..end]).trim().to_string();
        return Err(DeviceError::Load { source, log });
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The most programs [`loaded`] keeps.
const MAX_CACHED_PROGRAMS: usize = 16;

/// The program for `rules`, loaded once and shared: one loaded program can
/// be attached to any number of cgroups, and the containers of a pod (and
/// every CRI container, whose spec starts with the same deny-all rule)
/// mostly have the same rules. Each caller gets its own fd of it.
pub fn loaded(rules: &[Rule]) -> Result<OwnedFd, DeviceError> {
    static CACHE: std::sync::Mutex<Vec<(Vec<Insn>, OwnedFd)>> = std::sync::Mutex::new(Vec::new());
    let prog = program(rules);
    let dup = |fd: &OwnedFd| {
        fd.try_clone().map_err(|source| DeviceError::Load {
            source,
            log: String::new(),
        })
    };
    if let Some((_, fd)) = CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(p, _)| *p == prog)
    {
        return dup(fd);
    }
    // Loaded with the lock released: the verifier takes its time.
    let fd = load(&prog)?;
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() < MAX_CACHED_PROGRAMS && !cache.iter().any(|(p, _)| *p == prog) {
        cache.push((prog, dup(&fd)?));
    }
    Ok(fd)
}

/// Loads the programs of the usual rules ahead of any container: the
/// default allowlist alone, and after the deny-all rule containerd's and
/// CRI's specs begin with (today both compile to one program, loaded
/// once: the cache is keyed by the program). Called before the agent
/// reports ready, so that a VM template holds them and no clone pays for
/// the verifier.
pub fn preload() -> Result<(), DeviceError> {
    loaded(&rules(None)?)?;
    loaded(&after_deny_all())?;
    Ok(())
}

/// The rules of a spec whose only device rule is containerd's deny-all.
fn after_deny_all() -> Vec<Rule> {
    let deny_all = Rule {
        allow: false,
        kind: None,
        major: None,
        minor: None,
        access: ACC_ALL,
    };
    std::iter::once(deny_all).chain(DEFAULT_ALLOWED).collect()
}

/// A program attached to a cgroup, with its instructions: the same rules
/// make the same (shared, [`loaded`]) program, which the kernel will not
/// attach to one cgroup twice.
#[derive(Debug)]
pub struct Attached {
    fd: OwnedFd,
    prog: Vec<Insn>,
}

/// Loads the program for `rules` and attaches it to `cgroup` beside any
/// already there (`BPF_F_ALLOW_MULTI`: a request must pass every attached
/// program). Returns the program, which [`replace`] needs to take it off.
pub fn apply(cgroup: &Path, rules: &[Rule]) -> Result<Attached, DeviceError> {
    let fd = loaded(rules)?;
    let dir = std::fs::File::open(cgroup).map_err(|e| attach_err(cgroup, e))?;
    attach_call(BPF_PROG_ATTACH, &dir, &fd, BPF_F_ALLOW_MULTI)
        .map_err(|e| attach_err(cgroup, e))?;
    Ok(Attached {
        fd,
        prog: program(rules),
    })
}

/// Swaps `old` for a program of `rules`: the new one is attached before
/// the old one is taken off, so no device request is ever judged by
/// neither (for a moment, by both: the stricter). Rules that make the
/// program attached already (containerd sends the same rules with every
/// update) leave it as it is: `None`.
pub fn replace(
    cgroup: &Path,
    old: &Attached,
    rules: &[Rule],
) -> Result<Option<Attached>, DeviceError> {
    if program(rules) == old.prog {
        return Ok(None);
    }
    let new = apply(cgroup, rules)?;
    let dir = std::fs::File::open(cgroup).map_err(|e| attach_err(cgroup, e))?;
    if let Err(e) = attach_call(BPF_PROG_DETACH, &dir, &old.fd, 0) {
        // Both stay attached, which only denies more; the old rules must
        // not be reported as replaced.
        let _ = attach_call(BPF_PROG_DETACH, &dir, &new.fd, 0);
        return Err(attach_err(cgroup, e));
    }
    Ok(Some(new))
}

fn attach_err(cgroup: &Path, source: std::io::Error) -> DeviceError {
    DeviceError::Attach {
        path: cgroup.display().to_string(),
        source,
    }
}

/// `bpf(BPF_PROG_ATTACH | BPF_PROG_DETACH)` of `prog` on the cgroup `dir`.
fn attach_call(
    cmd: libc::c_long,
    dir: &std::fs::File,
    prog: &OwnedFd,
    flags: u32,
) -> std::io::Result<()> {
    let attr = ProgAttach {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: flags,
    };
    // SAFETY: bpf(2) with a PROG_ATTACH/PROG_DETACH attribute that lives
    // across the call and whose size is passed; both fds are open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ProgAttach,
            std::mem::size_of::<ProgAttach>() as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` the way the kernel would for one request: the few
    /// instructions [`program`] emits, nothing else.
    fn run(prog: &[Insn], kind: u32, major: u32, minor: u32, access: u32) -> u64 {
        let ctx = [(access << 16) | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    r[dst] = u64::from(ctx[(i.off / 4) as usize]);
                }
                MOV64_X => r[dst] = r[src],
                MOV64_K => r[dst] = i.imm as i64 as u64,
                AND32_K => r[dst] = u64::from((r[dst] as u32) & (i.imm as u32)),
                RSH32_K => r[dst] = u64::from((r[dst] as u32) >> i.imm),
                JNE_K => {
                    if r[dst] != i.imm as i64 as u64 {
                        assert!(i.off >= 0, "forward jumps only");
                        pc += i.off as usize;
                    }
                }
                EXIT => return r[0],
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    fn spec(json: serde_json::Value) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_value(json).unwrap()
    }

    const R: u32 = ACC_READ;
    const W: u32 = ACC_WRITE;
    const M: u32 = ACC_MKNOD;

    #[test]
    fn no_spec_rules_allow_the_defaults_only() {
        let p = program(&rules(None).unwrap());
        assert_eq!(run(&p, DEV_CHAR, 1, 3, R | W), 1, "null");
        assert_eq!(run(&p, DEV_CHAR, 1, 3, M), 1, "mknod null");
        assert_eq!(run(&p, DEV_CHAR, 1, 9, R), 1, "urandom");
        assert_eq!(run(&p, DEV_CHAR, 136, 7, R | W), 1, "a pty");
        assert_eq!(run(&p, DEV_CHAR, 5, 2, R | W), 1, "ptmx");
        assert_eq!(run(&p, DEV_CHAR, 4, 64, M), 0, "mknod ttyS0");
        assert_eq!(run(&p, DEV_CHAR, 4, 64, W), 0, "write ttyS0");
        assert_eq!(run(&p, DEV_CHAR, 1, 11, W), 0, "kmsg");
        assert_eq!(run(&p, DEV_BLOCK, 1, 3, R), 0, "a block device 1:3");
        assert_eq!(run(&p, DEV_BLOCK, 254, 0, R | W), 0, "a disk");
    }

    #[test]
    fn the_last_matching_rule_wins_as_in_runc() {
        // containerd's shape: deny everything, then allow what it grants.
        let s = spec(serde_json::json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"},
            {"allow": true, "type": "b", "major": 7, "access": "r"}
        ]));
        let p = program(&rules(Some(&s)).unwrap());
        assert_eq!(run(&p, DEV_CHAR, 10, 229, R | W), 1, "fuse rw");
        assert_eq!(run(&p, DEV_CHAR, 10, 229, M), 0, "fuse mknod: not granted");
        assert_eq!(
            run(&p, DEV_BLOCK, 7, 3, R),
            1,
            "loop3 read (minor wildcard)"
        );
        assert_eq!(run(&p, DEV_BLOCK, 7, 3, R | W), 0, "loop3 write");
        assert_eq!(run(&p, DEV_CHAR, 1, 3, R | W), 1, "defaults after the spec");
        // A privileged container: everything.
        let all = spec(serde_json::json!([{"allow": true, "type": "a", "access": "rwm"}]));
        let p = program(&rules(Some(&all)).unwrap());
        assert_eq!(run(&p, DEV_BLOCK, 254, 0, R | W | M), 1);
        assert_eq!(run(&p, DEV_CHAR, 4, 64, M), 1);
        // A later deny beats an earlier allow.
        let s = spec(serde_json::json!([
            {"allow": true, "type": "a", "access": "rwm"},
            {"allow": false, "type": "c", "major": 1, "minor": 11, "access": "rwm"}
        ]));
        let p = program(&rules(Some(&s)).unwrap());
        assert_eq!(run(&p, DEV_CHAR, 1, 11, W), 0);
        assert_eq!(run(&p, DEV_CHAR, 1, 12, W), 1);
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        let bad = |v: serde_json::Value| rules(Some(&spec(v))).unwrap_err().to_string();
        assert!(
            bad(serde_json::json!([{"allow": true, "access": "rwx"}])).contains("only r, w and m")
        );
        assert!(bad(
            serde_json::json!([{"allow": true, "type": "c", "major": 1 + u32::MAX as i64}])
        )
        .contains("out of range"));
        assert!(bad(serde_json::json!([{"allow": true, "type": "p"}])).contains("FIFO"));
        let many = serde_json::Value::Array(vec![serde_json::json!({"allow": true}); MAX_RULES]);
        assert!(bad(many).contains("at most"));
    }

    #[test]
    fn the_kernels_verifier_accepts_the_programs() {
        // This machine's kernel (the test runs as root, as the agent does).
        for r in [
            rules(None).unwrap(),
            rules(Some(&spec(serde_json::json!([
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"},
                {"allow": true, "type": "b", "access": "m"}
            ]))))
            .unwrap(),
        ] {
            if let Err(e) = load(&program(&r)) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn the_preloaded_rules_are_containerds_default() {
        let containerd = rules(Some(&spec(serde_json::json!([
            {"allow": false, "access": "rwm"}
        ]))))
        .unwrap();
        assert_eq!(containerd, after_deny_all());
    }

    #[test]
    fn a_refused_program_says_why_and_a_shared_one_loads_once() {
        // Falls off the end without an exit: the verifier refuses it, and
        // the second, logged load says so.
        let bad = [insn(MOV64_X, 0, 1, 0, 0)];
        match load(&bad) {
            Err(DeviceError::Load { log, .. }) => assert!(!log.is_empty(), "no verifier log"),
            other => panic!("loaded a program without exit: {other:?}"),
        }
        let r = rules(None).unwrap();
        let (a, b) = (loaded(&r).unwrap(), loaded(&r).unwrap());
        assert_ne!(a.as_raw_fd(), b.as_raw_fd(), "each caller owns its fd");
    }

    #[test]
    fn an_update_with_the_same_rules_leaves_the_program_attached() {
        // The kernel refuses to attach a program to a cgroup it is attached
        // to already (EINVAL on 6.1): the same rules must not get that far.
        // The cgroup does not exist: any bpf(2) call on it would fail.
        let r = rules(None).unwrap();
        let old = Attached {
            fd: loaded(&r).unwrap(),
            prog: program(&r),
        };
        let nowhere = Path::new("/nonexistent/cgroup");
        assert!(replace(nowhere, &old, &r).unwrap().is_none());
        let other = rules(Some(&spec(serde_json::json!([
            {"allow": true, "type": "b", "access": "m"}
        ]))))
        .unwrap();
        assert!(replace(nowhere, &old, &other).is_err());
    }
}
