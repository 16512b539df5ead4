//! The guest kernel: Debian's `linux-source-6.1` + `tinyconfig` + our fragment.
//!
//! The result is cached by a key over (fragment, source package version,
//! compiler version, this builder's recipe version), so a second build is a
//! hash check and a changed fragment rebuilds. Kconfig drops an option whose
//! dependencies are unmet without a word; we read the final `.config` back and
//! refuse a kernel that lacks anything the fragment asked for.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cache::{key_of, Cache, Entry};

/// Bump when the build recipe changes in a way the key would not see.
const RECIPE_VERSION: &str = "1";

/// Artifacts of one kernel build, in its cache entry.
pub const VMLINUX: &str = "vmlinux";
pub const BZIMAGE: &str = "bzImage";
pub const CONFIG: &str = "config";
pub const ARTIFACTS: &[&str] = &[VMLINUX, BZIMAGE, CONFIG];

/// The Debian package the source comes from, and its tarball.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Where the fragment lives in this repository.
pub fn default_fragment() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/husk-guest.config")
}

/// The cache root: `$HUSK_CACHE_DIR`, else `/var/cache/husk`.
pub fn default_cache_root() -> PathBuf {
    std::env::var_os("HUSK_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/husk"))
}

/// One option as the fragment states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    /// `None` for "is not set".
    pub value: Option<String>,
}

/// Parses a Kconfig fragment: `CONFIG_X=v` and `# CONFIG_X is not set` lines.
pub fn parse_fragment(text: &str) -> Result<Vec<Wanted>> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                out.push(Wanted {
                    name: format!("CONFIG_{name}"),
                    value: None,
                });
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .with_context(|| format!("fragment line {}: expected CONFIG_X=value: {raw}", n + 1))?;
        if !name.starts_with("CONFIG_") {
            bail!("fragment line {}: not a CONFIG_ option: {raw}", n + 1);
        }
        out.push(Wanted {
            name: name.to_string(),
            value: Some(value.to_string()),
        });
    }
    Ok(out)
}

/// The options of `wanted` that the final `.config` does not honour.
pub fn unmet(wanted: &[Wanted], final_config: &str) -> Vec<String> {
    let have = parse_fragment(final_config).unwrap_or_default();
    let get = |name: &str| {
        have.iter()
            .find(|w| w.name == name)
            .and_then(|w| w.value.clone())
    };
    wanted
        .iter()
        .filter_map(|w| {
            let got = get(&w.name);
            // An unset option is absent or "is not set": both read as None.
            (got != w.value).then(|| {
                format!(
                    "{} wanted {} got {}",
                    w.name,
                    w.value.as_deref().unwrap_or("unset"),
                    got.as_deref().unwrap_or("unset")
                )
            })
        })
        .collect()
}

fn command_output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What decides the kernel's bytes.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    pub fragment: PathBuf,
    pub source_tarball: PathBuf,
    pub source_version: String,
    pub compiler: String,
}

impl KernelSpec {
    /// The spec for this machine: the installed source package and `gcc`.
    pub fn detect(fragment: &Path) -> Result<Self> {
        let source_version =
            command_output("dpkg-query", &["-W", "-f", "${Version}", SOURCE_PACKAGE])
                .with_context(|| format!("{SOURCE_PACKAGE} is not installed (run tools/setup)"))?;
        let compiler = command_output("gcc", &["--version"])?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(Self {
            fragment: fragment.to_path_buf(),
            source_tarball: PathBuf::from(SOURCE_TARBALL),
            source_version,
            compiler,
        })
    }

    /// The cache key. The fragment enters as its parsed options, so that
    /// editing a comment does not cost a ten-minute rebuild.
    pub fn key(&self) -> Result<String> {
        let text = fs::read_to_string(&self.fragment)
            .with_context(|| format!("reading {}", self.fragment.display()))?;
        let options: String = parse_fragment(&text)?
            .iter()
            .map(|w| format!("{}={}\n", w.name, w.value.as_deref().unwrap_or("n")))
            .collect();
        Ok(key_of(&[
            ("recipe", RECIPE_VERSION.as_bytes()),
            ("options", options.as_bytes()),
            ("source", self.source_version.as_bytes()),
            ("compiler", self.compiler.as_bytes()),
        ]))
    }
}

/// Returns the cached kernel for `spec`, building it (10+ minutes) on a miss.
pub fn ensure(spec: &KernelSpec, cache_root: &Path) -> Result<Entry> {
    let key = spec.key()?;
    let cache = Cache::new(cache_root.join("kernel"));
    let entry = cache.get_or_build(&key, ARTIFACTS, |staging| {
        build(spec, cache_root, &key, staging)
    })?;
    Ok(entry)
}

/// Unpacks the source tarball once per source version.
fn source_tree(spec: &KernelSpec, cache_root: &Path) -> Result<PathBuf> {
    let dir = cache_root
        .join("src")
        .join(format!("{SOURCE_PACKAGE}_{}", spec.source_version));
    let stamp = dir.join(".husk-unpacked");
    if stamp.exists() {
        return Ok(dir);
    }
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    eprintln!(
        "[kernel] unpacking {} (about a minute)",
        spec.source_tarball.display()
    );
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&spec.source_tarball)
        .arg("-C")
        .arg(&dir)
        .arg("--strip-components=1")
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("unpacking {} failed", spec.source_tarball.display());
    }
    fs::write(&stamp, &spec.source_version)?;
    Ok(dir)
}

fn make(src: &Path, obj: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("make");
    c.arg("-C").arg(src).arg(format!("O={}", obj.display()));
    c.args(args);
    // Reproducible-build inputs: no host name, user or time in the image.
    c.env("KBUILD_BUILD_USER", "husk")
        .env("KBUILD_BUILD_HOST", "husk")
        .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
        .env("KBUILD_BUILD_VERSION", "1");
    c
}

fn run_quiet(mut c: Command, what: &str) -> Result<()> {
    let out = c.output().with_context(|| format!("{what}: spawning"))?;
    if !out.status.success() {
        bail!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn build(spec: &KernelSpec, cache_root: &Path, key: &str, staging: &Path) -> Result<()> {
    let src = source_tree(spec, cache_root)?;
    let obj = cache_root.join("kernel-obj").join(key);
    if obj.exists() {
        fs::remove_dir_all(&obj)?;
    }
    fs::create_dir_all(&obj)?;

    run_quiet(make(&src, &obj, &["tinyconfig"]), "make tinyconfig")?;
    let mut merge = Command::new(src.join("scripts/kconfig/merge_config.sh"));
    merge
        .current_dir(&src)
        .arg("-m")
        .arg("-O")
        .arg(&obj)
        .arg(obj.join(".config"))
        .arg(&spec.fragment);
    run_quiet(merge, "merge_config.sh")?;
    run_quiet(make(&src, &obj, &["olddefconfig"]), "make olddefconfig")?;

    let wanted = parse_fragment(&fs::read_to_string(&spec.fragment)?)?;
    let final_config = fs::read_to_string(obj.join(".config"))?;
    let missing = unmet(&wanted, &final_config);
    if !missing.is_empty() {
        bail!(
            "Kconfig dropped options the fragment asks for (a dependency is missing):\n  {}",
            missing.join("\n  ")
        );
    }

    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    eprintln!(
        "[kernel] building Linux {} with {jobs} jobs: this takes about 10 minutes on 2 cores",
        spec.source_version
    );
    let started = Instant::now();
    let mut child = make(&src, &obj, &[&format!("-j{jobs}"), "vmlinux", "bzImage"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning make")?;
    // Progress: a line every 30 s with the count of compiled units so far.
    let mut units = 0u64;
    let mut last = Instant::now();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.trim_start().starts_with("CC") {
                units += 1;
            }
            if last.elapsed().as_secs() >= 30 {
                eprintln!(
                    "[kernel] {:>4}s: {units} units compiled",
                    started.elapsed().as_secs()
                );
                last = Instant::now();
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "kernel build failed ({status}); objects kept in {}",
            obj.display()
        );
    }
    eprintln!("[kernel] built in {} s", started.elapsed().as_secs());

    fs::copy(obj.join("vmlinux"), staging.join(VMLINUX))?;
    fs::copy(obj.join("arch/x86/boot/bzImage"), staging.join(BZIMAGE))?;
    fs::copy(obj.join(".config"), staging.join(CONFIG))?;
    fs::write(
        staging.join("build-seconds"),
        started.elapsed().as_secs().to_string(),
    )?;
    // The object tree is ~1 GB and keyed by a config we will not build again.
    fs::remove_dir_all(&obj)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_parses_set_and_unset() {
        let w = parse_fragment("# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=64\n\n").unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(
            w[1],
            Wanted {
                name: "CONFIG_B".into(),
                value: None
            }
        );
        assert!(parse_fragment("A=y").is_err());
        assert!(parse_fragment("CONFIG_A").is_err());
    }

    #[test]
    fn unmet_reports_dropped_and_wrong_values() {
        let wanted =
            parse_fragment("CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n# CONFIG_M is not set\n").unwrap();
        let fin = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=8\nCONFIG_M=y\n";
        let u = unmet(&wanted, fin);
        assert_eq!(u.len(), 3, "{u:?}");
        assert!(u[0].starts_with("CONFIG_B wanted y got unset"));
        assert!(unmet(&wanted, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n").is_empty());
    }

    #[test]
    fn key_follows_options_source_and_compiler_but_not_comments() {
        let dir = tempfile::tempdir().unwrap();
        let frag = dir.path().join("f.config");
        let spec = KernelSpec {
            fragment: frag.clone(),
            source_tarball: PathBuf::from("/nonexistent"),
            source_version: "6.1.1-1".into(),
            compiler: "gcc 12".into(),
        };
        fs::write(&frag, "# a\nCONFIG_A=y\n").unwrap();
        let k1 = spec.key().unwrap();
        fs::write(&frag, "# a comment that changed\n\nCONFIG_A=y\n").unwrap();
        assert_eq!(spec.key().unwrap(), k1);
        fs::write(&frag, "CONFIG_A=y\nCONFIG_B=y\n").unwrap();
        assert_ne!(spec.key().unwrap(), k1);
        fs::write(&frag, "CONFIG_A=y\n").unwrap();
        let other_source = KernelSpec {
            source_version: "6.1.2-1".into(),
            ..spec.clone()
        };
        assert_ne!(other_source.key().unwrap(), k1);
        let other_cc = KernelSpec {
            compiler: "gcc 13".into(),
            ..spec
        };
        assert_ne!(other_cc.key().unwrap(), k1);
    }

    /// `ensure` uses a valid entry as it is, and never hands out a corrupt
    /// one: it removes it and rebuilds (here the rebuild fails, since the
    /// source is absent, and the error says so).
    #[test]
    fn ensure_uses_valid_entries_and_rebuilds_corrupt_ones() {
        let dir = tempfile::tempdir().unwrap();
        let frag = dir.path().join("f.config");
        fs::write(&frag, "CONFIG_A=y\n").unwrap();
        let spec = KernelSpec {
            fragment: frag,
            source_tarball: dir.path().join("no-such-source.tar.xz"),
            source_version: "test".into(),
            compiler: "test".into(),
        };
        let cache_root = dir.path().join("cache");
        let key = spec.key().unwrap();
        Cache::new(cache_root.join("kernel"))
            .get_or_build(&key, ARTIFACTS, |d| {
                for f in ARTIFACTS {
                    fs::write(d.join(f), format!("fake {f}"))?;
                }
                Ok(())
            })
            .unwrap();
        let e = ensure(&spec, &cache_root).unwrap();
        assert_eq!(fs::read_to_string(e.path(VMLINUX)).unwrap(), "fake vmlinux");

        fs::write(e.path(VMLINUX), "fake vmlinu").unwrap();
        let err = format!("{:#}", ensure(&spec, &cache_root).unwrap_err());
        assert!(err.contains("no-such-source"), "{err}");
        assert!(!e.dir.exists(), "the corrupt entry must be gone");
    }

    #[test]
    fn our_fragment_is_well_formed() {
        let text = fs::read_to_string(default_fragment()).unwrap();
        let w = parse_fragment(&text).unwrap();
        assert!(w.iter().any(|w| w.name == "CONFIG_PVH"));
        assert!(w
            .iter()
            .any(|w| w.name == "CONFIG_MODULES" && w.value.is_none()));
    }
}
