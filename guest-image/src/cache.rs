//! A content-addressed artifact cache.
//!
//! An entry is a directory named by a key (a hash of everything that decides
//! its contents) holding the artifacts and a `MANIFEST` with the SHA-256 of
//! each. The manifest is written last and the directory is moved into place
//! with one `rename`, so an interrupted build leaves a `*.partial-*` directory
//! that is never read. On every lookup the artifacts are hashed again: a
//! truncated, edited or missing file makes the entry invalid, it is removed
//! and rebuilt. Hashing the kernel costs ~0.1 s; a bad kernel costs a day.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// The file in every entry that lists its artifacts and their hashes.
pub const MANIFEST: &str = "MANIFEST";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("building cache entry {key}: {source}")]
    Build {
        key: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("the build for {key} did not produce {file}")]
    MissingArtifact { key: String, file: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Why an entry on disk was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    Absent,
    NoManifest,
    BadManifest(String),
    Missing(String),
    HashMismatch(String),
}

/// A cache rooted at one directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// A verified entry: its directory and its artifacts.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    pub key: String,
}

impl Entry {
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Hashes a list of named parts into a cache key. Each part is length-prefixed
/// so that ("ab", "c") and ("a", "bc") give different keys.
pub fn key_of(parts: &[(&str, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (name, data) in parts {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    // 32 hex digits are plenty to name a directory.
    hex::encode(h.finalize())[..32].to_string()
}

/// Takes an exclusive `flock` on `path` (created if absent), waiting for it;
/// released when the returned guard drops or the process dies.
pub fn lock_file(path: &Path) -> io::Result<Flock<fs::File>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| e.into())
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Checks the entry for `key` against its manifest; `files` must all be listed.
    pub fn verify(&self, key: &str, files: &[&str]) -> Result<Entry, Invalid> {
        let dir = self.entry_dir(key);
        if !dir.is_dir() {
            return Err(Invalid::Absent);
        }
        let manifest = fs::read_to_string(dir.join(MANIFEST)).map_err(|_| Invalid::NoManifest)?;
        let mut listed = Vec::new();
        for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
            let (hash, name) = line
                .split_once("  ")
                .ok_or_else(|| Invalid::BadManifest(line.to_string()))?;
            if hash.len() != 64 || name.contains('/') || name == MANIFEST {
                return Err(Invalid::BadManifest(line.to_string()));
            }
            let got =
                sha256_file(&dir.join(name)).map_err(|_| Invalid::Missing(name.to_string()))?;
            if got != hash {
                return Err(Invalid::HashMismatch(name.to_string()));
            }
            listed.push(name.to_string());
        }
        for f in files {
            if !listed.iter().any(|l| l == f) {
                return Err(Invalid::Missing(f.to_string()));
            }
        }
        Ok(Entry {
            dir,
            key: key.to_string(),
        })
    }

    /// Returns the valid entry for `key`, or runs `build` to make it.
    ///
    /// `build` gets an empty staging directory and must leave every name in
    /// `files` there, as plain files; whatever else it leaves there is
    /// covered by the manifest too. An invalid entry is reported, removed and
    /// rebuilt.
    pub fn get_or_build<F>(&self, key: &str, files: &[&str], build: F) -> Result<Entry, CacheError>
    where
        F: FnOnce(&Path) -> anyhow::Result<()>,
    {
        if let Ok(e) = self.verify(key, files) {
            tracing::info!(key, dir = %e.dir.display(), "cache hit");
            return Ok(e);
        }
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        // One builder per key: a second process waits here, then finds the
        // first one's entry instead of building into the same object tree.
        let _lock = self.lock(key)?;
        match self.verify(key, files) {
            Ok(e) => {
                tracing::info!(key, dir = %e.dir.display(), "cache hit after waiting for another builder");
                return Ok(e);
            }
            Err(Invalid::Absent) => tracing::info!(key, "cache miss"),
            Err(why) => {
                tracing::warn!(key, ?why, "cache entry is invalid; removing and rebuilding");
                let dir = self.entry_dir(key);
                fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
        let staging = self
            .root
            .join(format!("{key}.partial-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
        }
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        let result = self.fill(key, files, &staging, build);
        if result.is_err() {
            // A failed build leaves nothing behind that a later lookup could trip on.
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    fn lock(&self, key: &str) -> Result<Flock<fs::File>, CacheError> {
        let path = self.root.join(format!("{key}.lock"));
        lock_file(&path).map_err(io_err(&path))
    }

    fn fill<F>(
        &self,
        key: &str,
        files: &[&str],
        staging: &Path,
        build: F,
    ) -> Result<Entry, CacheError>
    where
        F: FnOnce(&Path) -> anyhow::Result<()>,
    {
        build(staging).map_err(|source| CacheError::Build {
            key: key.to_string(),
            source,
        })?;
        for f in files {
            if !staging.join(f).is_file() {
                return Err(CacheError::MissingArtifact {
                    key: key.to_string(),
                    file: f.to_string(),
                });
            }
        }
        // Everything the build left is covered, not only the required names.
        let mut names = Vec::new();
        for e in fs::read_dir(staging).map_err(io_err(staging))? {
            let e = e.map_err(io_err(staging))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !e.file_type().map_err(io_err(&e.path()))?.is_file() || name == MANIFEST {
                return Err(CacheError::Build {
                    key: key.to_string(),
                    source: anyhow::anyhow!(
                        "the build left {name}, which is not a plain artifact file"
                    ),
                });
            }
            names.push(name);
        }
        names.sort();
        let mut manifest = String::new();
        for f in &names {
            let p = staging.join(f);
            let hash = sha256_file(&p).map_err(io_err(&p))?;
            manifest.push_str(&format!("{hash}  {f}\n"));
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&p))?;
        }
        let mpath = staging.join(MANIFEST);
        let mut m = fs::File::create(&mpath).map_err(io_err(&mpath))?;
        m.write_all(manifest.as_bytes()).map_err(io_err(&mpath))?;
        m.sync_all().map_err(io_err(&mpath))?;
        let dir = self.entry_dir(key);
        fs::rename(staging, &dir).map_err(io_err(&dir))?;
        Ok(Entry {
            dir,
            key: key.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn build_two(dir: &Path) -> anyhow::Result<()> {
        fs::write(dir.join("a"), b"alpha")?;
        fs::write(dir.join("b"), b"beta")?;
        Ok(())
    }

    #[test]
    fn second_lookup_is_a_hit() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let builds = Cell::new(0);
        for _ in 0..2 {
            let e = cache
                .get_or_build("k", &["a", "b"], |d| {
                    builds.set(builds.get() + 1);
                    build_two(d)
                })
                .unwrap();
            assert_eq!(fs::read(e.path("a")).unwrap(), b"alpha");
        }
        assert_eq!(builds.get(), 1);
    }

    #[test]
    fn corrupt_artifact_is_detected_and_rebuilt() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let e = cache.get_or_build("k", &["a", "b"], build_two).unwrap();
        // Truncate one artifact as a crash or a full disk would.
        fs::write(e.path("b"), b"be").unwrap();
        assert_eq!(
            cache.verify("k", &["a", "b"]).unwrap_err(),
            Invalid::HashMismatch("b".into())
        );
        let rebuilt = Cell::new(false);
        let e = cache
            .get_or_build("k", &["a", "b"], |d| {
                rebuilt.set(true);
                build_two(d)
            })
            .unwrap();
        assert!(rebuilt.get());
        assert_eq!(fs::read(e.path("b")).unwrap(), b"beta");
    }

    #[test]
    fn partial_entry_without_manifest_is_never_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        fs::create_dir_all(tmp.path().join("k")).unwrap();
        fs::write(tmp.path().join("k/a"), b"stale").unwrap();
        assert_eq!(cache.verify("k", &["a"]).unwrap_err(), Invalid::NoManifest);
        let e = cache.get_or_build("k", &["a", "b"], build_two).unwrap();
        assert_eq!(fs::read(e.path("a")).unwrap(), b"alpha");
    }

    #[test]
    fn missing_artifact_and_tampered_manifest_are_invalid() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let e = cache.get_or_build("k", &["a", "b"], build_two).unwrap();
        fs::remove_file(e.path("a")).unwrap();
        assert_eq!(
            cache.verify("k", &["a", "b"]).unwrap_err(),
            Invalid::Missing("a".into())
        );
        fs::write(e.path(MANIFEST), "nonsense\n").unwrap();
        assert!(matches!(
            cache.verify("k", &["a"]).unwrap_err(),
            Invalid::BadManifest(_)
        ));
        // A manifest that forgets an artifact the caller needs is not enough.
        fs::write(e.path(MANIFEST), "").unwrap();
        assert_eq!(
            cache.verify("k", &["a"]).unwrap_err(),
            Invalid::Missing("a".into())
        );
    }

    #[test]
    fn failed_build_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let err = cache
            .get_or_build("k", &["a"], |d| {
                fs::write(d.join("a"), b"half")?;
                anyhow::bail!("compiler crashed")
            })
            .unwrap_err();
        assert!(err.to_string().contains("building cache entry k"));
        let left = || {
            fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.ends_with(".lock"))
                .count()
        };
        assert_eq!(left(), 0);
        let err = cache.get_or_build("k", &["a", "z"], build_two).unwrap_err();
        assert!(matches!(err, CacheError::MissingArtifact { .. }));
        assert_eq!(left(), 0);
    }

    #[test]
    fn extra_artifacts_are_hashed_and_directories_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let e = cache
            .get_or_build("k", &["a"], |d| {
                build_two(d)?;
                fs::write(d.join("extra"), b"x")?;
                Ok(())
            })
            .unwrap();
        fs::write(e.path("extra"), b"y").unwrap();
        assert_eq!(
            cache.verify("k", &["a"]).unwrap_err(),
            Invalid::HashMismatch("extra".into())
        );
        let err = cache
            .get_or_build("d", &["a"], |d| {
                build_two(d)?;
                fs::create_dir(d.join("sub"))?;
                Ok(())
            })
            .unwrap_err();
        assert!(err.to_string().contains("sub"), "{err}");
    }

    /// Two builders of one key: one builds, the other waits and reuses it.
    #[test]
    fn concurrent_builders_build_once() {
        let tmp = tempfile::tempdir().unwrap();
        let builds = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let cache = Cache::new(tmp.path());
                    cache
                        .get_or_build("k", &["a", "b"], |d| {
                            builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            build_two(d)
                        })
                        .unwrap();
                });
            }
        });
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn keys_separate_their_parts() {
        assert_ne!(
            key_of(&[("x", b"ab"), ("y", b"c")]),
            key_of(&[("x", b"a"), ("y", b"bc")])
        );
        assert_eq!(key_of(&[("x", b"a")]), key_of(&[("x", b"a")]));
    }
}
