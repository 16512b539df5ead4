//! `husk pull`: the OCI distribution protocol through oci-client.
//!
//! The manifest is fetched raw (every media type named in Accept: Debian's
//! registry answers 404 when the OCI types are missing) and resolved here,
//! so the store keeps the exact bytes its digests name. An image index or a
//! Docker manifest list is resolved to linux/amd64; Docker schema 2 and OCI
//! manifests are read alike. Blobs stream into the store, hashed as they
//! come; layers download concurrently, and each is unpacked as soon as it is
//! verified. Transient failures (connection, 5xx) are retried a bounded
//! number of times; everything else is an error at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{stream, StreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;

use super::digest::{chain_ids, Digest};
use super::index::{normalize, ImageConfig, ImageRecord, Images};
use super::store::{Ingest, MAX_JSON};
use super::ImageError;

const MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Attempts at one request before its error is the pull's.
const ATTEMPTS: u32 = 4;
/// Layers fetched at once (docker's default is 3).
const CONCURRENT_LAYERS: usize = 3;

/// A layer's progress, as docker shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerStatus {
    Waiting,
    Downloading {
        done: u64,
        total: u64,
    },
    Verifying,
    Extracting,
    Done,
    /// Unpacked already, by an earlier pull of this or another image.
    Exists,
}

/// Where progress goes: the CLI's terminal, or nowhere.
pub trait Progress: Send + Sync {
    /// `layer` is the layer blob's short id.
    fn layer(&self, layer: &str, status: LayerStatus);
}

pub struct NoProgress;
impl Progress for NoProgress {
    fn layer(&self, _: &str, _: LayerStatus) {}
}

/// How to reach registries: from the config and `~/.docker/config.json`.
#[derive(Debug, Clone, Default)]
pub struct Registries {
    /// Registries (host[:port]) spoken to over plain HTTP; loopback always is.
    pub insecure: Vec<String>,
    /// Docker's credential file (`auths.<registry>.auth`, base64 user:pass).
    pub auth_file: Option<PathBuf>,
    /// Seconds without progress before a request fails.
    pub timeout: Option<Duration>,
    /// Mirrors to try first, by the registry they stand in for.
    pub mirrors: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: Digest,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// Credentials for `registry` from a docker config file, if it has some.
fn auth_for(file: Option<&Path>, registry: &str) -> Result<RegistryAuth, ImageError> {
    use base64::Engine;
    let Some(file) = file else {
        return Ok(RegistryAuth::Anonymous);
    };
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(source) => {
            return Err(ImageError::Io {
                what: "reading",
                path: file.to_path_buf(),
                source,
            })
        }
    };
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
    }
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    let cfg: DockerConfig = serde_json::from_slice(&text)
        .map_err(|e| ImageError::Invalid(format!("{}: {e}", file.display())))?;
    let keys: Vec<String> = if registry == "docker.io" || registry == "index.docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "docker.io".into(),
            "index.docker.io".into(),
        ]
    } else {
        vec![
            registry.into(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ]
    };
    let Some(e) = keys.iter().find_map(|k| cfg.auths.get(k)) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    let Some(a) = &e.auth else {
        return Ok(RegistryAuth::Anonymous);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(a.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            ImageError::Invalid(format!(
                "{}: auth for {registry} is not base64 user:password",
                file.display()
            ))
        })?;
    let (u, p) = decoded.split_once(':').ok_or_else(|| {
        ImageError::Invalid(format!(
            "{}: auth for {registry} is not user:password",
            file.display()
        ))
    })?;
    Ok(RegistryAuth::Basic(u.into(), p.into()))
}

/// Worth another try: the registry did not answer, or answered 5xx / 429.
fn transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) => {
            r.is_connect()
                || r.is_timeout()
                || r.is_request()
                || r.is_body()
                || r.status().is_some_and(|s| s.is_server_error())
        }
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

async fn retry<T, F, Fut>(mut f: F) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if transient(&e) && attempt + 1 < ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "registry request failed; retrying");
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// One pull: the client, the image's reference and credentials.
struct Puller<'a> {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    images: &'a Images,
    name: String,
    progress: Arc<dyn Progress>,
}

/// Pulls `image` into `images` and records it under its normalized name:
/// from the registry's mirrors first, in order (a mirror that fails, for
/// any reason, is passed over with a warning), then from the registry.
pub async fn pull(
    images: &Images,
    image: &str,
    registries: &Registries,
    progress: Arc<dyn Progress>,
) -> Result<ImageRecord, ImageError> {
    let name = normalize(image)?;
    let reference: Reference = name
        .parse()
        .map_err(|e| ImageError::Invalid(format!("{image:?}: {e}")))?;
    let mirrors = registries
        .mirrors
        .get(reference.registry())
        .or_else(|| registries.mirrors.get(reference.resolve_registry()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    for mirror in mirrors {
        let at_mirror = match reference.digest() {
            Some(d) => Reference::with_digest(
                mirror.clone(),
                reference.repository().to_string(),
                d.to_string(),
            ),
            None => Reference::with_tag(
                mirror.clone(),
                reference.repository().to_string(),
                reference.tag().unwrap_or("latest").to_string(),
            ),
        };
        let p = Puller::new(at_mirror, registries, images, &name, progress.clone())?;
        match p.run().await {
            Ok(rec) => return Ok(rec),
            Err(e) => {
                tracing::warn!(%mirror, error = %e, "pulling {name} from a mirror failed; trying the next")
            }
        }
    }
    Puller::new(reference, registries, images, &name, progress)?
        .run()
        .await
}

/// A client for `registry`: plain HTTP where the config says so, and for
/// loopback.
fn client_for(registry: &str, registries: &Registries) -> Client {
    let mut plain: Vec<String> = registries.insecure.clone();
    if is_loopback(registry) {
        plain.push(registry.to_string());
    }
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain),
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(registries.timeout.unwrap_or(Duration::from_secs(60))),
        user_agent: concat!("husk/", env!("CARGO_PKG_VERSION")),
        platform_resolver: None,
        ..Default::default()
    })
}

impl<'a> Puller<'a> {
    fn new(
        reference: Reference,
        registries: &Registries,
        images: &'a Images,
        name: &str,
        progress: Arc<dyn Progress>,
    ) -> Result<Self, ImageError> {
        let registry = reference.resolve_registry().to_string();
        Ok(Puller {
            client: client_for(&registry, registries),
            auth: auth_for(registries.auth_file.as_deref(), reference.registry())?,
            reference,
            images,
            name: name.to_string(),
            progress,
        })
    }

    fn registry_error(&self, e: OciDistributionError) -> ImageError {
        use oci_client::errors::OciErrorCode;
        let unknown = matches!(&e, OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| matches!(x.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown)));
        if unknown || matches!(e, OciDistributionError::ImageManifestNotFoundError(_)) {
            return ImageError::NotFound(format!(
                "{}: not found in the registry (check the name and tag)",
                self.name
            ));
        }
        let message = match &e {
            OciDistributionError::ImageManifestNotFoundError(_) => {
                "not found in the registry (check the name and tag)".to_string()
            }
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => {
                "the registry refused the credentials (husk login, or ~/.docker/config.json)"
                    .to_string()
            }
            OciDistributionError::RequestError(r) if r.is_connect() => {
                format!("cannot reach the registry: {r}")
            }
            _ => e.to_string(),
        };
        match e {
            OciDistributionError::ImageManifestNotFoundError(_) => {
                ImageError::NotFound(format!("{}: {message}", self.name))
            }
            _ => ImageError::Registry {
                image: self.name.clone(),
                message,
            },
        }
    }

    /// A manifest by tag or digest, checked against the digest it was asked by.
    async fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, Digest), ImageError> {
        let (bytes, _) = retry(|| {
            self.client
                .pull_manifest_raw(reference, &self.auth, MEDIA_TYPES)
        })
        .await
        .map_err(|e| self.registry_error(e))?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(ImageError::Invalid(format!(
                "{}: manifest over {MAX_JSON} bytes",
                self.name
            )));
        }
        let actual = Digest::of(&bytes);
        if let Some(want) = reference.digest() {
            let want = Digest::parse(want)?;
            if want != actual {
                return Err(ImageError::DigestMismatch {
                    expected: want,
                    actual,
                });
            }
        }
        Ok((bytes.to_vec(), actual))
    }

    async fn run(self) -> Result<ImageRecord, ImageError> {
        let (bytes, digest) = self.manifest(&self.reference).await?;
        let top: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Invalid(format!("{}: manifest: {e}", self.name)))?;
        let (index, bytes, digest, manifest) = if let Some(entries) = &top.manifests {
            let chosen = entries
                .iter()
                .find(|m| {
                    m.platform.as_ref().is_some_and(|p| {
                        p.os == "linux"
                            && p.architecture == "amd64"
                            && p.variant
                                .as_deref()
                                .is_none_or(|v| v == "v1" || v.is_empty())
                    })
                })
                .ok_or_else(|| {
                    ImageError::NotFound(format!(
                        "{}: no linux/amd64 image in its index",
                        self.name
                    ))
                })?;
            let r = Reference::with_digest(
                self.reference.registry().to_string(),
                self.reference.repository().to_string(),
                chosen.digest.to_string(),
            );
            let (b, d) = self.manifest(&r).await?;
            let m: Manifest = serde_json::from_slice(&b)
                .map_err(|e| ImageError::Invalid(format!("{}: manifest: {e}", self.name)))?;
            self.images.store().put_blob(&digest, &bytes)?;
            (Some(digest), b, d, m)
        } else {
            (None, bytes, digest, top)
        };
        if manifest.schema_version != 2 || manifest.manifests.is_some() {
            return Err(ImageError::Invalid(format!(
                "{}: not an image manifest (schema {}, {})",
                self.name,
                manifest.schema_version,
                manifest.media_type.as_deref().unwrap_or("no media type")
            )));
        }
        let config_desc = manifest.config.as_ref().ok_or_else(|| {
            ImageError::Invalid(format!("{}: the manifest has no config", self.name))
        })?;
        if config_desc.size < 0 || config_desc.size as u64 > MAX_JSON {
            return Err(ImageError::Invalid(format!(
                "{}: config of {} bytes",
                self.name, config_desc.size
            )));
        }
        // Plain, gzip and zstd tars (the content says which); anything else
        // (an artifact, a Helm chart, a wasm module) is not a container image.
        if let Some(l) = manifest
            .layers
            .iter()
            .find(|l| !l.media_type.is_empty() && !l.media_type.contains(".tar"))
        {
            return Err(ImageError::Invalid(format!(
                "{}: layer {} is {:?}, not a tar layer",
                self.name, l.digest, l.media_type
            )));
        }
        self.blob(&config_desc.digest, None).await?;
        let config = ImageConfig::parse(&self.images.store().read_json_blob(&config_desc.digest)?)?;
        if config.os != "linux" || config.architecture != "amd64" {
            return Err(ImageError::Invalid(format!(
                "{}: an image for {}/{}, not linux/amd64",
                self.name, config.os, config.architecture
            )));
        }
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Invalid(format!(
                "{}: {} layers in the manifest, {} diff ids in the config",
                self.name,
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let chain = chain_ids(&config.rootfs.diff_ids);
        for l in &manifest.layers {
            self.progress.layer(l.digest.short(), LayerStatus::Waiting);
        }
        let jobs = manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .zip(&chain)
            .map(|((l, diff), chain)| self.layer(l, diff, chain));
        // Every layer runs to its end even when one fails: an unpack runs on
        // a blocking thread that cannot be cancelled, and must not be left
        // half-done when the process exits. The first error is the pull's.
        let results: Vec<Result<(), ImageError>> = stream::iter(jobs)
            .buffer_unordered(CONCURRENT_LAYERS)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        self.images.store().put_blob(&digest, &bytes)?;
        let size = chain.iter().map(|c| self.images.layer_size(c)).sum();
        let rec = ImageRecord {
            name: self.name.clone(),
            manifest: digest,
            index,
            config: config_desc.digest.clone(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            chain,
            size,
            created: config.created.clone(),
        };
        self.images.add(rec.clone())?;
        Ok(rec)
    }

    /// One layer: downloaded unless its blob is stored, unpacked unless
    /// its chain id is.
    async fn layer(&self, l: &Descriptor, diff: &Digest, chain: &Digest) -> Result<(), ImageError> {
        let short = l.digest.short().to_string();
        if self.images.layer_diff(chain).is_dir() {
            self.progress.layer(&short, LayerStatus::Exists);
            return Ok(());
        }
        self.blob(
            &l.digest,
            Some((&short, u64::try_from(l.size).unwrap_or(0))),
        )
        .await?;
        self.progress.layer(&short, LayerStatus::Extracting);
        let (images, blob, diff, chain) = (
            self.images.clone(),
            l.digest.clone(),
            diff.clone(),
            chain.clone(),
        );
        tokio::task::spawn_blocking(move || images.unpack_layer(&blob, &diff, &chain))
            .await
            .map_err(|e| ImageError::Invalid(format!("unpacking: {e}")))??;
        self.progress.layer(&short, LayerStatus::Done);
        Ok(())
    }

    /// Blob `d` into the store unless it is there; `show` names the layer
    /// whose progress this is.
    async fn blob(&self, d: &Digest, show: Option<(&str, u64)>) -> Result<(), ImageError> {
        let store = self.images.store().clone();
        let dd = d.clone();
        // The lock may wait for another pull of the same blob.
        let ingest = tokio::task::spawn_blocking(move || store.ingest(&dd))
            .await
            .map_err(|e| ImageError::Invalid(format!("ingest: {e}")))??;
        let Ingest::Writing(mut w) = ingest else {
            return Ok(());
        };
        let mut attempt = 0;
        loop {
            let r: Result<(), OciDistributionError> = async {
                let mut s = self
                    .client
                    .pull_blob_stream(&self.reference, d.to_string().as_str())
                    .await?;
                let total = s.content_length.or(show.map(|s| s.1)).unwrap_or(0);
                while let Some(chunk) = s.next().await {
                    let chunk = chunk?;
                    w.write(&chunk).map_err(|e| {
                        OciDistributionError::IoError(std::io::Error::other(e.to_string()))
                    })?;
                    if let Some((id, _)) = show {
                        self.progress.layer(
                            id,
                            LayerStatus::Downloading {
                                done: w.written(),
                                total,
                            },
                        );
                    }
                }
                Ok(())
            }
            .await;
            match r {
                Ok(()) => break,
                Err(e) if transient(&e) && attempt + 1 < ATTEMPTS => {
                    tracing::debug!(error = %e, "blob download failed; starting it again");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                    drop(w);
                    let store = self.images.store().clone();
                    let dd = d.clone();
                    match tokio::task::spawn_blocking(move || store.ingest(&dd))
                        .await
                        .map_err(|e| ImageError::Invalid(format!("ingest: {e}")))??
                    {
                        Ingest::Writing(again) => w = again,
                        Ingest::Present => return Ok(()),
                    }
                }
                Err(e) => return Err(self.registry_error(e)),
            }
        }
        if let Some((id, _)) = show {
            self.progress.layer(id, LayerStatus::Verifying);
        }
        w.commit()
    }
}

/// Checks `user`/`password` against `registry` (docker's `login`): a
/// manifest request with them must get past authentication (a 404 for the
/// made-up repository is a pass; 401 is not).
pub async fn login(
    registry: &str,
    user: &str,
    password: &str,
    registries: &Registries,
) -> Result<(), ImageError> {
    let reference: Reference = format!("{registry}/husk-login-check:latest")
        .parse()
        .map_err(|e| ImageError::Invalid(format!("{registry:?}: {e}")))?;
    let client = client_for(registry, registries);
    let auth = RegistryAuth::Basic(user.to_string(), password.to_string());
    match retry(|| client.pull_manifest_raw(&reference, &auth, MEDIA_TYPES)).await {
        Ok(_) => Ok(()),
        Err(OciDistributionError::UnauthorizedError { .. })
        | Err(OciDistributionError::AuthenticationFailure(_)) => Err(ImageError::Registry {
            image: registry.to_string(),
            message: "unauthorized: incorrect username or password".into(),
        }),
        Err(OciDistributionError::ImageManifestNotFoundError(_)) => Ok(()),
        Err(OciDistributionError::RegistryError { envelope, .. })
            if envelope.errors.iter().all(|e| {
                !matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::Unauthorized
                        | oci_client::errors::OciErrorCode::Denied
                )
            }) =>
        {
            Ok(())
        }
        Err(e) => Err(ImageError::Registry {
            image: registry.to_string(),
            message: e.to_string(),
        }),
    }
}

/// Records credentials for `registry` in a docker config file (created
/// 0600 in a 0700 directory; other entries and keys kept).
pub fn save_credentials(
    file: &Path,
    registry: &str,
    user: &str,
    password: &str,
) -> Result<(), ImageError> {
    use base64::Engine;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |what, source| ImageError::Io {
        what,
        path: file.to_path_buf(),
        source,
    };
    let mut cfg: serde_json::Value = match std::fs::read(file) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| ImageError::Invalid(format!("{}: {e}", file.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(io("reading", e)),
    };
    if !cfg.is_object() {
        return Err(ImageError::Invalid(format!(
            "{}: not a JSON object",
            file.display()
        )));
    }
    if !cfg["auths"].is_object() {
        cfg["auths"] = serde_json::json!({});
    }
    let key = if registry == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    cfg["auths"][key] = serde_json::json!({
        "auth": base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")),
    });
    if let Some(dir) = file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("creating the directory of", e))?;
    }
    let tmp = file.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(&cfg).map_err(|e| ImageError::Invalid(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("writing", e))?;
    std::io::Write::write_all(&mut f, &bytes).map_err(|e| io("writing", e))?;
    std::fs::rename(&tmp, file).map_err(|e| io("writing", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "localhost",
            "[::1]:5000",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["docker.io", "10.0.0.1:5000", "localhost.evil.com"] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn saved_credentials_are_read_back_and_other_entries_kept() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("docker/config.json");
        save_credentials(&f, "localhost:5001", "u", "p").unwrap();
        save_credentials(&f, "quay.io", "q", "r").unwrap();
        assert!(
            matches!(auth_for(Some(&f), "localhost:5001").unwrap(), RegistryAuth::Basic(u, p) if u == "u" && p == "p")
        );
        assert!(
            matches!(auth_for(Some(&f), "quay.io").unwrap(), RegistryAuth::Basic(u, _) if u == "q")
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn credentials_come_from_the_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        std::fs::write(
            &f,
            r#"{"auths":{"localhost:5001":{"auth":"dXNlcjpwYXNz"},"https://index.docker.io/v1/":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        assert!(
            matches!(auth_for(Some(&f), "localhost:5001").unwrap(), RegistryAuth::Basic(u, p) if u == "user" && p == "pass")
        );
        assert!(
            matches!(auth_for(Some(&f), "docker.io").unwrap(), RegistryAuth::Basic(u, _) if u == "u")
        );
        assert!(matches!(
            auth_for(Some(&f), "quay.io").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(
            auth_for(Some(&dir.path().join("none")), "quay.io").unwrap(),
            RegistryAuth::Anonymous
        ));
    }
}
