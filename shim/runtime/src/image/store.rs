//! The content store under the storage root (`/var/lib/husk` by default):
//!
//! ```text
//! blobs/sha256/<hex>          manifests, configs and layers as pulled, verified
//! ingest/<hex>.part, .lock    a download in progress, and its lock
//! layers/sha256/<chain id>/   one layer unpacked, as overlayfs reads it
//! containers/<id>/            a CLI container's writable layer (upper, work)
//! images.json                 names -> manifests (see `index`)
//! ```
//!
//! A blob is written to `ingest/`, hashed as it streams, and renamed into
//! `blobs/` only when its digest matches: nothing is ever stored under a
//! digest its bytes do not have. Two pulls of one blob serialise on its lock
//! file; the second finds the blob there and downloads nothing. Everything
//! is root-only (0700): unpacked layers hold setuid files and device nodes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::digest::{Digest, Hasher};
use super::ImageError;

/// Manifests and configs are JSON of a few KiB; a registry that sends more
/// than this for one is refused rather than buffered.
pub const MAX_JSON: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An exclusive `flock` held until dropped.
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] File);

impl Lock {
    /// Blocks until the lock at `path` is ours (call off the async threads).
    pub fn take(path: &Path) -> Result<Lock, ImageError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io("opening", path))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io("locking", path)(e.into()))?;
        Ok(Lock(f))
    }
}

impl Store {
    /// The store at `root`, its directories made on first use.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        let s = Store {
            root: root.to_path_buf(),
        };
        for d in [
            s.root.clone(),
            s.root.join("blobs/sha256"),
            s.root.join("ingest"),
            s.root.join("layers/sha256"),
            s.root.join("containers"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(io("creating", &d))?;
        }
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// A small blob (manifest, config), checked against its digest again:
    /// the store is root's, but a half-written disk is not impossible.
    pub fn read_json_blob(&self, d: &Digest) -> Result<Vec<u8>, ImageError> {
        let p = self.blob_path(d);
        let f = File::open(&p).map_err(io("opening", &p))?;
        let mut buf = Vec::new();
        f.take(MAX_JSON + 1)
            .read_to_end(&mut buf)
            .map_err(io("reading", &p))?;
        if buf.len() as u64 > MAX_JSON {
            return Err(ImageError::Invalid(format!("{d}: over {MAX_JSON} bytes")));
        }
        let actual = Digest::of(&buf);
        if &actual != d {
            return Err(ImageError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        Ok(buf)
    }

    /// Stores `bytes` under `d` if that is their digest.
    pub fn put_blob(&self, d: &Digest, bytes: &[u8]) -> Result<(), ImageError> {
        let actual = Digest::of(bytes);
        if &actual != d {
            return Err(ImageError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        if self.has_blob(d) {
            return Ok(());
        }
        let mut w = self.ingest(d)?;
        if let Ingest::Writing(w) = &mut w {
            w.write(bytes)?;
        }
        w.commit()
    }

    /// Starts writing blob `d`: waits for another writer of it, and answers
    /// [`Ingest::Present`] when the blob is there by then.
    pub fn ingest(&self, d: &Digest) -> Result<Ingest, ImageError> {
        let lock = Lock::take(&self.root.join("ingest").join(format!("{}.lock", d.hex())))?;
        let dest = self.blob_path(d);
        if dest.is_file() {
            return Ok(Ingest::Present);
        }
        // A part file a killed pull left is ours now (we hold the lock):
        // start it again from nothing.
        let part = self.root.join("ingest").join(format!("{}.part", d.hex()));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&part)
            .map_err(io("creating", &part))?;
        Ok(Ingest::Writing(Writer {
            file,
            part,
            dest,
            expected: d.clone(),
            hasher: Hasher::default(),
            written: 0,
            _lock: lock,
        }))
    }

    pub fn remove_blob(&self, d: &Digest) -> Result<(), ImageError> {
        let p = self.blob_path(d);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("removing", &p)(e)),
            _ => Ok(()),
        }
    }

    /// Every blob in the store.
    pub fn blobs(&self) -> Vec<Digest> {
        list_digests(&self.root.join("blobs/sha256"))
    }

    /// Where the layer with chain id `chain` is unpacked.
    pub fn layer_path(&self, chain: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(chain.hex())
    }

    /// Every unpacked layer (by chain id).
    pub fn layers(&self) -> Vec<Digest> {
        list_digests(&self.root.join("layers/sha256"))
    }

    /// The lock over `images.json` and garbage collection.
    pub fn lock(&self) -> Result<Lock, ImageError> {
        Lock::take(&self.root.join("store.lock"))
    }

    /// The lock over unpacking the layer `chain`.
    pub fn layer_lock(&self, chain: &Digest) -> Result<Lock, ImageError> {
        Lock::take(
            &self
                .root
                .join("ingest")
                .join(format!("layer-{}.lock", chain.hex())),
        )
    }

    pub fn containers_dir(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// Part files no pull holds any more (a pull killed halfway), the lock
    /// files beside them, and layers half-unpacked by a process that is gone
    /// (`layers/sha256/.tmp-<chain>-<pid>`).
    pub fn clean_ingest(&self) {
        if let Ok(entries) = fs::read_dir(self.root.join("layers/sha256")) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix(".tmp-"))
                    .and_then(|n| n.rsplit_once('-'))
                    .and_then(|(_, pid)| pid.parse::<u32>().ok())
                else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = self.root.join("ingest");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(".lock") else {
                continue;
            };
            let lock = e.path();
            let Ok(f) = File::open(&lock) else { continue };
            // Held by a pull in progress: leave it.
            if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
            {
                continue;
            }
            let _ = fs::remove_file(dir.join(format!("{stem}.part")));
            let _ = fs::remove_file(&lock);
        }
    }
}

fn list_digests(dir: &Path) -> Vec<Digest> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| Digest::parse(&format!("sha256:{n}")).ok())
        .collect()
}

/// What [`Store::ingest`] found.
#[derive(Debug)]
pub enum Ingest {
    /// Another writer stored it meanwhile (or it was there).
    Present,
    Writing(Writer),
}

impl Ingest {
    pub fn commit(self) -> Result<(), ImageError> {
        match self {
            Ingest::Present => Ok(()),
            Ingest::Writing(w) => w.commit(),
        }
    }
}

/// A blob being written; removed unless committed with the right digest.
#[derive(Debug)]
pub struct Writer {
    file: File,
    part: PathBuf,
    dest: PathBuf,
    expected: Digest,
    hasher: Hasher,
    written: u64,
    _lock: Lock,
}

impl Writer {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(io("writing", &self.part))
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies the digest, syncs and renames into `blobs/`.
    pub fn commit(mut self) -> Result<(), ImageError> {
        let hasher = std::mem::take(&mut self.hasher);
        let actual = hasher.finish();
        if actual != self.expected {
            return Err(ImageError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        self.file.sync_all().map_err(io("syncing", &self.part))?;
        fs::rename(&self.part, &self.dest).map_err(io("storing", &self.dest))?;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // After a commit the part file is gone already.
        let _ = fs::remove_file(&self.part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_stored_only_under_its_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        assert!(matches!(
            s.put_blob(&d, b"jello"),
            Err(ImageError::DigestMismatch { .. })
        ));
        assert!(!s.has_blob(&d));
        // Streamed: the wrong bytes are refused at commit and leave nothing.
        let Ingest::Writing(mut w) = s.ingest(&d).unwrap() else {
            panic!("not present yet")
        };
        w.write(b"hel").unwrap();
        w.write(b"p!").unwrap();
        assert!(w.commit().is_err());
        assert!(!s.has_blob(&d));
        assert_eq!(
            fs::read_dir(dir.path().join("ingest"))
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".part"))
                .count(),
            0
        );
        s.put_blob(&d, b"hello").unwrap();
        assert_eq!(s.read_json_blob(&d).unwrap(), b"hello");
        assert!(matches!(s.ingest(&d).unwrap(), Ingest::Present));
        assert_eq!(s.blobs(), vec![d]);
    }

    #[test]
    fn a_corrupted_stored_blob_is_caught_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"{}");
        s.put_blob(&d, b"{}").unwrap();
        fs::write(s.blob_path(&d), b"{ }").unwrap();
        assert!(matches!(
            s.read_json_blob(&d),
            Err(ImageError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn a_killed_pulls_part_file_is_cleaned_but_a_live_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let live = Digest::of(b"live");
        let Ingest::Writing(mut w) = s.ingest(&live).unwrap() else {
            panic!()
        };
        w.write(b"li").unwrap();
        let dead = dir
            .path()
            .join("ingest")
            .join(format!("{}.part", "d".repeat(64)));
        fs::write(&dead, b"half").unwrap();
        fs::write(
            dir.path()
                .join("ingest")
                .join(format!("{}.lock", "d".repeat(64))),
            b"",
        )
        .unwrap();
        s.clean_ingest();
        assert!(!dead.exists());
        assert!(w.part.exists(), "a pull in progress keeps its part file");
        drop(w);
    }
}
