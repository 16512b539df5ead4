//! `husk pull`, `images`, `rmi`, `image prune` against a real registry on
//! loopback (Debian's docker-registry; the image built with umoci and pushed
//! with skopeo, as an OCI index and as a Docker schema 2 manifest). Pulls
//! and unpacking need no VM: these run on this machine; running an image is
//! in run.rs, in the test host.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use husk_tests::registry::{build_test_image, Registry};

struct Cli {
    config: PathBuf,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cli {
    fn new() -> Cli {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!("storage_root = {:?}\n", root.display().to_string()),
        )
        .unwrap();
        Cli {
            config,
            root,
            _dir: dir,
        }
    }

    fn husk(&self, args: &[&str]) -> Output {
        Command::new(husk_tests::workspace_root().join("target/debug/husk"))
            .args(args)
            .env("HUSK_CONFIG", &self.config)
            .env("HOME", self._dir.path())
            .output()
            .expect("running husk (cargo build first)")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.husk(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "husk {args:?} failed: {text}");
        text
    }

    fn count(&self, sub: &str) -> usize {
        std::fs::read_dir(self.root.join(sub))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

fn merged_view(lowers: &[PathBuf], script: &str) -> String {
    let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let mnt = tempfile::tempdir().unwrap();
    // Its own mount namespace: nothing can outlive the command.
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount -t overlay -o lowerdir={} overlay {m} && cd {m} && {script}",
            lower.join(":"),
            m = mnt.path().display()
        ))
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A registry on loopback, and the test image's OCI layout in a work
/// directory (kept as long as the directory is).
fn registry_and_test_image() -> (Registry, tempfile::TempDir, PathBuf) {
    let reg = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = build_test_image(work.path()).unwrap();
    (reg, work, layout)
}

#[test]
fn pull_images_and_rmi_against_a_real_registry() {
    let (reg, _work, layout) = registry_and_test_image();
    reg.push(&layout, "bb", "bb:latest", "oci").unwrap();
    reg.push(&layout, "bb", "team/bb-docker:v1", "v2s2")
        .unwrap();
    let cli = Cli::new();
    let oci = format!("{}/bb", reg.addr);
    let docker = format!("{}/team/bb-docker:v1", reg.addr);

    let out = cli.ok(&["pull", &oci]);
    assert_eq!(out.matches("Pull complete").count(), 3, "{out}");
    assert!(
        out.contains(&format!("Status: Downloaded newer image for {oci}:latest")),
        "{out}"
    );
    // The Docker-format copy has other manifest bytes but the same layers:
    // nothing is downloaded or unpacked twice.
    let out = cli.ok(&["pull", &docker]);
    assert_eq!(out.matches("Already exists").count(), 3, "{out}");
    assert_eq!(cli.count("layers/sha256"), 3);
    let out = cli.ok(&["pull", &oci]);
    assert!(out.contains("Image is up to date"), "{out}");

    let list = cli.ok(&["images"]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(
        lines[0].starts_with("REPOSITORY") && lines[0].contains("IMAGE ID"),
        "{list}"
    );
    assert_eq!(lines.len(), 3, "{list}");
    let ids: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(ids[0], ids[1], "one config, one image id: {list}");
    assert!(
        lines.iter().all(|l| l.len() <= 80),
        "fits in 80 columns:\n{list}"
    );
    assert!(
        list.contains(&format!("{}/team/bb-docker", reg.addr)) && list.contains(" v1 "),
        "{list}"
    );

    // What overlayfs shows of the unpacked layers is what docker shows.
    let db: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cli.root.join("images.json")).unwrap()).unwrap();
    let chain: Vec<String> = db["images"][0]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c.as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();
    let lowers: Vec<PathBuf> = chain
        .iter()
        .rev()
        .map(|c| cli.root.join("layers/sha256").join(c).join("diff"))
        .collect();
    let view = merged_view(
        &lowers,
        "test -e etc/gone || echo whiteout-hides; ls opq | tr '\\n' ' '; echo; ls opaque | tr '\\n' ' '; echo; \
         stat -c 'suid=%a' bin/suid; readlink data/motd-link; cat etc/motd; \
         test $(stat -c %i etc/motd) = $(stat -c %i etc/motd.hard) && echo hard-link-kept",
    );
    for want in [
        "whiteout-hides",
        "new \n",
        "kept \n",
        "suid=4755",
        "../etc/motd",
        "hello-from-image",
        "hard-link-kept",
    ] {
        assert!(
            view.contains(want),
            "missing {want:?} in the merged view:\n{view}"
        );
    }
    let suid = std::fs::metadata(lowers[1].join("bin/suid")).unwrap();
    assert_eq!(suid.mode() & 0o7777, 0o4755);
    let store_mode = std::fs::metadata(&cli.root).unwrap().mode() & 0o777;
    assert_eq!(
        store_mode, 0o700,
        "the store (setuid files, device nodes) is root's only"
    );

    // By an id two names share: refused (docker's rule), then by name,
    // then by id; the layers go with the last name.
    let short = ids[0];
    let o = cli.husk(&["rmi", &short[..6]]);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("referenced by 2 names"));
    cli.ok(&["rmi", &docker]);
    assert_eq!(
        cli.count("layers/sha256"),
        3,
        "layers another image uses stay"
    );
    cli.ok(&["rmi", short]);
    assert_eq!(cli.ok(&["images", "-q"]).trim(), "");
    assert_eq!(cli.count("layers/sha256"), 0, "unused layers are collected");
    assert_eq!(cli.count("blobs/sha256"), 0, "unused blobs are collected");
    let out = cli.husk(&["rmi", &oci]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such image"));
}

#[test]
fn bad_pulls_fail_clearly_and_store_nothing() {
    let (reg, _work, layout) = registry_and_test_image();
    reg.push(&layout, "bb", "bb:latest", "oci").unwrap();
    let cli = Cli::new();

    // An image the registry does not have.
    let o = cli.husk(&["pull", &format!("{}/nope:latest", reg.addr)]);
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not found"), "{err}");

    // A registry that is down: bounded retries, then a clear error.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let started = std::time::Instant::now();
    let o = cli.husk(&["pull", &format!("127.0.0.1:{dead}/bb")]);
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot reach the registry") || err.contains("onnect"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "retries are bounded"
    );

    // A registry that answers 500 to everything: bounded retries, then an
    // error that says what it answered.
    let mut server = Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        sys.stderr.write("request\n"); sys.stderr.flush()
        self.send_response(500); self.send_header("Content-Length", "0"); self.end_headers()
    do_HEAD = do_GET
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#,
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let port = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim().to_string()
    };
    let started = std::time::Instant::now();
    let o = cli.husk(&["pull", &format!("127.0.0.1:{port}/bb")]);
    let elapsed = started.elapsed();
    server.kill().unwrap();
    let seen = {
        use std::io::Read;
        let mut s = String::new();
        server
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        server.wait().unwrap();
        s.matches("request").count()
    };
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("500"), "{err}");
    assert!(
        (2..=8).contains(&seen) && elapsed < std::time::Duration::from_secs(30),
        "a few retries, then the error: {seen} requests in {elapsed:?}"
    );

    // A layer whose bytes do not match its digest: refused, nothing stored
    // under that digest, and the store has no image.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_hex = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(manifest_hex)).unwrap(),
    )
    .unwrap();
    let layer_hex = manifest["layers"][2]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let blob = reg.blob_file(&layer_hex);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let o = cli.husk(&["pull", &format!("{}/bb", reg.addr)]);
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.to_lowercase().contains("digest"), "{err}");
    assert!(!cli.root.join("blobs/sha256").join(&layer_hex).exists());
    assert_eq!(cli.ok(&["images", "-q"]).trim(), "");
    cli.ok(&["image", "prune"]);
    let parts = std::fs::read_dir(cli.root.join("ingest")).unwrap().count();
    assert_eq!(parts, 0, "prune leaves no part or lock files");
}

#[test]
fn a_layer_that_escapes_its_root_is_refused_and_writes_nothing_outside() {
    let (reg, work, layout) = registry_and_test_image();
    // A layer with `../escaped` and an absolute symlink written through,
    // made by Python's tarfile (GNU tar refuses to write such names).
    let evil = work.path().join("evil.tar");
    let target = work.path().join("outside");
    std::fs::create_dir(&target).unwrap();
    let py = format!(
        r#"
import tarfile, io
with tarfile.open({evil:?}, "w") as t:
    i = tarfile.TarInfo("link"); i.type = tarfile.SYMTYPE; i.linkname = {target:?}; t.addfile(i)
    d = b"pwned"
    i = tarfile.TarInfo("link/escaped"); i.size = len(d); t.addfile(i, io.BytesIO(d))
    i = tarfile.TarInfo("../escaped"); i.size = len(d); t.addfile(i, io.BytesIO(d))
"#,
        evil = evil.display().to_string(),
        target = target.display().to_string()
    );
    add_layer_written_by(&layout, &evil, &py);
    reg.push(&layout, "bb", "evil:latest", "oci").unwrap();
    let cli = Cli::new();
    let o = cli.husk(&["pull", &format!("{}/evil", reg.addr)]);
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("leaves the layer"), "{err}");
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "nothing written through the link"
    );
    assert!(
        !cli.root.join("layers/sha256/escaped").exists()
            && !cli.root.join("layers/escaped").exists()
    );
    let tmp: Vec<_> = std::fs::read_dir(cli.root.join("layers/sha256"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(
        tmp.is_empty(),
        "the half-unpacked layer is removed: {tmp:?}"
    );
    assert_eq!(cli.ok(&["images", "-q"]).trim(), "");
}

#[test]
fn a_registry_with_basic_auth_takes_husk_login_credentials() {
    let reg = Registry::start_with_auth("tester", "s3cret").unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = build_test_image(work.path()).unwrap();
    reg.push_as(
        &layout,
        "bb",
        "private:latest",
        "oci",
        Some("tester:s3cret"),
    )
    .unwrap();
    let cli = Cli::new();
    let image = format!("{}/private", reg.addr);
    let o = cli.husk(&["pull", &image]);
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refused the credentials") || err.contains("uthoriz"),
        "{err}"
    );
    let o = cli.husk(&["login", "-u", "tester", "-p", "wrong", &reg.addr]);
    assert_eq!(o.status.code(), Some(125), "a wrong password is refused");
    let kept = cli._dir.path().join(".docker/config.json");
    assert!(!kept.exists(), "and not kept");
    let mut child = Command::new(husk_tests::workspace_root().join("target/debug/husk"))
        .args(["login", "-u", "tester", "--password-stdin", &reg.addr])
        .env("HUSK_CONFIG", &cli.config)
        .env("HOME", cli._dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("Login Succeeded"));
    assert_eq!(std::fs::metadata(&kept).unwrap().mode() & 0o777, 0o600);
    let out = cli.ok(&["pull", &image]);
    assert!(out.contains("Pull complete"), "{out}");
}

/// Adds a layer of one file, `name`, to the test image at `layout`: `size`
/// bytes, random (incompressible) or zeros (a tiny blob that unpacks big).
fn add_file_layer(
    layout: &std::path::Path,
    work: &std::path::Path,
    name: &str,
    size: usize,
    random: bool,
) {
    let tar = work.join(format!("{name}.tar"));
    let py = format!(
        r#"
import tarfile, io, os
d = os.urandom({size}) if {random} else bytes({size})
with tarfile.open({tar:?}, "w") as t:
    i = tarfile.TarInfo({name:?}); i.size = len(d); t.addfile(i, io.BytesIO(d))
"#,
        tar = tar.display().to_string(),
        random = if random { "True" } else { "False" },
    );
    add_layer_written_by(layout, &tar, &py);
}

/// Runs the Python script `py`, which writes the tar `tar`, and adds that
/// tar to the test image as its top layer (Python's tarfile writes the
/// hostile names GNU tar refuses).
fn add_layer_written_by(layout: &std::path::Path, tar: &std::path::Path, py: &str) {
    assert!(Command::new("python3")
        .arg("-c")
        .arg(py)
        .status()
        .unwrap()
        .success());
    let st = Command::new("umoci")
        .args(["raw", "add-layer", "--image"])
        .arg(format!("{}:bb", layout.display()))
        .arg(tar)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Mirrors as docker's `registry-mirrors`: tried in order before the
/// registry itself (here a name that does not resolve, never asked), a
/// dead mirror passed over with a warning; the image keeps its own name.
#[test]
fn registry_mirrors_are_tried_first_and_a_dead_one_is_passed_over() {
    let (reg, _work, layout) = registry_and_test_image();
    reg.push(&layout, "bb", "team/bb:v2", "oci").unwrap();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cli = Cli::new();
    let mut config = std::fs::read_to_string(&cli.config).unwrap();
    config.push_str(&format!(
        "[registry_mirrors]\n\"registry.invalid\" = [\"127.0.0.1:{dead}\", \"{}\"]\n",
        reg.addr
    ));
    std::fs::write(&cli.config, config).unwrap();
    let out = cli.ok(&["pull", "registry.invalid/team/bb:v2"]);
    assert!(out.contains("Pull complete"), "{out}");
    assert!(
        out.contains(&format!("127.0.0.1:{dead}")) && out.contains("trying the next"),
        "the dead mirror is named: {out}"
    );
    let list = cli.ok(&["images"]);
    assert!(
        list.contains("registry.invalid/team/bb") && list.contains(" v2 "),
        "{list}"
    );
    // Without a mirror that has it, the registry's own error stands.
    let o = cli.husk(&["pull", "registry.invalid/team/nope"]);
    assert_eq!(o.status.code(), Some(125));
}

/// A pull killed while it downloads leaves no image and no stored blob
/// for what was cut; the next pull starts that blob again and completes,
/// and prune leaves nothing of the killed one.
#[test]
fn a_pull_killed_halfway_is_restarted_cleanly() {
    let (reg, work, layout) = registry_and_test_image();
    add_file_layer(&layout, work.path(), "big", 96 << 20, true);
    reg.push(&layout, "bb", "big:latest", "oci").unwrap();
    let cli = Cli::new();
    let image = format!("{}/big", reg.addr);
    let mut child = Command::new(husk_tests::workspace_root().join("target/debug/husk"))
        .args(["pull", "-q", &image])
        .env("HUSK_CONFIG", &cli.config)
        .env("HOME", cli._dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ingest = cli.root.join("ingest");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let caught = loop {
        let part = std::fs::read_dir(&ingest).ok().and_then(|d| {
            d.flatten().find(|e| {
                e.file_name().to_string_lossy().ends_with(".part")
                    && e.metadata().is_ok_and(|m| m.len() > 1 << 20)
            })
        });
        if part.is_some() {
            break true;
        }
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        caught,
        "the pull was killed while it downloaded the big layer"
    );
    assert_eq!(
        cli.ok(&["images", "-q"]).trim(),
        "",
        "no image from a killed pull"
    );
    let out = cli.ok(&["pull", &image]);
    assert!(out.contains("Downloaded newer image"), "{out}");
    cli.ok(&["image", "prune"]);
    let left: Vec<_> = std::fs::read_dir(&ingest)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "nothing left in ingest/: {left:?}");
    let big = std::fs::read_dir(cli.root.join("layers/sha256"))
        .unwrap()
        .flatten()
        .any(|e| {
            e.path()
                .join("diff/big")
                .metadata()
                .is_ok_and(|m| m.len() == 96 << 20)
        });
    assert!(big, "the big layer is whole after the second pull");
}

/// The disk fills while a layer unpacks (a small blob that unpacks to more
/// than the store's file system holds): a clear error, no image, no
/// half-unpacked layer, and the store still works.
#[test]
fn a_disk_full_while_unpacking_fails_clearly_and_leaves_the_store_consistent() {
    let (reg, work, layout) = registry_and_test_image();
    reg.push(&layout, "bb", "bb:latest", "oci").unwrap();
    add_file_layer(&layout, work.path(), "zeros", 48 << 20, false);
    reg.push(&layout, "bb", "zeros:latest", "oci").unwrap();
    let cli = Cli::new();
    // The store on a 16 MiB tmpfs of its own, gone with the test.
    std::fs::create_dir_all(&cli.root).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "husk-test-full"])
        .arg(&cli.root)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs for the store (root needed)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _mounted = Unmount(cli.root.clone());

    let o = cli.husk(&["pull", &format!("{}/zeros", reg.addr)]);
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(cli.ok(&["images", "-q"]).trim(), "");
    let tmp: Vec<_> = std::fs::read_dir(cli.root.join("layers/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "no half-unpacked layer: {tmp:?}");
    // The store goes on working: prune frees what the failed pull left, and
    // an image that fits pulls.
    cli.ok(&["image", "prune"]);
    let out = cli.ok(&["pull", &format!("{}/bb", reg.addr)]);
    assert!(out.contains("Downloaded newer image"), "{out}");
    assert_eq!(cli.count("layers/sha256"), 3);
}
