//! The log filter both front ends start from.

/// Log directives from `user` (RUST_LOG, or the front end's configured
/// level) or else `default`, with ttrpc kept to errors unless they name it.
/// ttrpc's client warns each time a call is dropped after its reply came,
/// which the agent's Shutdown racing the VM's exit does on every teardown:
/// noise in every log, with nothing for a user to do about it.
pub fn directives(user: Option<String>, default: &str) -> String {
    match user {
        Some(v) if v.contains("ttrpc") => v,
        Some(v) => format!("{v},ttrpc=error"),
        None => default.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::directives;

    #[test]
    fn ttrpc_is_quieted_unless_named() {
        assert_eq!(directives(Some("warn".into()), "x"), "warn,ttrpc=error");
        assert_eq!(directives(Some("ttrpc=debug".into()), "x"), "ttrpc=debug");
        assert_eq!(directives(None, "warn,ttrpc=error"), "warn,ttrpc=error");
    }
}
