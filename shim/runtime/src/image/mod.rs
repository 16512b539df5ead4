//! Images for the `husk` CLI: pulled from registries into a content store,
//! unpacked once per layer, stacked as overlayfs lower layers under each
//! container's own writable layer. The shim never uses this: containerd
//! brings its own images and snapshots.
//!
//! | module | concern |
//! | --- | --- |
//! | [`digest`] | sha256 digests parsed before they name a file; chain ids |
//! | [`store`] | blobs verified as they stream in, locks, layer and container dirs |
//! | [`unpack`] | a layer's tar made into files on descriptors, whiteouts for overlayfs |
//! | [`index`] | names -> manifests (`images.json`), image configs, garbage collection |
//! | [`usage`] | disk used by a tree, walked on descriptors (`husk system df`) |
//! | `pull` | the OCI distribution protocol (oci-client), feature `pull` |

pub mod digest;
pub mod index;
pub mod store;
pub mod unpack;
pub mod usage;

#[cfg(feature = "pull")]
pub mod pull;

use std::path::PathBuf;

pub use digest::Digest;
pub use index::{normalize, read_beneath, ImageConfig, ImageRecord, Images, RunConfig};
pub use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("{0}")]
    InUse(String),
    #[error("{image}: {message}")]
    Registry { image: String, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
