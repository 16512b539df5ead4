//! containerd's runtime options: where the shim's config file is.

use std::path::PathBuf;

/// The `ConfigPath` of containerd's runtime options
/// (`runtimeoptions.v1.Options`: field 1 type_url, field 2 config_path), as
/// CRI's `runtimes.<name>.options.ConfigPath` and `ctr run
/// --runtime-config-path` send them. Other option types carry none.
pub fn config_path_from_options(type_url: &str, value: &[u8]) -> Option<PathBuf> {
    use protobuf::rt::WireType;
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut is = protobuf::CodedInputStream::from_bytes(value);
    let mut found = None;
    while let Ok(Some(tag)) = is.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, WireType::new(tag & 7)?);
        if field == 2 && wire == WireType::LengthDelimited {
            found = is.read_string().ok();
        } else if protobuf::rt::skip_field_for_tag(tag, &mut is).is_err() {
            break;
        }
    }
    found.filter(|p| !p.is_empty()).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_from_runtime_options() {
        // field 1 "t", field 2 "/etc/h.toml"
        let mut v = vec![0x0a, 1, b't', 0x12, 11];
        v.extend_from_slice(b"/etc/h.toml");
        assert_eq!(
            config_path_from_options("runtimeoptions.v1.Options", &v),
            Some(PathBuf::from("/etc/h.toml"))
        );
        assert_eq!(
            config_path_from_options("containerd.runc.v1.Options", &v),
            None
        );
        assert_eq!(
            config_path_from_options("runtimeoptions.v1.Options", &[]),
            None
        );
    }
}
