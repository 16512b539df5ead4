//! What the store holds by name: `images.json`, one record per image name,
//! rewritten whole (temporary file, rename) under the store lock. Blobs and
//! layers no record and no container names are garbage, collected after a
//! removal.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::store::{Lock, Store};
use super::ImageError;

/// One image the store holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The normalized name: `docker.io/library/busybox:latest`.
    pub name: String,
    /// The linux/amd64 image manifest.
    pub manifest: Digest,
    /// The image index or manifest list it was chosen from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
    /// The image config; its first 12 hex digits are the image id.
    pub config: Digest,
    /// The layers' blobs (compressed, as pulled), bottom first.
    pub layers: Vec<Digest>,
    /// The layers' chain ids, bottom first: where each is unpacked.
    pub chain: Vec<Digest>,
    /// Bytes of the unpacked layers.
    pub size: u64,
    /// The config's `created`, RFC 3339.
    #[serde(default)]
    pub created: Option<String>,
}

/// What the image config says a container runs (Docker's `config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// The parts of an OCI image config Husk reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub config: RunConfig,
    #[serde(default)]
    pub rootfs: RootFs,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        let c: ImageConfig = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::Invalid(format!("image config: {e}")))?;
        if c.rootfs.kind != "layers" {
            return Err(ImageError::Invalid(format!(
                "image config: rootfs type {:?}, not \"layers\"",
                c.rootfs.kind
            )));
        }
        Ok(c)
    }
}

/// A name as docker reads it: `busybox` is `docker.io/library/busybox:latest`,
/// `localhost:5000/x` keeps its registry; a tag or digest is kept, none
/// means `latest`.
pub fn normalize(name: &str) -> Result<String, ImageError> {
    let invalid = || ImageError::Invalid(format!("{name:?} is not an image name"));
    if name.is_empty()
        || name.len() > 512
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
    {
        return Err(invalid());
    }
    let (first, rest) = match name.split_once('/') {
        Some((f, r)) if f.contains('.') || f.contains(':') || f == "localhost" => {
            (f, r.to_string())
        }
        Some(_) => ("docker.io", name.to_string()),
        None => ("docker.io", name.to_string()),
    };
    let first = if first == "index.docker.io" {
        "docker.io"
    } else {
        first
    };
    let rest = if first == "docker.io" && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest
    };
    if rest.is_empty() || rest.starts_with('/') || rest.contains("//") {
        return Err(invalid());
    }
    // A tag is after the last ':' that follows the last '/'.
    let last = rest.rsplit('/').next().unwrap_or("");
    let tagged = last.contains(':') || rest.contains('@');
    Ok(if tagged {
        format!("{first}/{rest}")
    } else {
        format!("{first}/{rest}:latest")
    })
}

/// `images.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Db {
    images: Vec<ImageRecord>,
}

/// The image store: blobs, layers and the names over them.
#[derive(Debug, Clone)]
pub struct Images {
    store: Store,
}

impl Images {
    pub fn open(root: &Path) -> Result<Images, ImageError> {
        Ok(Images {
            store: Store::open(root)?,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn db_path(&self) -> PathBuf {
        self.store.root().join("images.json")
    }

    fn load(&self) -> Result<Db, ImageError> {
        let p = self.db_path();
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ImageError::Invalid(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Db::default()),
            Err(source) => Err(ImageError::Io {
                what: "reading",
                path: p,
                source,
            }),
        }
    }

    fn save(&self, db: &Db, _held: &Lock) -> Result<(), ImageError> {
        let p = self.db_path();
        let tmp = p.with_extension("json.tmp");
        let io = |what, source| ImageError::Io {
            what,
            path: tmp.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(db)
            .map_err(|e| ImageError::Invalid(format!("encoding images.json: {e}")))?;
        fs::write(&tmp, bytes).map_err(|e| io("writing", e))?;
        fs::rename(&tmp, &p).map_err(|e| io("renaming", e))
    }

    /// Every image, by name.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let mut v = self.load()?.images;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Records `rec` under its name (replacing what the name meant before;
    /// the old image's blobs go if nothing else uses them).
    pub fn add(&self, rec: ImageRecord) -> Result<(), ImageError> {
        let lock = self.store.lock()?;
        let mut db = self.load()?;
        db.images.retain(|r| r.name != rec.name);
        db.images.push(rec);
        self.save(&db, &lock)?;
        self.collect(&db, &lock);
        Ok(())
    }

    /// The image a user means: a name (normalized), or an image id prefix
    /// of at least 4 hex digits that only one image has.
    pub fn resolve(&self, what: &str) -> Result<ImageRecord, ImageError> {
        let images = self.load()?.images;
        if let Ok(name) = normalize(what) {
            if let Some(r) = images.iter().find(|r| r.name == name) {
                return Ok(r.clone());
            }
        }
        let id = what.strip_prefix("sha256:").unwrap_or(what);
        if id.len() >= 4 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<_> = images
                .iter()
                .filter(|r| r.config.hex().starts_with(id))
                .collect();
            match hits.as_slice() {
                [one] => return Ok((*one).clone()),
                [] => {}
                _ if hits.iter().all(|r| r.config == hits[0].config) => return Ok(hits[0].clone()),
                _ => {
                    return Err(ImageError::Invalid(format!(
                        "{what} names more than one image: give more of the id"
                    )))
                }
            }
        }
        Err(ImageError::NotFound(format!("no such image: {what}")))
    }

    pub fn config(&self, rec: &ImageRecord) -> Result<ImageConfig, ImageError> {
        ImageConfig::parse(&self.store.read_json_blob(&rec.config)?)
    }

    /// The overlayfs lower directories of `rec`, topmost first.
    pub fn lower_dirs(&self, rec: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        rec.chain
            .iter()
            .rev()
            .map(|c| {
                let d = self.layer_diff(c);
                if d.is_dir() {
                    Ok(d)
                } else {
                    Err(ImageError::NotFound(format!(
                        "layer {c} of {} is missing: pull it again",
                        rec.name
                    )))
                }
            })
            .collect()
    }

    /// Where layer `chain` is unpacked (its `diff` directory).
    pub fn layer_diff(&self, chain: &Digest) -> PathBuf {
        self.store.layer_path(chain).join("diff")
    }

    pub fn layer_size(&self, chain: &Digest) -> u64 {
        fs::read_to_string(self.store.layer_path(chain).join("size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Unpacks blob `blob` as layer `chain` unless it is there; its diff id
    /// must be `diff_id`. Blocking: call it off the async threads.
    pub fn unpack_layer(
        &self,
        blob: &Digest,
        diff_id: &Digest,
        chain: &Digest,
    ) -> Result<bool, ImageError> {
        let _lock = self.store.layer_lock(chain)?;
        let dest = self.store.layer_path(chain);
        if dest.join("diff").is_dir() {
            return Ok(false);
        }
        let tmp = dest.with_file_name(format!(".tmp-{}-{}", chain.hex(), std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let result = (|| {
            let io = |what, p: &Path| {
                let p = p.to_path_buf();
                move |source| ImageError::Io {
                    what,
                    path: p,
                    source,
                }
            };
            let diff = tmp.join("diff");
            fs::create_dir_all(&diff).map_err(io("creating", &diff))?;
            let src = self.store.blob_path(blob);
            let f = fs::File::open(&src).map_err(io("opening", &src))?;
            let actual = super::unpack::unpack(f, &diff)?;
            if &actual != diff_id {
                return Err(ImageError::DigestMismatch {
                    expected: diff_id.clone(),
                    actual,
                });
            }
            let size = du(&diff);
            fs::write(tmp.join("size"), size.to_string()).map_err(io("writing", &tmp))?;
            fs::rename(&tmp, &dest).map_err(io("storing", &dest))
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result.map(|()| true)
    }

    /// Removes the image `what` names; refused while `in_use` says a
    /// container uses it, unless `force`. Returns what was removed.
    pub fn remove(
        &self,
        what: &str,
        force: bool,
        in_use: impl Fn(&ImageRecord) -> bool,
    ) -> Result<ImageRecord, ImageError> {
        let rec = self.resolve(what)?;
        if in_use(&rec) && !force {
            return Err(ImageError::InUse(format!(
                "{what} is used by a container: remove it first, or rmi -f"
            )));
        }
        let by_name = normalize(what).is_ok_and(|n| n == rec.name);
        let lock = self.store.lock()?;
        let mut db = self.load()?;
        let names = db.images.iter().filter(|r| r.config == rec.config).count();
        if !by_name && names > 1 && !force {
            return Err(ImageError::InUse(format!(
                "image {} is referenced by {names} names: remove them by name, or rmi -f",
                rec.config.short()
            )));
        }
        // By id (forced): every name of it goes.
        db.images
            .retain(|r| r.name != rec.name && (by_name || r.config != rec.config));
        self.save(&db, &lock)?;
        self.collect(&db, &lock);
        Ok(rec)
    }

    /// Removes every blob and layer no image and no container needs, and
    /// the part files of killed pulls. Returns the bytes freed.
    pub fn prune(&self) -> Result<u64, ImageError> {
        let lock = self.store.lock()?;
        let db = self.load()?;
        self.store.clean_ingest();
        Ok(self.collect(&db, &lock))
    }

    fn collect(&self, db: &Db, _held: &Lock) -> u64 {
        let mut blobs = BTreeSet::new();
        let mut layers = BTreeSet::new();
        for r in &db.images {
            blobs.extend(r.index.iter().cloned());
            blobs.insert(r.manifest.clone());
            blobs.insert(r.config.clone());
            blobs.extend(r.layers.iter().cloned());
            layers.extend(r.chain.iter().cloned());
        }
        layers.extend(self.container_layers());
        let mut freed = 0;
        for b in self.store.blobs() {
            if !blobs.contains(&b) {
                freed += fs::metadata(self.store.blob_path(&b))
                    .map(|m| m.len())
                    .unwrap_or(0);
                let _ = self.store.remove_blob(&b);
            }
        }
        for l in self.store.layers() {
            if !layers.contains(&l) {
                // A layer being unpacked right now is not in the list yet
                // (it is under its .tmp name until done).
                freed += self.layer_size(&l);
                let _ = fs::remove_dir_all(self.store.layer_path(&l));
            }
        }
        freed
    }

    /// The layers containers stand on (`containers/<id>/layers`, one chain
    /// id a line): kept even when their image goes (`rmi -f`).
    fn container_layers(&self) -> Vec<Digest> {
        let Ok(dirs) = fs::read_dir(self.store.containers_dir()) else {
            return Vec::new();
        };
        dirs.flatten()
            .filter_map(|d| fs::read_to_string(d.path().join("layers")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| Digest::parse(l.trim()).ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Bytes of regular files under `dir`, not following symlinks.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

/// Reads at most `limit` bytes of `path` beneath `root` without following a
/// symlink out of it (an image's /etc/passwd is the image's to make).
pub fn read_beneath(root: &Path, path: &Path, limit: u64) -> Option<Vec<u8>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let rel = path.strip_prefix("/").unwrap_or(path);
    let fd = rustix::fs::openat2(
        &dir,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    let mut buf = Vec::new();
    fs::File::from(fd).take(limit).read_to_end(&mut buf).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize_as_docker_reads_them() {
        for (input, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("user/app:v1", "docker.io/user/app:v1"),
            ("localhost:5000/busybox", "localhost:5000/busybox:latest"),
            ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t"),
            ("quay.io/x/y", "quay.io/x/y:latest"),
            ("localhost/x@sha256:0000", "localhost/x@sha256:0000"),
        ] {
            assert_eq!(normalize(input).unwrap(), want, "{input}");
        }
        for bad in ["", "a b", "x//y", "localhost/", "ü"] {
            assert!(normalize(bad).is_err(), "{bad}");
        }
    }
}
