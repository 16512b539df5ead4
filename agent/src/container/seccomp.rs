//! The spec's seccomp profile as BPF, through seccompiler.
//!
//! A seccompiler filter has one action on match and one on mismatch; an
//! OCI profile gives each rule its own action. The kernel runs every
//! installed filter and takes the most restrictive answer (kill > trap >
//! errno > trace > log > allow), so a profile becomes a stack:
//! - one filter that allows every syscall any rule names (with the rule's
//!   argument conditions) and answers everything else with the default
//!   action;
//! - one filter per other action that answers that action for its rules
//!   and allows the rest.
//!
//! A rule whose action is the default adds nothing and is dropped. Syscall
//! names go through seccompiler's JSON front end, the only public way to
//! its syscall table; names it does not know (newer or other-architecture
//! syscalls, which docker's default profile lists) are skipped, as
//! libseccomp skips them. Not expressible, and refused naming the field:
//! SCMP_ACT_NOTIFY (needs a listener) and filter flags other than
//! SPEC_ALLOW and LOG.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{sock_filter, TargetArch};
use serde_json::{json, Value};

use super::spec::SpecError;

/// One BPF program, ready for seccomp(SECCOMP_SET_MODE_FILTER).
pub type Program = Vec<sock_filter>;

fn err(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// seccompiler's JSON for an action, or why it cannot be.
fn action(a: LinuxSeccompAction, errno: Option<u32>, field: &str) -> Result<Value, SpecError> {
    use LinuxSeccompAction as A;
    Ok(match a {
        A::ScmpActAllow => json!("allow"),
        A::ScmpActErrno => json!({"errno": errno.unwrap_or(libc::EPERM as u32)}),
        A::ScmpActKill | A::ScmpActKillThread => json!("kill_thread"),
        A::ScmpActKillProcess => json!("kill_process"),
        A::ScmpActTrap => json!("trap"),
        A::ScmpActTrace => json!({"trace": errno.unwrap_or(0)}),
        A::ScmpActLog => json!("log"),
        other => {
            return Err(err(
                field,
                format!("{other:?} cannot be expressed in the guest (it needs a listener)"),
            ))
        }
    })
}

fn operator(op: LinuxSeccompOperator, value_two: Option<u64>) -> Value {
    use LinuxSeccompOperator as O;
    match op {
        O::ScmpCmpNe => json!("ne"),
        O::ScmpCmpLt => json!("lt"),
        O::ScmpCmpLe => json!("le"),
        O::ScmpCmpEq => json!("eq"),
        O::ScmpCmpGe => json!("ge"),
        O::ScmpCmpGt => json!("gt"),
        // libseccomp: (arg & value) == valueTwo; seccompiler's masked_eq
        // takes the mask and compares with `val`.
        O::ScmpCmpMaskedEq => json!({"masked_eq": value_two.unwrap_or(0)}),
    }
}

/// The names out of `names` that seccompiler knows on x86_64. A profile
/// names some 350 syscalls, some of them unknown here (other arches, newer
/// kernels), which runc skips; seccompiler's table is private, so it is
/// asked: one compile of them all, and each name its error reports is
/// dropped and the rest compiled again (a handful of compiles for Docker's
/// profile). An error that names none of them (a change of wording
/// upstream) halves the set instead. Memoized: a pod's containers bring the
/// same profile.
fn known_names<'a>(names: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
    static KNOWN: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    let mut cache = KNOWN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let names: BTreeSet<&str> = names.into_iter().collect();
    let new: Vec<String> = names
        .iter()
        .filter(|n| !cache.contains_key(**n))
        .map(|n| n.to_string())
        .collect();
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    sort_out(new, &probe, &mut known, &mut unknown);
    cache.extend(known.into_iter().map(|n| (n, true)));
    cache.extend(unknown.into_iter().map(|n| (n, false)));
    names
        .into_iter()
        .filter(|n| cache.get(*n).copied().unwrap_or(false))
        .map(str::to_string)
        .collect()
}

/// Asks seccompiler to compile a filter of `names`; its error, as text.
fn probe(names: &[String]) -> Result<(), String> {
    let filter: Vec<Value> = names.iter().map(|n| json!({"syscall": n})).collect();
    let probe = json!({"p": {"default_action": "allow", "filter_action": "trap",
                             "filter": filter}});
    seccompiler::compile_from_json(probe.to_string().as_bytes(), TargetArch::x86_64)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn sort_out(
    mut rest: Vec<String>,
    probe: &dyn Fn(&[String]) -> Result<(), String>,
    known: &mut Vec<String>,
    unknown: &mut Vec<String>,
) {
    while !rest.is_empty() {
        let msg = match probe(&rest) {
            Ok(()) => return known.append(&mut rest),
            Err(msg) => msg,
        };
        if rest.len() == 1 {
            return unknown.append(&mut rest);
        }
        match rest
            .iter()
            .position(|n| msg.contains(&format!("name: {n} for")))
        {
            Some(i) => unknown.push(rest.swap_remove(i)),
            None => {
                let half = rest.split_off(rest.len() / 2);
                sort_out(half, probe, known, unknown);
            }
        }
    }
}

/// Compiles the profile into the programs to install, in order.
pub fn compile(s: &LinuxSeccomp) -> Result<Vec<Program>, SpecError> {
    if let Some(archs) = s.architectures() {
        if !archs.is_empty() && !archs.contains(&Arch::ScmpArchX86_64) {
            return Err(err(
                "linux.seccomp.architectures",
                "does not include SCMP_ARCH_X86_64, the guest's",
            ));
        }
    }
    for f in s.flags().iter().flatten() {
        let name = serde_json::to_value(f)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        if !matches!(
            name.as_str(),
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" | "SECCOMP_FILTER_FLAG_LOG"
        ) {
            return Err(err(
                "linux.seccomp.flags",
                format!("{name} is not supported"),
            ));
        }
    }
    let known = known_names(
        s.syscalls()
            .iter()
            .flatten()
            .flat_map(|sc| sc.names().iter().map(String::as_str)),
    );
    let default = action(
        s.default_action(),
        s.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;
    // Rules by action (its JSON text as the key), and all rules together.
    let mut groups: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
    let mut every = Vec::new();
    for (i, sc) in s.syscalls().iter().flatten().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let act = action(sc.action(), sc.errno_ret(), &format!("{field}.action"))?;
        let mut args = Vec::new();
        for (j, a) in sc.args().iter().flatten().enumerate() {
            if a.index() > 5 {
                return Err(err(
                    format!("{field}.args[{j}].index"),
                    format!("{} is not a syscall argument (0-5)", a.index()),
                ));
            }
            let masked = a.op() == LinuxSeccompOperator::ScmpCmpMaskedEq;
            args.push(json!({
                "index": a.index(),
                "type": "qword",
                "op": operator(a.op(), Some(a.value())),
                "val": if masked { a.value_two().unwrap_or(0) } else { a.value() },
            }));
        }
        if act == default {
            continue;
        }
        for name in sc.names() {
            if !known.contains(name) {
                continue;
            }
            let rule = if args.is_empty() {
                json!({"syscall": name})
            } else {
                json!({"syscall": name, "args": args})
            };
            every.push(rule.clone());
            if act != json!("allow") {
                groups
                    .entry(act.to_string())
                    .or_insert_with(|| (act.clone(), Vec::new()))
                    .1
                    .push(rule);
            }
        }
    }
    let mut filters = serde_json::Map::new();
    // With "allow" as the default the first filter would allow everything:
    // the per-action filters say it all.
    if default != json!("allow") {
        if every.is_empty() {
            // Nothing named: the default for everything. seccompiler needs
            // a rule, so one that can never match (argument 5 equal to 1
            // and to 2).
            every.push(json!({"syscall": "getpid", "args": [
                {"index": 5, "type": "qword", "op": "eq", "val": 1},
                {"index": 5, "type": "qword", "op": "eq", "val": 2}]}));
        }
        filters.insert(
            "0-default".into(),
            json!({"default_action": default, "filter_action": "allow", "filter": every}),
        );
    }
    for (i, (act, rules)) in groups.into_values().enumerate() {
        filters.insert(
            format!("{}-action", i + 1),
            json!({"default_action": "allow", "filter_action": act, "filter": rules}),
        );
    }
    let map = seccompiler::compile_from_json(
        Value::Object(filters).to_string().as_bytes(),
        TargetArch::x86_64,
    )
    .map_err(|e| err("linux.seccomp", e.to_string()))?;
    let mut named: Vec<_> = map.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named.into_iter().map(|(_, p)| p).collect())
}

/// The annotation with which a container may open AF_VSOCK sockets.
pub const VSOCK_ANNOTATION: &str = "io.husk.vsock";

/// A filter every container gets unless [`VSOCK_ANNOTATION`] is "allow",
/// whatever its own profile says (Kubernetes' default is none at all):
/// vsock is the VM's control plane (the agent's API, the host's log port)
/// and no network namespace separates it, so `socket(AF_VSOCK, ..)` fails
/// with EAFNOSUPPORT, as on a kernel without vsock. io_uring goes too
/// (ENOSYS, so programs fall back to plain syscalls): its socket operation
/// would make the same socket without a syscall for seccomp to see.
///
/// The filters are the same for every container: compiled once, on the
/// first create, and copied from then on.
pub fn vsock_guard() -> Result<Vec<Program>, SpecError> {
    static GUARD: OnceLock<Result<Vec<Program>, String>> = OnceLock::new();
    GUARD
        .get_or_init(|| {
            let filter = json!({"vsock-guard": {
                "default_action": "allow",
                "filter_action": {"errno": libc::EAFNOSUPPORT},
                "filter": [{"syscall": "socket", "args": [
                    {"index": 0, "type": "dword", "op": "eq", "val": libc::AF_VSOCK}]}],
            }, "io-uring-guard": {
                "default_action": "allow",
                "filter_action": {"errno": libc::ENOSYS},
                "filter": [{"syscall": "io_uring_setup"}],
            }});
            seccompiler::compile_from_json(filter.to_string().as_bytes(), TargetArch::x86_64)
                // Each is a program of its own: the kernel runs every installed one.
                .map(|map| map.into_values().collect())
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| err("the vsock guard", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(v: Value) -> LinuxSeccomp {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn an_allow_list_is_one_filter_and_errno_rules_stack() {
        let p = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {"names": ["read", "write", "no_such_syscall_xyz"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}
            ]
        })))
        .unwrap();
        // The default filter, and mkdir's EACCES filter; the unknown name
        // is skipped.
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|prog| !prog.is_empty()));
    }

    #[test]
    fn what_cannot_be_expressed_names_the_field() {
        let e = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "linux.seccomp.syscalls[0].action");
        let e = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_AARCH64"]
        })))
        .unwrap_err();
        assert_eq!(e.field, "linux.seccomp.architectures");
        let e = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 7, "value": 1, "op": "SCMP_CMP_EQ"}]}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "linux.seccomp.syscalls[0].args[0].index");
    }

    #[test]
    fn unknown_names_are_sorted_out_in_few_compiles() {
        let names = [
            "read",
            "no_such_call_a",
            "openat",
            "arm_fadvise64_64",
            "getpid",
            "no_such_call_b",
            "io_uring_setup",
        ];
        let known = known_names(names);
        let mut k: Vec<_> = known.iter().map(String::as_str).collect();
        k.sort_unstable();
        assert_eq!(k, ["getpid", "io_uring_setup", "openat", "read"]);
        // Asked again (memoized), the answer is the same.
        assert_eq!(known_names(names), known);
        // An error that names nothing (other wording): halving finds them.
        let vague = |n: &[String]| match n.iter().any(|n| n.starts_with("nope")) {
            true => Err("no".to_string()),
            false => Ok(()),
        };
        let (mut yes, mut no) = (Vec::new(), Vec::new());
        let all = ["read", "nope_1", "write", "stat", "nope_2"];
        sort_out(all.map(String::from).to_vec(), &vague, &mut yes, &mut no);
        yes.sort();
        no.sort();
        assert_eq!(
            (yes, no),
            (
                vec!["read".into(), "stat".into(), "write".into()],
                vec!["nope_1".to_string(), "nope_2".into()]
            )
        );
    }

    #[test]
    fn default_only_profiles_compile() {
        // Allow everything: nothing to install.
        let p = compile(&profile(json!({"defaultAction": "SCMP_ACT_ALLOW"}))).unwrap();
        assert!(p.is_empty());
        let p = compile(&profile(json!({"defaultAction": "SCMP_ACT_KILL"}))).unwrap();
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn the_vsock_guard_is_two_programs() {
        let p = vsock_guard().unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|f| !f.is_empty()));
    }
}
