//! The control protocol: requests parsed from one line, responses as one line.

use serde::{Deserialize, Serialize};

/// The longest request line accepted, without its newline. Requests are tens of
/// bytes; the bound only keeps a misbehaving client from growing our buffers.
pub const MAX_LINE: usize = 64 * 1024;

/// A request, as `{"op": "..."}`.
///
/// The variants are empty structs rather than unit variants because serde
/// enforces `deny_unknown_fields` only on struct variants of an internally
/// tagged enum: `{"op":"shutdown","force":true}` must be an error, not a
/// shutdown that silently ignored what the client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness: answers `{"ok":true}`.
    Ping {},
    /// Stops the VM cleanly (exit status 0, "stopped by the host: control socket").
    Shutdown {},
    /// The VM's shape: [`VmInfo`].
    Info {},
    /// Pauses the VM, writes its snapshot to the directory configured at
    /// start (`--snapshot-to`; a client names no path), answers, and stops.
    /// The VM is not resumed: a snapshot is a template's last act, and its
    /// copies run from `--restore-from`.
    Snapshot {},
}

/// What `info` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub vcpus: u8,
    pub memory_mib: u64,
    /// husk-vmm's own pid (the shim may have started it through a jailer).
    pub pid: u32,
    /// The host side of vsock; null without a vsock device.
    pub vsock_socket: Option<String>,
    /// husk-vmm's Landlock jail: `landlock-abi-N` when it runs in one (the
    /// kernel's ABI, which says what it covers), `unsupported` on a kernel
    /// without Landlock, `off` when configured away.
    #[serde(default)]
    pub jail: String,
}

/// One response line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub info: Option<VmInfo>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            info: None,
        }
    }

    pub fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            info: None,
        }
    }

    /// The wire form: compact JSON and a newline.
    pub fn to_line(&self) -> Vec<u8> {
        // Serialising plain strings and numbers cannot fail; fall back to a fixed
        // line rather than panic if it ever did.
        let mut v = serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"ok":false,"error":"internal: response encoding"}"#.to_vec());
        v.push(b'\n');
        v
    }
}

/// What the server must do after answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// Stop the VM.
    Shutdown,
    /// Stop the VM for a snapshot; the answer comes once it is written.
    Snapshot,
}

/// Parses one request line (without its newline; a trailing `\r` is allowed).
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_LINE {
        return Err(format!("request line longer than {MAX_LINE} bytes"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))?;
    // serde would also take the tagged enum from an array (`["ping"]`); the
    // protocol is objects only.
    if !v.is_object() {
        return Err("bad request: expected a JSON object".into());
    }
    serde_json::from_value(v).map_err(|e| format!("bad request: {e}"))
}

/// Answers one request line.
pub fn handle(line: &[u8], info: &VmInfo) -> (Response, Action) {
    match parse(line) {
        Ok(Request::Ping {}) => (Response::ok(), Action::None),
        Ok(Request::Shutdown {}) => (Response::ok(), Action::Shutdown),
        Ok(Request::Snapshot {}) => (Response::ok(), Action::Snapshot),
        Ok(Request::Info {}) => (
            Response {
                info: Some(info.clone()),
                ..Response::ok()
            },
            Action::None,
        ),
        Err(e) => (Response::error(e), Action::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> VmInfo {
        VmInfo {
            vcpus: 2,
            memory_mib: 256,
            pid: 42,
            vsock_socket: Some("/run/husk/x/vsock.sock".into()),
            jail: "landlock-abi-6".into(),
        }
    }

    fn answer(line: &str) -> (String, Action) {
        let (r, a) = handle(line.as_bytes(), &info());
        (String::from_utf8(r.to_line()).unwrap(), a)
    }

    #[test]
    fn ping_and_shutdown() {
        assert_eq!(
            answer(r#"{"op":"ping"}"#),
            ("{\"ok\":true}\n".into(), Action::None)
        );
        assert_eq!(
            answer(" { \"op\" : \"shutdown\" }\r"),
            ("{\"ok\":true}\n".into(), Action::Shutdown)
        );
    }

    #[test]
    fn info_is_flat() {
        let (line, a) = answer(r#"{"op":"info"}"#);
        assert_eq!(a, Action::None);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": true, "vcpus": 2, "memory_mib": 256, "pid": 42,
                               "vsock_socket": "/run/husk/x/vsock.sock", "jail": "landlock-abi-6"})
        );
        let no_vsock = VmInfo {
            vsock_socket: None,
            ..info()
        };
        let (r, _) = handle(br#"{"op":"info"}"#, &no_vsock);
        let v: serde_json::Value = serde_json::from_slice(&r.to_line()).unwrap();
        assert_eq!(v["vsock_socket"], serde_json::Value::Null);
        // Round trip for clients written against these types.
        let back: Response = serde_json::from_slice(&r.to_line()).unwrap();
        assert_eq!(back.info, Some(no_vsock));
    }

    #[test]
    fn errors_are_responses() {
        for bad in [
            r#"{"op":"reboot"}"#,
            r#"{"op":"ping","extra":1}"#,
            r#"{"cmd":"ping"}"#,
            r#"{"op":7}"#,
            r#"["ping"]"#,
            "ping",
            "",
            "{",
            "\u{0}\u{1}",
        ] {
            let (r, a) = handle(bad.as_bytes(), &info());
            assert!(!r.ok, "{bad:?}");
            assert_eq!(a, Action::None, "{bad:?}");
            let v: serde_json::Value = serde_json::from_slice(&r.to_line()).unwrap();
            assert_eq!(v["ok"], false);
            assert!(
                v["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{bad:?}"
            );
        }
        let (r, _) = handle(&[0xff, 0xfe, b'{'], &info());
        assert!(!r.ok);
        assert!(r.to_line().ends_with(b"\n"));
    }

    #[test]
    fn oversized_lines_are_refused_before_parsing() {
        let mut line = br#"{"op":"ping","pad":""#.to_vec();
        line.resize(MAX_LINE + 1, b'a');
        assert!(parse(&line).unwrap_err().contains("longer"));
    }
}
