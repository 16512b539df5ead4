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

use std::collections::{BTreeMap, HashMap};
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

/// Whether seccompiler knows `name` on x86_64 (memoized: a profile names
/// some 350 syscalls and every container of a pod brings the same).
fn known(name: &str) -> bool {
    static KNOWN: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    let cache = KNOWN.get_or_init(Mutex::default);
    if let Some(k) = cache.lock().ok().and_then(|c| c.get(name).copied()) {
        return k;
    }
    let probe = json!({"p": {"default_action": "allow", "filter_action": "trap",
                             "filter": [{"syscall": name}]}});
    let k =
        seccompiler::compile_from_json(probe.to_string().as_bytes(), TargetArch::x86_64).is_ok();
    if let Ok(mut c) = cache.lock() {
        c.insert(name.to_string(), k);
    }
    k
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
            if !known(name) {
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
    fn default_only_profiles_compile() {
        // Allow everything: nothing to install.
        let p = compile(&profile(json!({"defaultAction": "SCMP_ACT_ALLOW"}))).unwrap();
        assert!(p.is_empty());
        let p = compile(&profile(json!({"defaultAction": "SCMP_ACT_KILL"}))).unwrap();
        assert_eq!(p.len(), 1);
    }
}
