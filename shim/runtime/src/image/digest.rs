//! Content digests. Every digest here came from a registry or a manifest,
//! so it is parsed before it names a file: exactly `sha256:` and 64
//! lowercase hex digits, nothing that could be a path.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::ImageError;

/// A sha256 content digest, `sha256:<64 hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| {
            ImageError::Invalid(format!("digest {s:?}: only sha256 is supported"))
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ImageError::Invalid(format!(
                "digest {s:?}: not sha256 and 64 lowercase hex digits"
            )));
        }
        Ok(Self(hex.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(bytes)))
    }

    /// The 64 hex digits: a file name in the store.
    pub fn hex(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, as docker shows ids.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl TryFrom<String> for Digest {
    type Error = ImageError;
    fn try_from(s: String) -> Result<Self, ImageError> {
        Self::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

/// sha256 over a stream, as it passes.
#[derive(Default)]
pub struct Hasher(Sha256);

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest(hex::encode(self.0.finalize()))
    }
}

/// A reader that hashes what is read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: std::io::Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Hasher::default(),
        }
    }

    pub fn finish(self) -> Digest {
        self.hasher.finish()
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The OCI chain ids of a stack of layers (bottom first): the first is the
/// layer's diff id, each next one `sha256(parent_chain + " " + diff_id)`. A
/// layer unpacked once per chain id is shared by every image with the same
/// layers below it.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => Digest::of(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_sha256_digests_parse() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&good).unwrap().to_string(), good);
        for bad in [
            "sha512:00",
            "sha256:",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}/..", "a".repeat(61)),
            &format!("sha256:{}", "a".repeat(65)),
            &"a".repeat(64),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], Digest::of(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn the_digest_of_empty_input_is_the_well_known_one() {
        assert_eq!(
            Digest::of(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut h = HashingReader::new(&b"abc"[..]);
        std::io::copy(&mut h, &mut std::io::sink()).unwrap();
        assert_eq!(h.finish(), Digest::of(b"abc"));
    }
}
