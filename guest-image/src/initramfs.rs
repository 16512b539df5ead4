//! A reproducible `newc` cpio writer for the guest initramfs.
//!
//! Written here rather than taken from a crate because reproducibility is the
//! whole point: entries are sorted, and every field that a host leaks into an
//! archive (mtime, owner, inode, device) is fixed, so the same inputs give the
//! same bytes. The format is the kernel's `Documentation/driver-api/early-userspace/buffer-format.rst`.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use flate2::{write::GzEncoder, Compression};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("invalid archive path {0:?}: must be relative, without '.' or '..' parts")]
    BadPath(String),
    #[error("{path} is not a directory, but a later entry is inside it")]
    NotADirectory { path: String },
    #[error("{path} is added twice")]
    Duplicate { path: String },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the archive: {0}")]
    Write(#[from] io::Error),
}

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// An initramfs being put together. Parent directories are created implicitly.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

fn check_path(p: &str) -> Result<String, InitramfsError> {
    let p = p.trim_start_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(InitramfsError::BadPath(p.to_string()));
    }
    Ok(p.to_string())
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<&mut Self, InitramfsError> {
        let path = check_path(path)?;
        // Parents first, as directories 0755, unless given explicitly.
        let mut parent = String::new();
        for comp in path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            match self.nodes.get(&parent) {
                None => {
                    self.nodes.insert(parent.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => return Err(InitramfsError::NotADirectory { path: parent }),
            }
        }
        match (self.nodes.get(&path), &node) {
            // An implicit parent may later be declared with its own mode.
            (Some(Node::Dir { .. }), Node::Dir { .. }) | (None, _) => {
                self.nodes.insert(path, node);
                Ok(self)
            }
            _ => Err(InitramfsError::Duplicate { path }),
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        self.insert(
            path,
            Node::Dir {
                mode: mode & 0o7777,
            },
        )
    }

    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<&mut Self, InitramfsError> {
        self.insert(
            path,
            Node::File {
                mode: mode & 0o7777,
                data,
            },
        )
    }

    /// Adds a host file; only its contents and permission bits are kept.
    pub fn file_from(
        &mut self,
        path: &str,
        host: &Path,
        mode: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let data = std::fs::read(host).map_err(|source| InitramfsError::Read {
            path: host.display().to_string(),
            source,
        })?;
        self.file(path, mode, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        self.insert(
            path,
            Node::CharDev {
                mode: mode & 0o7777,
                major,
                minor,
            },
        )
    }

    /// The entries every init needs before it can mount devtmpfs: the
    /// kernel opens `/dev/console` for PID 1's stdio before `/init` runs.
    pub fn with_base_layout(&mut self) -> Result<&mut Self, InitramfsError> {
        for d in ["dev", "proc", "sys", "run", "tmp", "mnt"] {
            self.dir(d, 0o755)?;
        }
        self.dir("tmp", 0o1777)?;
        self.char_dev("dev/console", 0o600, 5, 1)?;
        self.char_dev("dev/null", 0o666, 1, 3)?;
        Ok(self)
    }

    /// Writes the archive. Inodes count up from 1 in path order.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<W, InitramfsError> {
        let mut written = 0usize;
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (S_IFDIR | mode, &[], (0, 0)),
                Node::File { mode, data } => (S_IFREG | mode, data, (0, 0)),
                Node::Symlink { target } => (S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
                Node::CharDev { mode, major, minor } => (S_IFCHR | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(node, Node::Dir { .. }) {
                2
            } else {
                1
            };
            written += write_entry(&mut w, ino as u32 + 1, mode, nlink, data, rdev, path)?;
        }
        write_entry(&mut w, 0, 0, 1, &[], (0, 0), "TRAILER!!!")?;
        let _ = written;
        Ok(w)
    }

    /// The archive as bytes, gzip-compressed when `gzip` is set.
    pub fn to_bytes(&self, gzip: bool) -> Result<Vec<u8>, InitramfsError> {
        if gzip {
            // flate2 writes mtime 0 and no file name: the output is reproducible.
            let enc = self.write_to(GzEncoder::new(Vec::new(), Compression::default()))?;
            Ok(enc.finish()?)
        } else {
            self.write_to(Vec::new())
        }
    }
}

fn pad4<W: Write>(w: &mut W, len: usize) -> io::Result<usize> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])?;
    Ok(pad)
}

fn write_entry<W: Write>(
    w: &mut W,
    ino: u32,
    mode: u32,
    nlink: u32,
    data: &[u8],
    rdev: (u32, u32),
    name: &str,
) -> io::Result<usize> {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: fixed, for reproducible bytes
        data.len(),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        namesize,
        0, // check (unused by newc)
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    let mut n = header.len() + namesize;
    n += pad4(w, n)?;
    w.write_all(data)?;
    n += data.len();
    n += pad4(w, data.len())?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Initramfs {
        let mut i = Initramfs::new();
        i.with_base_layout().unwrap();
        i.file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        i.file("etc/deep/file", 0o644, vec![7u8; 5]).unwrap();
        i.symlink("bin/sh", "busybox").unwrap();
        i
    }

    #[test]
    fn same_inputs_same_bytes() {
        let a = sample().to_bytes(false).unwrap();
        // Insertion order must not matter.
        let mut b = Initramfs::new();
        b.symlink("bin/sh", "busybox").unwrap();
        b.file("etc/deep/file", 0o644, vec![7u8; 5]).unwrap();
        b.file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        b.with_base_layout().unwrap();
        assert_eq!(a, b.to_bytes(false).unwrap());
        assert_eq!(
            sample().to_bytes(true).unwrap(),
            sample().to_bytes(true).unwrap()
        );
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn bad_paths_and_duplicates_are_refused() {
        let mut i = Initramfs::new();
        for p in ["", "/", "a/../b", "./a", "a//b"] {
            assert!(
                matches!(i.file(p, 0o644, vec![]), Err(InitramfsError::BadPath(_))),
                "{p}"
            );
        }
        i.file("a", 0o644, vec![]).unwrap();
        assert!(matches!(
            i.file("a", 0o644, vec![]),
            Err(InitramfsError::Duplicate { .. })
        ));
        // A file cannot become a parent directory.
        assert!(matches!(
            i.file("a/b", 0o644, vec![]),
            Err(InitramfsError::NotADirectory { .. })
        ));
    }

    /// GNU cpio reads back what we wrote: names, modes, contents, links, devices.
    #[test]
    fn gnu_cpio_reads_it_back() {
        if Command::new("cpio").arg("--version").output().is_err() {
            panic!("cpio(1) is needed for this test: run tools/setup");
        }
        let bytes = sample().to_bytes(false).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg("cpio -itv --quiet")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(&bytes)?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(listing.contains("-rwxr-xr-x"), "{listing}");
        assert!(listing.contains("bin/sh -> busybox"), "{listing}");
        assert!(
            listing.contains("crw-------") && listing.contains("dev/console"),
            "{listing}"
        );
        assert!(listing.contains("etc/deep/file"), "{listing}");

        let dir = tempfile::tempdir().unwrap();
        let mut c = Command::new("cpio")
            .args([
                "-idm",
                "--quiet",
                "--no-absolute-filenames",
                "--nonmatching",
                "dev/*",
            ])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(c.wait().unwrap().success());
        assert_eq!(
            std::fs::read(dir.path().join("init")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::read(dir.path().join("etc/deep/file")).unwrap(),
            vec![7u8; 5]
        );
    }
}
