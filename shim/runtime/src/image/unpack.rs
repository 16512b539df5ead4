//! Unpacking one layer (a tar stream: plain, gzip or zstd) into a directory that
//! overlayfs reads as a lower layer.
//!
//! A layer is hostile input: its entries name paths, link targets, owners,
//! modes and xattrs. The `tar` crate parses; every file is made here, on
//! file descriptors, because its own `unpack_in` resolves paths by name
//! (canonicalize, then create), and a layer's own symlinks sit in the tree
//! being written. Here:
//! - an entry path that is absolute or has a `..` is refused (the layer fails);
//! - each parent directory is opened with `openat2(RESOLVE_BENEATH)` from the
//!   layer's root, so an in-layer symlink (`lib -> usr/lib`) is followed but
//!   one that leaves the layer (`x -> /etc`, `x -> ../..`) fails the layer;
//! - the last component is never followed: files are created `O_EXCL |
//!   O_NOFOLLOW`, what was there is removed first;
//! - a hard link's target is opened the same way, so it cannot name a file
//!   outside the layer;
//! - `trusted.overlay.*` xattrs from the layer are dropped (overlayfs acts on
//!   them: a layer must not forge a redirect or an opaque flag that way).
//!
//! Whiteouts become what overlayfs reads: `.wh.NAME` a 0:0 character device
//! `NAME`, `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on its directory.
//! Modes (setuid included), owners, xattrs, device nodes and times are kept as
//! the layer says; unpacking needs root, as it does for containerd.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, Dev, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps,
    XattrFlags,
};
use rustix::io::Errno;

use super::digest::{Digest, HashingReader};
use super::ImageError;

/// The whiteout prefix and the opaque-directory marker of the OCI layer format.
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

fn bad(path: &Path, why: impl std::fmt::Display) -> ImageError {
    ImageError::Invalid(format!("layer entry {}: {why}", path.display()))
}

fn errno<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> ImageError + 'a {
    move |e| ImageError::Io {
        what,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// The first bytes of a zstd frame (RFC 8878, 3.1.1).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A zstd-compressed layer (`tar+zstd`), decoded by ruzstd (pure Rust: no C
/// decoder parsing registry bytes). ruzstd decodes one frame at a time; a
/// stream may hold several back to back (multi-threaded writers make them),
/// and skippable frames are passed over, as RFC 8878 says. The decoder's
/// window is ruzstd's default bound (128 MiB), so a hostile frame header
/// cannot make it allocate more. Integrity is the diff id's business: the
/// decoded stream is hashed and checked against it.
struct Zstd<R: BufRead> {
    src: R,
    frame: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> Zstd<R> {
    fn new(src: R) -> Self {
        Zstd {
            src,
            frame: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for Zstd<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        use ruzstd::decoding::BlockDecodingStrategy;
        let invalid =
            |e: FrameDecoderError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        loop {
            if self.in_frame {
                if self.frame.can_collect() > 0 {
                    return self.frame.read(buf);
                }
                if self.frame.is_finished() {
                    self.in_frame = false;
                    continue;
                }
                self.frame
                    .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBlocks(1))
                    .map_err(invalid)?;
                continue;
            }
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.frame.reset(&mut self.src) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = std::io::copy(
                        &mut (&mut self.src).take(length.into()),
                        &mut std::io::sink(),
                    )?;
                    if skipped < u64::from(length) {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(e) => return Err(invalid(e)),
            }
        }
    }
}

/// An entry path as components, or why it is refused.
fn components(path: &Path) -> Result<Vec<&OsStr>, ImageError> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(bad(path, "an absolute path")),
            Component::ParentDir => return Err(bad(path, "'..' leaves the layer")),
        }
    }
    Ok(out)
}

/// Unpacks the layer `reader` into `dest` (an empty directory) and returns
/// its diff id, the digest of the uncompressed tar stream.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<Digest, ImageError> {
    let mut buffered = BufReader::new(reader);
    let magic = buffered
        .fill_buf()
        .map_err(|e| ImageError::Io {
            what: "reading",
            path: dest.to_path_buf(),
            source: e,
        })?
        .get(..4)
        .map(|m| [m[0], m[1], m[2], m[3]]);
    let stream: Box<dyn Read> = match magic {
        Some([0x1f, 0x8b, _, _]) => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Some(ZSTD_MAGIC) => Box::new(Zstd::new(buffered)),
        _ => Box::new(buffered),
    };
    let mut hashed = HashingReader::new(stream);
    let root: OwnedFd = rfs::open(
        dest,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(errno("opening", dest))?;
    let mut dir_times = Vec::new();
    {
        let mut archive = tar::Archive::new(&mut hashed);
        let entries = archive.entries().map_err(|e| ImageError::Io {
            what: "reading the layer into",
            path: dest.to_path_buf(),
            source: e,
        })?;
        for entry in entries {
            let mut entry = entry.map_err(|e| ImageError::Invalid(format!("layer: {e}")))?;
            if let Some(t) = (Unpacker { root: &root }).entry(&mut entry)? {
                dir_times.push(t);
            }
        }
    }
    // Directory times last: creating their children changed them.
    for (rel, mtime) in dir_times {
        let fd = open_beneath(&root, &rel, OFlags::DIRECTORY | OFlags::RDONLY)
            .map_err(errno("opening", &rel))?;
        let _ = rfs::futimens(&fd, &times(mtime));
    }
    // The diff id covers the whole stream, the end-of-archive blocks too.
    std::io::copy(&mut hashed, &mut std::io::sink()).map_err(|e| ImageError::Io {
        what: "reading the layer into",
        path: dest.to_path_buf(),
        source: e,
    })?;
    Ok(hashed.finish())
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// `rel` opened beneath `root`: in-layer symlinks are followed, nothing
/// may resolve outside it (absolute links, `..` past the root, /proc links).
fn open_beneath(root: &OwnedFd, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rfs::openat2(
        root,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
}

struct Unpacker<'a> {
    root: &'a OwnedFd,
}

impl Unpacker<'_> {
    /// The directory `parent` (components beneath the root), made with
    /// mode 0755 where the layer did not list it first.
    fn parent(&self, path: &Path, parent: &[&OsStr]) -> Result<OwnedFd, ImageError> {
        let rel: PathBuf = parent.iter().collect();
        match open_beneath(self.root, &rel, OFlags::DIRECTORY | OFlags::PATH) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(Errno::XDEV) | Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                return Err(bad(path, "its directory leaves the layer or is not one"))
            }
            Err(e) => return Err(errno("opening", &rel)(e)),
        }
        let mut dir = open_beneath(self.root, Path::new(""), OFlags::DIRECTORY | OFlags::PATH)
            .map_err(errno("opening", &rel))?;
        let mut so_far = PathBuf::new();
        for c in parent {
            so_far.push(c);
            match rfs::mkdirat(&dir, *c, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(errno("creating", &so_far)(e)),
            }
            dir = match open_beneath(self.root, &so_far, OFlags::DIRECTORY | OFlags::PATH) {
                Ok(fd) => fd,
                Err(Errno::XDEV) | Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    return Err(bad(path, "its directory leaves the layer or is not one"))
                }
                Err(e) => return Err(errno("opening", &so_far)(e)),
            };
        }
        Ok(dir)
    }

    /// Makes room for a new `name` in `dir`: what is there goes, unless
    /// both are directories (a later entry only updates its metadata).
    fn clear(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        path: &Path,
        new_is_dir: bool,
    ) -> Result<(), ImageError> {
        let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(errno("inspecting", path)(e)),
        };
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        if is_dir && new_is_dir {
            return Ok(());
        }
        if is_dir {
            // std's remove_dir_all opens each level with O_NOFOLLOW; the
            // parent is reached through our fd, never by name.
            let p = PathBuf::from(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(dir)
            ))
            .join(name);
            std::fs::remove_dir_all(&p).map_err(|e| ImageError::Io {
                what: "replacing",
                path: path.to_path_buf(),
                source: e,
            })
        } else {
            rfs::unlinkat(dir, name, AtFlags::empty()).map_err(errno("replacing", path))
        }
    }

    /// One entry; a directory's (path, mtime) comes back to be set last.
    fn entry<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Option<(PathBuf, u64)>, ImageError> {
        let path = PathBuf::from(OsStr::from_bytes(&entry.path_bytes()));
        let header = entry.header().clone();
        let kind = header.entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            return Ok(None);
        }
        let comps = components(&path)?;
        let mode = header.mode().map_err(|e| bad(&path, e))? & 0o7777;
        let uid = header.uid().map_err(|e| bad(&path, e))?;
        let gid = header.gid().map_err(|e| bad(&path, e))?;
        let (uid, gid) = match (u32::try_from(uid), u32::try_from(gid)) {
            (Ok(u), Ok(g)) => (u, g),
            _ => return Err(bad(&path, "an owner id over 32 bits")),
        };
        let mtime = header.mtime().unwrap_or(0);
        let owner = (Some(rfs::Uid::from_raw(uid)), Some(rfs::Gid::from_raw(gid)));
        let Some((name, parent)) = comps.split_last() else {
            // "./": the layer's root directory itself.
            if kind == tar::EntryType::Directory {
                let fd = open_beneath(self.root, Path::new(""), OFlags::DIRECTORY | OFlags::RDONLY)
                    .map_err(errno("opening", &path))?;
                rfs::fchown(&fd, owner.0, owner.1).map_err(errno("chown", &path))?;
                rfs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(errno("chmod", &path))?;
                return Ok(Some((PathBuf::new(), mtime)));
            }
            return Err(bad(&path, "a non-directory at the layer's root"));
        };
        let dir = self.parent(&path, parent)?;
        let name_str = name.to_string_lossy();
        if name_str == OPAQUE {
            let fd = open_beneath(
                self.root,
                &parent.iter().collect::<PathBuf>(),
                OFlags::DIRECTORY | OFlags::RDONLY,
            )
            .map_err(errno("opening", &path))?;
            rfs::fsetxattr(&fd, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                .map_err(errno("marking opaque", &path))?;
            return Ok(None);
        }
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT.as_bytes()) {
            let hidden = OsStr::from_bytes(hidden);
            if hidden.is_empty() {
                return Err(bad(&path, "a whiteout of nothing"));
            }
            self.clear(&dir, hidden, &path, false)?;
            rfs::mknodat(
                &dir,
                hidden,
                FileType::CharacterDevice,
                Mode::empty(),
                rfs::makedev(0, 0),
            )
            .map_err(errno("making the whiteout", &path))?;
            return Ok(None);
        }
        let rel: PathBuf = comps.iter().collect();
        match kind {
            tar::EntryType::Directory => {
                self.clear(&dir, name, &path, true)?;
                match rfs::mkdirat(&dir, *name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(errno("creating", &path)(e)),
                }
                let fd = rfs::openat(
                    &dir,
                    *name,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno("opening", &path))?;
                self.finish(&fd, &path, owner, mode, entry)?;
                Ok(Some((rel, mtime)))
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.clear(&dir, name, &path, false)?;
                let fd = rfs::openat(
                    &dir,
                    *name,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(errno("creating", &path))?;
                let mut file = File::from(fd);
                std::io::copy(entry, &mut file).map_err(|e| ImageError::Io {
                    what: "writing",
                    path: path.clone(),
                    source: e,
                })?;
                let fd = OwnedFd::from(file);
                self.finish(&fd, &path, owner, mode, entry)?;
                rfs::futimens(&fd, &times(mtime)).map_err(errno("setting times of", &path))?;
                Ok(None)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(&path, "a symlink without a target"))?;
                self.clear(&dir, name, &path, false)?;
                rfs::symlinkat(OsStr::from_bytes(&target), &dir, *name)
                    .map_err(errno("creating", &path))?;
                rfs::chownat(&dir, *name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(errno("chown", &path))?;
                let _ = rfs::utimensat(&dir, *name, &times(mtime), AtFlags::SYMLINK_NOFOLLOW);
                Ok(None)
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(&path, "a hard link without a target"))?;
                let target = PathBuf::from(OsStr::from_bytes(&target));
                let tcomps = components(&target)?;
                let Some((tname, tparent)) = tcomps.split_last() else {
                    return Err(bad(&path, "a hard link to the layer's root"));
                };
                let tdir = open_beneath(
                    self.root,
                    &tparent.iter().collect::<PathBuf>(),
                    OFlags::DIRECTORY | OFlags::PATH,
                )
                .map_err(|_| {
                    bad(
                        &path,
                        format!("hard link target {} is not in the layer", target.display()),
                    )
                })?;
                self.clear(&dir, name, &path, false)?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                rfs::linkat(&tdir, *tname, &dir, *name, AtFlags::empty())
                    .map_err(|e| bad(&path, format!("hard link to {}: {e}", target.display())))?;
                Ok(None)
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let ft = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev: Dev = match kind {
                    tar::EntryType::Fifo => 0,
                    _ => rfs::makedev(
                        header.device_major().ok().flatten().unwrap_or(0),
                        header.device_minor().ok().flatten().unwrap_or(0),
                    ),
                };
                self.clear(&dir, name, &path, false)?;
                rfs::mknodat(&dir, *name, ft, Mode::from_raw_mode(mode), dev)
                    .map_err(errno("creating", &path))?;
                rfs::chownat(&dir, *name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(errno("chown", &path))?;
                // mknod's mode went through the umask.
                rfs::chmodat(&dir, *name, Mode::from_raw_mode(mode), AtFlags::empty())
                    .map_err(errno("chmod", &path))?;
                let _ = rfs::utimensat(&dir, *name, &times(mtime), AtFlags::SYMLINK_NOFOLLOW);
                Ok(None)
            }
            other => Err(bad(&path, format!("unsupported entry type {other:?}"))),
        }
    }

    /// Owner, then mode (chown clears setuid), then xattrs, on an open file.
    fn finish<R: Read>(
        &self,
        fd: &OwnedFd,
        path: &Path,
        (uid, gid): (Option<rfs::Uid>, Option<rfs::Gid>),
        mode: u32,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ImageError> {
        rfs::fchown(fd, uid, gid).map_err(errno("chown", path))?;
        rfs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(errno("chmod", path))?;
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return Ok(());
        };
        for ext in exts.flatten() {
            let Ok(key) = ext.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if name.starts_with("trusted.overlay.") {
                tracing::warn!(path = %path.display(), xattr = name, "dropped an overlayfs xattr the layer set");
                continue;
            }
            rfs::fsetxattr(fd.as_fd(), name, ext.value_bytes(), XattrFlags::empty())
                .map_err(|e| bad(path, format!("xattr {name}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A tar of raw headers: the builder's own path checks would refuse the
    /// hostile names these tests need, so names go in with `set_path` bytes.
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Tar(tar::Builder::new(Vec::new()))
        }
        fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(0);
            h
        }
        fn raw_name(h: &mut tar::Header, name: &str) {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name = [0; 100];
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        }
        fn dir(mut self, name: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Directory, 0o755);
            Self::raw_name(&mut h, name);
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn file(mut self, name: &str, data: &[u8], mode: u32, owner: (u64, u64)) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, mode);
            Self::raw_name(&mut h, name);
            h.set_size(data.len() as u64);
            h.set_uid(owner.0);
            h.set_gid(owner.1);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
            let mut h = Self::header(kind, 0o777);
            Self::raw_name(&mut h, name);
            let gnu = h.as_gnu_mut().unwrap();
            gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn dev(mut self, name: &str, major: u32, minor: u32) -> Self {
            let mut h = Self::header(tar::EntryType::Char, 0o620);
            Self::raw_name(&mut h, name);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn unpack_into(tar: Vec<u8>) -> (tempfile::TempDir, Result<Digest, ImageError>) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("diff");
        std::fs::create_dir(&dest).unwrap();
        let r = unpack(&tar[..], &dest);
        (dir, r)
    }

    #[test]
    fn a_layer_keeps_modes_owners_links_and_devices() {
        let tar = Tar::new()
            .dir("bin/")
            .file("bin/su", b"#!", 0o4755, (0, 0))
            .file("home/u/f", b"mine", 0o640, (1000, 1000))
            .link(tar::EntryType::Symlink, "sh", "bin/su")
            .link(tar::EntryType::Link, "bin/su2", "bin/su")
            .dev("null", 1, 3)
            .bytes();
        let want = Digest::of(&tar);
        let (dir, r) = unpack_into(tar);
        assert_eq!(r.unwrap(), want, "the diff id is the digest of the tar");
        let d = dir.path().join("diff");
        let su = std::fs::metadata(d.join("bin/su")).unwrap();
        assert_eq!(su.permissions().mode() & 0o7777, 0o4755, "setuid kept");
        let f = std::fs::metadata(d.join("home/u/f")).unwrap();
        assert_eq!((f.uid(), f.gid(), f.mode() & 0o777), (1000, 1000, 0o640));
        assert_eq!(
            std::fs::read_link(d.join("sh")).unwrap(),
            Path::new("bin/su")
        );
        assert_eq!(
            std::fs::metadata(d.join("bin/su2")).unwrap().ino(),
            su.ino()
        );
        let null = std::fs::symlink_metadata(d.join("null")).unwrap();
        assert_eq!(null.rdev(), rfs::makedev(1, 3));
        assert_eq!(su.mtime(), 1_700_000_000);
        assert_eq!(
            std::fs::metadata(d.join("bin")).unwrap().mtime(),
            1_700_000_000,
            "directory times set last"
        );
    }

    #[test]
    fn gzip_layers_are_read_and_hashed_uncompressed() {
        let tar = Tar::new().file("a", b"x", 0o644, (0, 0)).bytes();
        let want = Digest::of(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let (dir, r) = unpack_into(gz.finish().unwrap());
        assert_eq!(r.unwrap(), want);
        assert_eq!(std::fs::read(dir.path().join("diff/a")).unwrap(), b"x");
    }

    #[test]
    fn zstd_layers_of_several_frames_are_read_and_hashed_uncompressed() {
        use ruzstd::encoding::{compress_to_vec, CompressionLevel};
        let tar = Tar::new()
            .file("a", &vec![b'a'; 200_000], 0o644, (0, 0))
            .file("b", b"bee", 0o644, (0, 0))
            .bytes();
        let want = Digest::of(&tar);
        // Two frames with a skippable frame between them.
        let (head, tail) = tar.split_at(100_000);
        let mut z = compress_to_vec(head, CompressionLevel::Fastest);
        z.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        z.extend(compress_to_vec(tail, CompressionLevel::Fastest));
        let (dir, r) = unpack_into(z.clone());
        assert_eq!(r.unwrap(), want);
        assert_eq!(std::fs::read(dir.path().join("diff/b")).unwrap(), b"bee");
        // Cut short or corrupted: an error, never a panic.
        let (_d, r) = unpack_into(z[..z.len() / 2].to_vec());
        assert!(r.is_err());
        let mut bad = z.clone();
        bad[4] ^= 0xff;
        let (_d, r) = unpack_into(bad);
        assert!(r.map_or(true, |d| d != want));
    }

    #[test]
    fn whiteouts_become_what_overlayfs_reads() {
        let tar = Tar::new()
            .dir("etc/")
            .file("etc/.wh.gone", b"", 0o644, (0, 0))
            .dir("opt/")
            .file("opt/.wh..wh..opq", b"", 0o644, (0, 0))
            .file("opt/kept", b"k", 0o644, (0, 0))
            .bytes();
        let (dir, r) = unpack_into(tar);
        r.unwrap();
        let d = dir.path().join("diff");
        let w = std::fs::symlink_metadata(d.join("etc/gone")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &w.file_type()
        ));
        assert_eq!(w.rdev(), 0);
        assert!(!d.join("etc/.wh.gone").exists());
        let mut v = [0u8; 4];
        let n = rfs::getxattr(d.join("opt"), "trusted.overlay.opaque", &mut v).unwrap();
        assert_eq!(&v[..n], b"y");
        assert!(d.join("opt/kept").exists());
    }

    #[test]
    fn escapes_are_refused_and_write_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let o = outside.path().display().to_string();
        for (what, tar) in [
            (
                "dotdot",
                Tar::new().file("../escaped", b"x", 0o644, (0, 0)).bytes(),
            ),
            (
                "absolute",
                Tar::new()
                    .file(&format!("{o}/escaped"), b"x", 0o644, (0, 0))
                    .bytes(),
            ),
            (
                "through an absolute symlink",
                Tar::new()
                    .link(tar::EntryType::Symlink, "out", &o)
                    .file("out/escaped", b"x", 0o644, (0, 0))
                    .bytes(),
            ),
            (
                "through a relative symlink",
                Tar::new()
                    .dir("a/")
                    .link(
                        tar::EntryType::Symlink,
                        "a/up",
                        "../../../../../../../../..",
                    )
                    .file(&format!("a/up{o}/escaped"), b"x", 0o644, (0, 0))
                    .bytes(),
            ),
            (
                "hard link out",
                Tar::new()
                    .link(tar::EntryType::Link, "escaped", &format!("{o}/target"))
                    .bytes(),
            ),
            (
                "hard link through a symlink",
                Tar::new()
                    .link(tar::EntryType::Symlink, "out", &o)
                    .link(tar::EntryType::Link, "escaped", "out/target")
                    .bytes(),
            ),
        ] {
            std::fs::write(outside.path().join("target"), b"t").unwrap();
            let (dir, r) = unpack_into(tar);
            assert!(r.is_err(), "{what} was accepted");
            assert!(
                !outside.path().join("escaped").exists(),
                "{what} wrote outside"
            );
            assert!(
                !dir.path().join("escaped").exists(),
                "{what} wrote beside the layer"
            );
            assert_eq!(
                std::fs::metadata(outside.path().join("target"))
                    .unwrap()
                    .nlink(),
                1,
                "{what}"
            );
        }
    }

    #[test]
    fn a_file_replaces_a_symlink_instead_of_writing_through_it() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"safe").unwrap();
        let tar = Tar::new()
            .link(tar::EntryType::Symlink, "f", &victim.display().to_string())
            .file("f", b"evil", 0o644, (0, 0))
            .bytes();
        let (dir, r) = unpack_into(tar);
        r.unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"safe");
        assert_eq!(std::fs::read(dir.path().join("diff/f")).unwrap(), b"evil");
    }

    #[test]
    fn overlay_xattrs_from_the_layer_are_dropped() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_pax_extensions([
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
            ("SCHILY.xattr.user.note", &b"kept"[..]),
        ])
        .unwrap();
        b.append_data(&mut h, "d/", &[][..]).unwrap();
        let (dir, r) = unpack_into(b.into_inner().unwrap());
        r.unwrap();
        let d = dir.path().join("diff/d");
        let mut v = [0u8; 16];
        assert!(rfs::getxattr(&d, "trusted.overlay.redirect", &mut v).is_err());
        let n = rfs::getxattr(&d, "user.note", &mut v).unwrap();
        assert_eq!(&v[..n], b"kept");
    }
}
