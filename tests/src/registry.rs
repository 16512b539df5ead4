//! A real registry on loopback for the image tests: Debian's
//! `docker-registry`, started with a config of our own (Debian's default
//! turns on htpasswd auth and listens on every address at :5000), and the
//! test image built by `tests/scripts/test-image.sh` and pushed with skopeo.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Registry {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Registry {
    pub fn start() -> Result<Registry> {
        Self::start_with(None)
    }

    /// A registry that wants basic auth (htpasswd, bcrypt as it requires).
    pub fn start_with_auth(user: &str, password: &str) -> Result<Registry> {
        Self::start_with(Some((user, password)))
    }

    fn start_with(auth: Option<(&str, &str)>) -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let mut auth_cfg = String::new();
        if let Some((user, password)) = auth {
            let out = Command::new("python3")
                .args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                ])
                .arg(password)
                .output()?;
            let hash = String::from_utf8(out.stdout)?.trim().to_string();
            if !hash.starts_with("$2") {
                bail!("no bcrypt from python3's crypt");
            }
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            auth_cfg = format!(
                "auth:\n  htpasswd:\n    realm: husk-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth_cfg}",
                dir.path().join("data").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry (tools/setup installs it)")?;
        let r = Registry { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&r.addr).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not listen on {}", r.addr);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(r)
    }

    /// Where the registry keeps blob `hex` (to corrupt it in a test).
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes `layout:tag` (an OCI layout) as `name`, in `format` (`oci` or `v2s2`).
    pub fn push(&self, layout: &Path, tag: &str, name: &str, format: &str) -> Result<()> {
        self.push_as(layout, tag, name, format, None)
    }

    /// The same with `user:password` credentials.
    pub fn push_as(
        &self,
        layout: &Path,
        tag: &str,
        name: &str,
        format: &str,
        creds: Option<&str>,
    ) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--format",
            format,
        ]);
        if let Some(c) = creds {
            cmd.arg(format!("--dest-creds={c}"));
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{name}", self.addr))
            .output()
            .context("running skopeo (tools/setup installs it)")?;
        if !out.status.success() {
            bail!("skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test image's OCI layout (image `bb`), built into `dir`.
pub fn build_test_image(dir: &Path) -> Result<PathBuf> {
    let layout = dir.join("oci");
    let script = crate::workspace_root().join("tests/scripts/test-image.sh");
    let out = Command::new("sh").arg(&script).arg(&layout).output()?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(layout)
}
