//! The test host's L2 kernel and modules, from Debian's `linux-image-cloud-amd64`.
//!
//! The package is fetched with `apt-get download` and unpacked with `dpkg -x`
//! (installing it would run boot-loader hooks this machine does not need).
//! Only the kernel and the modules the test host loads are kept, flattened
//! into a verified cache entry with a `load` list in dependency order, which
//! `depmod` works out.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use husk_guest_image::cache::{key_of, Cache, Entry};

/// The metapackage that names the current cloud kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the test host loads, with their parameters. Dependencies come from
/// `modules.dep`. `npt=1`: nested paging, without which an L3 boot crawls.
pub const WANTED: &[(&str, &str)] = &[
    ("virtio_pci", ""),
    ("virtiofs", ""),
    ("overlay", ""),
    ("kvm_amd", "npt=1"),
    // Pod networks: CNI's bridge and veths, husk's taps and the tc
    // redirects between them (tests/tests/cri.rs).
    ("bridge", ""),
    ("veth", ""),
    ("tun", ""),
    ("sch_ingress", ""),
    ("cls_u32", ""),
    ("act_mirred", ""),
    // The CLI's bridge network: husk's nftables NAT table.
    ("nft_chain_nat", ""),
    ("nft_nat", ""),
    ("nft_masq", ""),
    ("nft_fib_ipv4", ""),
];

pub const VMLINUZ: &str = "vmlinuz";
pub const LOAD_LIST: &str = "load";

/// The kernel and modules of the test host, ready to use.
#[derive(Debug, Clone)]
pub struct Assets {
    pub entry: Entry,
}

impl Assets {
    pub fn vmlinuz(&self) -> PathBuf {
        self.entry.path(VMLINUZ)
    }

    /// `(module file, parameters)` in load order.
    pub fn load_order(&self) -> Result<Vec<(String, String)>> {
        let text = fs::read_to_string(self.entry.path(LOAD_LIST))?;
        Ok(text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (m, p) = l.split_once(' ').unwrap_or((l, ""));
                (m.to_string(), p.to_string())
            })
            .collect())
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The concrete image package behind the metapackage, and its version.
fn current_package() -> Result<(String, String)> {
    let deps = output(Command::new("apt-cache").args(["depends", META_PACKAGE]))?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| {
            format!("apt-cache knows no image behind {META_PACKAGE}: run `apt-get update`")
        })?
        .to_string();
    let policy = output(Command::new("apt-cache").args(["policy", &pkg]))?;
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .with_context(|| format!("no candidate version for {pkg}"))?
        .to_string();
    Ok((pkg, version))
}

/// Parses `modules.dep` into module name -> (path, dependency paths).
fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let name_of = |path: &str| {
        Path::new(path)
            .file_name()
            .and_then(|f| f.to_str())
            .map(|f| f.trim_end_matches(".ko").replace('-', "_"))
            .unwrap_or_default()
    };
    text.lines()
        .filter_map(|l| {
            let (path, deps) = l.split_once(':')?;
            Some((
                name_of(path),
                (
                    path.to_string(),
                    deps.split_whitespace().map(str::to_string).collect(),
                ),
            ))
        })
        .collect()
}

/// Module paths to load, dependencies first, each once.
pub fn resolve(dep_text: &str, wanted: &[(&str, &str)]) -> Result<Vec<(String, String)>> {
    let deps = parse_modules_dep(dep_text);
    let by_path: BTreeMap<&str, &Vec<String>> =
        deps.values().map(|(p, d)| (p.as_str(), d)).collect();
    let mut order: Vec<(String, String)> = Vec::new();
    let mut done = HashSet::new();

    // Depth-first: every module after all of its own dependencies.
    fn visit(
        path: &str,
        params: &str,
        by_path: &BTreeMap<&str, &Vec<String>>,
        done: &mut HashSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<(String, String)>,
    ) -> Result<()> {
        if done.contains(path) {
            return Ok(());
        }
        if stack.iter().any(|s| s == path) {
            bail!("modules.dep has a cycle through {path}");
        }
        let deps = by_path
            .get(path)
            .with_context(|| format!("{path} is needed but modules.dep does not list it"))?;
        stack.push(path.to_string());
        for d in deps.iter() {
            visit(d, "", by_path, done, stack, order)?;
        }
        stack.pop();
        done.insert(path.to_string());
        order.push((path.to_string(), params.to_string()));
        Ok(())
    }

    for (name, params) in wanted {
        let (path, _) = deps
            .get(*name)
            .with_context(|| format!("module {name} is not in modules.dep"))?;
        visit(
            path,
            params,
            &by_path,
            &mut done,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(order)
}

fn flat_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Returns the test host's kernel and modules, downloading them on a miss.
pub fn ensure(cache_root: &Path) -> Result<Assets> {
    let (pkg, version) = current_package()?;
    let wanted_desc = format!("{WANTED:?}");
    let key = key_of(&[
        ("package", pkg.as_bytes()),
        ("version", version.as_bytes()),
        ("wanted", wanted_desc.as_bytes()),
    ]);
    let cache = Cache::new(cache_root.join("testhost"));
    // The manifest covers every module file too: the load list names them.
    let files = [VMLINUZ, LOAD_LIST];
    let entry = cache.get_or_build(&key, &files, |staging| {
        eprintln!("[testhost] fetching {pkg} {version} for the L2 test host kernel");
        let work = staging.join("download");
        fs::create_dir_all(&work)?;
        output(
            Command::new("apt-get")
                .current_dir(&work)
                .args(["download", &format!("{pkg}={version}")]),
        )?;
        let deb = fs::read_dir(&work)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download produced no .deb")?;
        let root = work.join("root");
        output(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        let kver = pkg.trim_start_matches("linux-image-");
        let moddir = root.join("lib/modules").join(kver);
        // The package ships no modules.dep (installing it would run depmod): make one.
        output(Command::new("depmod").arg("-b").arg(&root).arg(kver))?;
        let dep = moddir.join("modules.dep");
        let dep = fs::read_to_string(&dep).with_context(|| format!("reading {}", dep.display()))?;
        let order = resolve(&dep, WANTED)?;
        let mut load = String::new();
        for (path, params) in &order {
            let flat = flat_name(path);
            fs::copy(moddir.join(path), staging.join(&flat))
                .with_context(|| format!("copying module {path}"))?;
            load.push_str(&format!("{flat} {params}\n"));
        }
        fs::write(staging.join(LOAD_LIST), load)?;
        let vmlinuz = root.join("boot").join(format!("vmlinuz-{kver}"));
        fs::copy(&vmlinuz, staging.join(VMLINUZ))
            .with_context(|| format!("copying {}", vmlinuz.display()))?;
        fs::remove_dir_all(&work)?;
        Ok(())
    })?;
    // Modules are checked too, by name from the load list against the manifest.
    let assets = Assets { entry };
    let mods: Vec<String> = assets.load_order()?.into_iter().map(|(m, _)| m).collect();
    let mut all: Vec<&str> = files.to_vec();
    all.extend(mods.iter().map(String::as_str));
    if let Err(why) = cache.verify(&key, &all) {
        // The entry was built before the modules were hashed, or was tampered with.
        fs::remove_dir_all(&assets.entry.dir)?;
        bail!("test host cache entry {key} is invalid ({why:?}); removed, run again to refetch");
    }
    Ok(assets)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/fuse/fuse.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
";

    #[test]
    fn dependencies_come_first_and_once() {
        let o = resolve(DEP, &[("virtiofs", ""), ("kvm_amd", "npt=1")]).unwrap();
        let names: Vec<_> = o.iter().map(|(p, _)| flat_name(p)).collect();
        assert_eq!(
            names,
            [
                "fuse.ko",
                "virtio_ring.ko",
                "virtio.ko",
                "virtiofs.ko",
                "irqbypass.ko",
                "kvm.ko",
                "kvm-amd.ko"
            ]
        );
        assert_eq!(o.last().unwrap().1, "npt=1");
    }

    #[test]
    fn cycles_and_dangling_dependencies_are_errors() {
        let e = resolve("a.ko: b.ko\nb.ko: a.ko\n", &[("a", "")]).unwrap_err();
        assert!(e.to_string().contains("cycle"), "{e}");
        let e = resolve("a.ko: gone.ko\n", &[("a", "")]).unwrap_err();
        assert!(e.to_string().contains("gone.ko"), "{e}");
    }

    #[test]
    fn unknown_module_is_an_error() {
        let e = resolve(DEP, &[("nope", "")]).unwrap_err();
        assert!(e.to_string().contains("nope"));
    }
}
